"""The driver: one run of a recipe, from a composed config to a run directory that tells the story.

    <run>/.hydra/            the composed config and the overrides (written by Hydra)
    <run>/metrics.jsonl      one JSON object per step; metrics.png: the main curves
    <run>/wandb/             the W&B run (offline by default)
    <run>/checkpoints/       the client's home: save_state checkpoints (Orbax: adapter + AdamW + step)
                             and latest.json, which names the newest one
    <run>/final_adapter/     the trained adapter in PEFT format (adapter_config.json + safetensors)

Checkpoints and resume: after every `save_every` steps the adapter and its optimizer state are
saved and `latest.json` is replaced atomically. With `resume=true` the run continues from there:
the training client is recreated with `create_training_client_from_state_with_optimizer`, the step
counter, learning-rate schedule, data order and sampling seeds are functions of the step, and
metrics rows after the checkpoint are dropped, so the resumed run's metrics equal those of an
uninterrupted one. `stop_after=k` ends a run after k steps as if it were killed (for tests).

Row `step` = s holds the metrics of training step s (sampling and loss use the weights after s
optimizer steps) plus, every `eval_every` steps, the evaluation of those same weights; a last row
`step = max_steps` holds the final evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.config import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

LATEST = "latest.json"
FINAL_ADAPTER = "final_adapter"


class ConfigError(ValueError):
    """A mistake in the run's configuration that the user fixes on the command line; the entry point
    prints its message alone, without a traceback."""


def run(cfg: DictConfig, run_dir: str | os.PathLike[str]) -> float | None:
    """Run `cfg.recipe` in `run_dir`; returns the run's final main metric (for sweepers)."""
    check_config(cfg)
    for noisy in ("jax._src.xla_bridge", "absl", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from framework.distributed import DistributedConfig, initialize

    initialize(DistributedConfig(**cfg.distributed))  # before anything touches a device
    if cfg.plan_only:
        plan = memory_plan(cfg)
        print(plan.report())
        if not plan.fits:
            raise ConfigError("\n".join(plan.advice()))
        return None
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    from framework.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cfg.compilation_cache)
    if cfg.recipe == "pretrain":
        return _pretrain(cfg, run_dir)
    for line in describe(cfg, run_dir):
        log.info(line)
    return Driver(cfg, run_dir).run()


def check_config(cfg: DictConfig) -> None:
    """Refuse, with one line that says what to set, the mistakes a new user makes first."""
    if cfg.recipe != "pretrain" and OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError(
            f"model={cfg.model.name} needs model.path=<a local Hugging Face checkpoint directory> (config.json, "
            "*.safetensors and the tokenizer files); nothing is downloaded. Without model=..., runs use the "
            "embedded tiny model.")
    if cfg.client.kind == "remote" and not cfg.client.get("base_url"):
        raise ConfigError("client=remote needs client.base_url=http://<host>:<port> of a tinker-jax server")


def memory_plan(cfg: DictConfig) -> Any:
    """The engine's per-device memory for this run (`framework.memory_plan`) on the configured mesh."""
    import jax

    from framework.memory_plan import Workload, device_capacity, plan_memory
    from framework.precision import Precision
    from framework.sharding import MeshConfig
    from lora import select_targets
    from models import read_config

    model_config, _ = read_config(cfg.model.path)
    seq = cfg.model.max_seq_len or model_config.max_position_embeddings
    rows = {"rl": cfg.rl.problems_per_step * cfg.rl.group_size, "sl": cfg.sl.batch_size, "dpo": 2 * cfg.dpo.batch_size,
            "distill": cfg.distill.problems_per_step * cfg.distill.group_size}.get(cfg.recipe, 1)
    client = cfg.client
    workload = Workload(
        batch=1 << max(0, rows - 1).bit_length(), seq_len=seq, train_slots=client.max_adapters + 1,
        sampler_slots=client.sampler_slots + 1, adapters=client.max_adapters,
        max_rank=max(client.max_rank, cfg.lora.rank),
        targets=select_targets(train_attn=cfg.lora.train_attn, train_mlp=cfg.lora.train_mlp,
                               train_unembed=cfg.lora.train_unembed),
        sample_batch=rows, sample_len=seq, remat=cfg.model.remat, fused_attention=jax.default_backend() != "cpu")
    try:
        mesh = MeshConfig(**cfg.mesh).shape(jax.device_count())
    except ValueError as error:
        raise ConfigError(f"mesh: {error}") from None
    return plan_memory(model_config, dtype=Precision.from_dtype(cfg.model.dtype).params, mesh=mesh,
                       workload=workload, capacity=device_capacity())


