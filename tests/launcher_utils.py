"""Helpers for the launcher tests: compose a config in-process, the embedded tiny model, shorten runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import launcher.config  # noqa: F401  (registers the schema and resolvers)

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "launcher" / "assets" / "tiny-arith"

# A few steps of each experiment, small batches; W&B stays offline.
SHORT: dict[str, list[str]] = {
    "rl_math": ["max_steps=3", "eval_every=2", "save_every=2", "rl.problems_per_step=4", "rl.group_size=4",
                "rl.eval_problems=8", "rl.max_tokens=6"],
    "sl_chat": ["max_steps=3", "eval_every=2", "save_every=2", "sl.batch_size=8", "sl.eval_size=16"],
    "dpo": ["max_steps=3", "eval_every=2", "save_every=2", "dpo.batch_size=4", "dpo.eval_pairs=16"],
    "distill": ["max_steps=3", "eval_every=2", "save_every=2", "distill.teacher_sl_steps=4",
                "distill.problems_per_step=4", "distill.group_size=4", "distill.eval_problems=8",
                "distill.max_tokens=6"],
}


def compose_config(overrides: list[str]):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# What `models.load_checkpoint` and `load_tokenizer` read from the embedded model.
EMBEDDED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REBUILD = "python -m launcher +experiment=pretrain_tiny pretrain.out=launcher/assets/tiny-arith"


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded tiny model. A missing or incomplete asset fails the test, never falls back to another
    model: the recipes' assertions (learning, DPO margins) are about this one."""
    missing = [name for name in EMBEDDED_FILES if not (EMBEDDED / name).is_file()]
    if missing:
        pytest.fail(f"the embedded model {EMBEDDED} lacks {', '.join(missing)}; rebuild it from the repository "
                    f"root with: {REBUILD}", pytrace=False)
    return EMBEDDED


@pytest.fixture(scope="session")
def xla_cache(request, tmp_path_factory) -> Path:
    """A persistent XLA compilation cache shared by the launcher runs of the test session."""
    cache = request.config.cache
    return Path(cache.mkdir("launcher_xla_cache")) if cache is not None else tmp_path_factory.mktemp("xla")


def run_overrides(experiment: str, model: Path, cache: Path, *extra: str) -> list[str]:
    return [f"+experiment={experiment}", f"model.path={model}", f"compilation_cache={cache}",
            "logger.progress=false", "logger.wandb.mode=offline", *SHORT[experiment], *extra]


@pytest.fixture(autouse=True)
def _restore_jax_cache_config():
    """`launcher.run.run` turns on the persistent compilation cache; leave other tests as they were."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
