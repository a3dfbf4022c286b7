"""Checkpoints of one adapter: training state with Orbax, sampler weights in PEFT format.

A training checkpoint is a directory holding an Orbax `StandardCheckpointer` save of
`{"weights", "opt_state", "step"}` plus `adapter.json` (rank, alpha, targets, seed, base model,
the engine's max rank and targets). It restores into any engine over the same base model whose bank
has the same max rank and targets; the loader checks that and says which differs.

Sampler weights are a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`): the same
files `peft`, vLLM or our own `create_sampling_client(model_path=...)` load.

Writing happens off the engine's worker thread: the caller copies the arrays to host first
(`jax.device_get`), then `save_training_state` writes them, so a save blocks other work only for
the device-to-host copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ADAPTER_META = "adapter.json"
STATE_DIR = "state"


def save_training_state(directory: str | os.PathLike[str], *, weights: Any, opt_state: Any, step: int,
                        meta: dict[str, Any], overwrite: bool = True) -> Path:
    """Write host arrays `weights`/`opt_state` and `meta` to `directory` (created)."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {directory} already exists")
    directory.mkdir(parents=True, exist_ok=True)
    state = {"weights": weights, "opt_state": opt_state, "step": np.asarray(step, np.int64)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, state, force=True)
        checkpointer.wait_until_finished()
    (directory / ADAPTER_META).write_text(json.dumps({**meta, "step": int(step)}, indent=2))
    return directory


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    directory = Path(directory)
    meta_file = directory / ADAPTER_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint (no {ADAPTER_META})")
    return json.loads(meta_file.read_text())


def load_training_state(directory: str | os.PathLike[str], *, weights_like: Any, opt_state_like: Any
                        ) -> tuple[Any, Any, int]:
    """Restore `(weights, opt_state, step)` shaped like the given templates (arrays or abstract)."""
    directory = Path(directory).absolute()
    target = {"weights": weights_like, "opt_state": opt_state_like, "step": np.asarray(0, np.int64)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(directory / STATE_DIR, abstract)
    # Orbax places what it restores on an explicit device ("committed" arrays). The engine's state is
    # uncommitted, and jit keys its compile cache on committedness: a committed slot write would make
    # every compiled step compile again (without retracing, so `compile_counts` would not show it).
    state = jax.tree.map(jnp.asarray, jax.device_get(state))
    return state["weights"], state["opt_state"], int(state["step"])
