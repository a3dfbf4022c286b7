"""Multi-host runs: one process per host, all running the same program under JAX's multi-controller
runtime (`jax.distributed.initialize`), over one global mesh.

Nothing here is a home-made distribution layer. `initialize` connects the processes (which then see
every host's devices in `jax.devices()`, so `framework.sharding.make_mesh` builds the global mesh),
and `put_global` places host data that every process holds identically onto a global sharding
(each process materialises only its own devices' blocks). Every process must then make the same
calls in the same order: the engine's compiled steps are collective.

Where the settings come from, first found wins: the config fields; the environment
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; else JAX's cluster detection
(SLURM, Open MPI, Kubernetes, Cloud TPU). On CPU the processes' collectives go through gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = False  # call jax.distributed.initialize before anything touches a device
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"  # how CPU devices of different processes talk
    initialization_timeout: int = 300  # seconds to wait for every process to join


def initialize_kwargs(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The arguments for `jax.distributed.initialize`, from the config, then the environment; fields
    left out are for JAX's cluster detection to fill."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {"initialization_timeout": config.initialization_timeout}
    address = config.coordinator_address or environ.get(ENV_COORDINATOR)
    if address:
        out["coordinator_address"] = address
    for key, env in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        value = getattr(config, key)
        if value is None and environ.get(env):
            try:
                value = int(environ[env])
            except ValueError:
                raise ValueError(f"{env}={environ[env]!r} is not an integer") from None
        if value is not None:
            out[key] = value
    n, i = out.get("num_processes"), out.get("process_id")
    if (n is None) != (i is None):
        raise ValueError("distributed: num_processes and process_id go together (config or "
                         f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); got num_processes={n}, process_id={i}")
    if n is not None:
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"distributed: process_id must be in [0, num_processes={n}), got {i}")
        if "coordinator_address" not in out and n > 1:
            raise ValueError(f"distributed: num_processes={n} needs coordinator_address=<host:port of process 0> "
                             f"(or {ENV_COORDINATOR})")
    return out


def initialize(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Join the multi-host run when `config.enabled` (idempotent); returns whether this is process 0.

    Call before anything creates a device array (backends start on first use)."""
    if not config.enabled:
        return True
    if not jax.distributed.is_initialized():
        kwargs = initialize_kwargs(config, environ)
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
        jax.distributed.initialize(**kwargs)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_index() == 0


def put_global(tree: Any, shardings: Any) -> Any:
    """Place host arrays that every process holds identically onto (global) shardings: each process
    builds only the blocks of its own devices (`jax.make_array_from_callback`). One process: the same
    as `jax.device_put`."""

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def fetch(tree: Any) -> Any:
    """Every leaf as a full host numpy array on every process (an all-gather across processes)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