def describe(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The first lines a run prints: what runs, on which model and devices, and where it writes."""
    import jax

    from models import read_config

    model_config, _ = read_config(cfg.model.path)
    params = model_config.num_params()
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    mesh = ""
    if cfg.client.kind == "local":
        from framework.sharding import MESH_AXES, MeshConfig

        try:
            shape = MeshConfig(**cfg.mesh).shape(len(devices))
            mesh = ", mesh " + " ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape, strict=True))
        except ValueError as error:
            raise ConfigError(f"mesh: {error}") from None
    return [
        f"{cfg.name}: recipe {cfg.recipe}, {cfg.max_steps} steps, LoRA rank {cfg.lora.rank}, "
        f"{cfg.client.kind} engine",
        f"model: {cfg.model.name} ({model_config.model_type}, {size} parameters) from {cfg.model.path}",
        f"devices: {len(devices)} × {', '.join(kinds)} (jax {jax.__version__})" + (mesh if len(devices) > 1 else ""),
        f"run directory: {_relative(run_dir)} (metrics.jsonl, metrics.png, checkpoints/)",
    ]


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def make_env(cfg: Any) -> Any:
    """The environment named by the `env` config section."""
    if cfg.name == "arithmetic":
        from launcher.envs.arithmetic import ArithmeticEnv, Difficulty

        d = cfg.difficulty
        return ArithmeticEnv(seed=cfg.seed, difficulty=Difficulty(
            num_operands=d.num_operands, min_digits=d.min_digits, max_digits=d.max_digits,
            operators=tuple(d.operators)))
    if cfg.name == "math":
        from launcher.envs.math import MathEnv

        return MathEnv(path=cfg.path, seed=cfg.seed, num_eval=cfg.num_eval)
    raise ValueError(f"env.name must be arithmetic or math, got {cfg.name!r}")


def make_service(cfg: DictConfig, home: Path) -> Any:
    """The ServiceClient the config asks for: `client=local`, the in-process engine; `client=remote`, a
    tinker-jax server through `framework.remote` (same client API, so the recipes do not change)."""
    if cfg.client.kind == "remote":
        from framework.remote import RemoteServiceClient, ServerUnavailable

        if not (cfg.client.api_key or os.environ.get("TINKER_API_KEY")):
            raise ConfigError("client=remote needs client.api_key=tml-... (or $TINKER_API_KEY); the server's admin "
                              "makes one with: python -m service keys create --name <you>")
        try:
            return RemoteServiceClient(cfg.client.base_url, cfg.client.api_key,
                                       tokenizer_path=str(Path(cfg.model.path).expanduser().absolute()))
        except ServerUnavailable as error:
            raise ConfigError(str(error)) from None
    if cfg.client.kind != "local":
        raise ConfigError(f"client.kind must be local or remote, got {cfg.client.kind!r}")
    import jax

    from framework import EngineConfig, ServiceClient
    from framework.sharding import MeshConfig

    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    engine = EngineConfig(max_adapters=cfg.client.max_adapters, max_rank=max(cfg.client.max_rank, cfg.lora.rank),
                          sampler_slots=cfg.client.sampler_slots, dtype=dtype,
                          min_seq_bucket=cfg.client.min_seq_bucket, max_seq_len=cfg.model.max_seq_len,
                          mesh=MeshConfig(**cfg.mesh), remat=cfg.model.remat)
    return ServiceClient(engine_config=engine, home=home)


def learning_rate(cfg: Any, step: int, max_steps: int) -> float:
    """`optim.learning_rate` with linear warmup and a constant, linear or cosine decay to 0."""
    lr = cfg.learning_rate
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "linear":
        return lr * (1.0 - progress)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule must be constant, linear or cosine, got {cfg.schedule!r}")


class Driver:
    """The loop shared by the recipes: create or restore the adapter, step, evaluate, save, export."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / CHECKPOINTS_DIR
        self.base_model = str(Path(cfg.model.path).expanduser().absolute())
        if cfg.client.kind == "remote" and cfg.client.get("base_model"):
            self.base_model = cfg.client.base_model
        self.service: Any = None

    def run(self) -> float | None:
        from framework import types
        from framework.tracking import Tracker
        from launcher.recipes import RECIPES
        from launcher.recipes.base import Context

        cfg = self.cfg
        if cfg.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)} or pretrain, got {cfg.recipe!r}")
        recipe_cls = RECIPES[cfg.recipe]
        latest = self._latest() if cfg.resume else None
        if cfg.resume and latest is None:
            raise ConfigError(f"resume=true but {self.ckpt_dir / LATEST} does not exist")
        start = latest["completed_steps"] if latest else 0

        service = self.service = make_service(cfg, self.ckpt_dir)
        tracker = None
        finished = False
        try:
            if latest:
                log.info("resuming %s from step %d (%s)", self.run_dir, start, latest["path"])
                trainer = service.create_training_client_from_state_with_optimizer(latest["path"])
            else:
                trainer = service.create_lora_training_client(
                    self.base_model, rank=cfg.lora.rank, seed=cfg.lora.seed, train_attn=cfg.lora.train_attn,
                    train_mlp=cfg.lora.train_mlp, train_unembed=cfg.lora.train_unembed)
            ctx = Context(cfg=cfg, service=service, trainer=trainer, tokenizer=trainer.get_tokenizer(),
                          env=make_env(cfg.env), run_dir=self.run_dir, base_model=self.base_model)
            recipe = recipe_cls(ctx)
            tracker = Tracker(self.run_dir, config=OmegaConf.to_container(cfg, resolve=True), logger_cfg=cfg.logger,
                              name=cfg.name, total_steps=cfg.max_steps, start_step=start,
                              plot_keys=recipe.plot_keys, progress_key=recipe.progress_key)
            extra = recipe.prepare()
            if start > 0:
                extra = {}  # the first run logged them with step 0
            for step in range(start, cfg.max_steps):
                if cfg.stop_after is not None and step >= cfg.stop_after:
                    log.info("stop_after=%d: stopping as if killed", cfg.stop_after)
                    return None
                t0 = time.perf_counter()
                metrics = dict(extra)
                extra = {}
                if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                    metrics.update(recipe.evaluate(step))
                lr = learning_rate(cfg.optim, step, cfg.max_steps)
                adam = types.AdamParams(learning_rate=lr, beta1=cfg.optim.beta1, beta2=cfg.optim.beta2,
                                        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                        grad_clip_norm=cfg.optim.grad_clip_norm)
                metrics.update(recipe.step(step, adam))
                elapsed = time.perf_counter() - t0
                metrics.update({"lr": lr, "time/step": elapsed})
                if "tokens" in metrics:
                    metrics["tokens/s"] = metrics["tokens"] / max(elapsed, 1e-9)
                tracker.log(step, metrics)
                completed = step + 1
                if cfg.save_every > 0 and completed % cfg.save_every == 0 and completed < cfg.max_steps:
                    self._save(trainer, completed)
            final = recipe.evaluate(cfg.max_steps)
            if final:
                tracker.log(cfg.max_steps, final)
            self._save(trainer, cfg.max_steps)
            self._export(trainer)
            finished = True
            tracker.summary({**final, "completed_steps": cfg.max_steps})
            log.info("finished %s: %s", self.run_dir, json.dumps(final))
            return final.get(recipe.final_key)
        finally:
            if tracker is not None:
                tracker.close(finished=finished)
            service.close()

    # ------------------------------------------------------------------------------ checkpoints
    def _latest(self) -> dict[str, Any] | None:
        path = self.ckpt_dir / LATEST
        return json.loads(path.read_text()) if path.is_file() else None

    def _save(self, trainer: Any, completed: int) -> None:
        path = trainer.save_state(f"step_{completed:06d}", overwrite=True).result().path
        previous = self._latest()
        kept = [*(previous or {}).get("checkpoints", []), path]
        keep = max(1, self.cfg.keep_checkpoints)
        for old in kept[:-keep]:
            if str(old).startswith("tinker://"):
                self.service.delete_checkpoint(old)  # a checkpoint on the server
            else:
                shutil.rmtree(old, ignore_errors=True)
        record = {"completed_steps": completed, "path": path, "checkpoints": kept[-keep:]}
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)  # remote: the checkpoints are on the server, not here
        tmp = self.ckpt_dir / (LATEST + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.ckpt_dir / LATEST)

    def _export(self, trainer: Any) -> Path:
        path = trainer.save_weights_for_sampler("final").result().path
        out = self.run_dir / FINAL_ADAPTER
        shutil.rmtree(out, ignore_errors=True)
        if path.startswith("tinker://"):
            self.service.download_checkpoint(path, out)  # the adapter trained on the server
        else:
            shutil.copytree(path, out)
        log.info("final adapter (PEFT) in %s", out)
        return out


def _pretrain(cfg: DictConfig, run_dir: Path) -> None:
    """`recipe=pretrain`: build the tiny model with `launcher.pretrain.run_pretrain` (into <run>/tiny-arith)."""
    from launcher.envs.arithmetic import Difficulty
    from launcher.pretrain import PretrainConfig, TinyModelConfig, run_pretrain

    section = OmegaConf.to_container(cfg.pretrain, resolve=True)
    section["out"] = section["out"] or str(run_dir / "tiny-arith")
    section["model"] = TinyModelConfig(**section["model"])
    d = section["difficulty"]
    section["difficulty"] = Difficulty(**{**d, "operators": tuple(d["operators"])})
    run_pretrain(PretrainConfig(**section))
    return None
