"""The launcher's configuration schema: nested dataclasses registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `base_config` (the `Config` dataclass below), so every YAML file and
every command-line override is checked against these types: a typo'd key (`lora.rnak=4`) or a
value of the wrong type fails with Hydra's error naming the key, before anything runs.

Two resolvers are registered on import (the entry point and the tests import this module first):
- `${pkg_path:launcher/assets/tiny-arith}`: a path inside an installed package, so the embedded
  model is found whatever the working directory;
- `${run_dir:${resume},${runs_root}/${name},${now:...}}`: the run directory Hydra creates, which is
  a new timestamped one, or with `resume=true` the newest existing run of the experiment.

The `pretrain` section is `launcher.pretrain.PretrainConfig` itself (one schema, not a copy), with
only its frozen `difficulty` swapped for a mutable twin so that it can be overridden.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from framework.compilation_cache import DEFAULT_DIR
from framework.tracking import LoggerConfig
from launcher.envs.arithmetic import Difficulty
from launcher.pretrain import PretrainConfig

CHECKPOINTS_DIR = "checkpoints"  # inside a run directory: the client's home and `latest.json`


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: str = MISSING  # a Hugging Face checkpoint directory (config.json + safetensors + tokenizer)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on accelerators
    max_seq_len: int = 0  # 0: the model's max_position_embeddings
    remat: str = "none"  # none | full | dots: rematerialisation of each layer in training (models.remat)


@dataclass
class MeshSchema:
    """`framework.sharding.MeshConfig`: devices along data / fsdp / tp, one of them -1 for the rest
    (default: the base model and the batch spread over every visible device by fsdp)."""

    data: int = 1
    fsdp: int = -1
    tp: int = 1


@dataclass
class DistributedSchema:
    """`framework.distributed.DistributedConfig`: join a multi-host run (one process per host, the same
    command everywhere). Unset fields come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, else from JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU)."""

    enabled: bool = False
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 300


@dataclass
class LoraConfig:
    rank: int = 8
    seed: int = 0  # adapter initialisation
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at max_steps)
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0: off


@dataclass
class ClientConfig:
    kind: str = "local"  # local: in-process engine | remote: a tinker-jax server (framework.remote)
    base_url: str | None = None
    api_key: str | None = None  # remote: None reads $TINKER_API_KEY
    base_model: str | None = None  # remote: the name the server serves model.path under (default: model.path)
    # Engine sizes (local only): adapters held on the device (more page to host memory), the largest
    # LoRA rank, published snapshots in the sampler bank at once.
    max_adapters: int = 4
    max_rank: int = 32
    sampler_slots: int = 4
    min_seq_bucket: int = 32


_DIFFICULTY = Difficulty()


@dataclass
class DifficultyConfig:
    """`launcher.envs.arithmetic.Difficulty`, mutable, with its defaults (the embedded model's task)."""

    num_operands: int = _DIFFICULTY.num_operands
    min_digits: int = _DIFFICULTY.min_digits
    max_digits: int = _DIFFICULTY.max_digits
    operators: list[str] = field(default_factory=lambda: list(_DIFFICULTY.operators))


@dataclass
class EnvConfig:
    name: str = "arithmetic"  # arithmetic | math
    seed: int = 0  # training data order
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)  # arithmetic
    path: str | None = None  # math: JSONL or parquet with question/answer; null: the shipped file
    num_eval: int = 16  # math: problems held out from the file


@dataclass
class RLConfig:
    problems_per_step: int = 8  # P
    group_size: int = 8  # G completions per problem; advantages are centred within a group
    max_tokens: int = 8
    temperature: float = 1.0
    loss_fn: str = "importance_sampling"  # importance_sampling | ppo | cispo
    loss_fn_config: dict[str, float] = field(default_factory=dict)  # e.g. +rl.loss_fn_config.clip_high_threshold=1.3
    scale_by_std: bool = False  # divide centred rewards by the group's std (GRPO)
    kl_coef: float = 0.0  # > 0: per-token penalty kl_coef * (log q - log p_base) folded into advantages
    eval_problems: int = 64  # greedy accuracy on held-out problems every `eval_every` steps


@dataclass
class SLConfig:
    data: str | None = None  # chat JSONL ({"messages": [...]}); null: conversations made from the env
    batch_size: int = 16
    eval_size: int = 32  # held-out conversations (the end of the file, or the env's eval problems)


@dataclass
class DPOConfig:
    beta: float = 0.1
    batch_size: int = 8  # preference pairs per step
    eval_pairs: int = 32


@dataclass
class DistillConfig:
    teacher_base_model: str | None = None  # another checkpoint with the same tokenizer; null: model.path
    teacher_adapter: str | None = None  # a PEFT adapter directory on the teacher base model
    # With neither set, the teacher is trained first: SFT on the env's reference answers.
    teacher_sl_steps: int = 30
    teacher_sl_batch_size: int = 16
    teacher_sl_learning_rate: float = 3e-3
    problems_per_step: int = 8
    group_size: int = 4
    max_tokens: int = 8
    temperature: float = 1.0
    eval_problems: int = 64


@dataclass
class PretrainSchema(PretrainConfig):
    """`launcher.pretrain.PretrainConfig` with a mutable difficulty (a frozen node cannot be overridden)."""

    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    out: str = ""  # empty: <run>/tiny-arith (pretrain.out=<dir> to write elsewhere, e.g. the shipped asset)


@dataclass
class Config:
    name: str = "default"  # the experiment: runs go to `${runs_root}/${name}/<time>`
    recipe: str = "rl"  # rl | sl | dpo | distill | pretrain
    seed: int = 0  # sampling seeds are derived from (seed, step)
    max_steps: int = 50
    eval_every: int = 10  # 0: no evaluation during the run (always one at the end)
    save_every: int = 10  # save_state every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # older training checkpoints are deleted
    resume: bool = False  # continue the newest run of this experiment from its last checkpoint
    stop_after: int | None = None  # debug: exit after this many steps as if killed (no final export)
    runs_root: str = "runs"
    # JAX's persistent compilation cache: a second run with the same shapes skips most compiling.
    compilation_cache: str | None = DEFAULT_DIR
    plan_only: bool = False  # print the per-device memory plan and exit (exit 2 if it does not fit)
    mesh: MeshSchema = field(default_factory=MeshSchema)
    distributed: DistributedSchema = field(default_factory=DistributedSchema)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainSchema = field(default_factory=PretrainSchema)  # recipe=pretrain (launcher/pretrain.py)


# ------------------------------------------------------------------------------------ resolvers
def package_path(relative: str) -> str:
    """`launcher/assets/x` → the absolute path of `assets/x` inside the installed `launcher` package."""
    package, _, rest = relative.partition("/")
    return str(Path(str(importlib.resources.files(package))) / rest)


def run_dir(resume: Any, experiment_dir: str, timestamp: str) -> str:
    """A new `experiment_dir/timestamp`, or with `resume` the newest run there with a checkpoint."""
    if str(resume).lower() not in ("true", "1"):
        return f"{experiment_dir}/{timestamp}"
    root = Path(experiment_dir)
    runs = sorted(p for p in root.glob("*") if (p / CHECKPOINTS_DIR / "latest.json").is_file()) if root.is_dir() else []
    if not runs:
        raise ValueError(f"resume=true: no run with a checkpoint under {root.absolute()}; "
                         "start one without resume, or pass hydra.run.dir=<run directory>")
    return str(runs[-1])


def register() -> None:
    """Register the schema and the resolvers (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("pkg_path"):
        OmegaConf.register_new_resolver("pkg_path", package_path)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)


register()
