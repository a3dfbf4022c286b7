"""Placement: the engine's mesh, and where each kind of its state lives on it.

The engine builds one `jax.sharding.Mesh` (`EngineConfig.mesh`, default: every visible device along
`fsdp`) and places everything through this object, by the one rules table of `framework.sharding`:

- the base model's parameters, loaded straight into their shards;
- each adapter's weights, AdamW state and gradients (`adapter_*` axes: FSDP/ZeRO-3 over `fsdp`,
  column/row over `tp`), on creation, page-in and state loads;
- the sampler bank (slot axis whole), the decode pool's KV cache and logits (rows over
  `data`×`fsdp`, kv heads over `tp`) and prefix-cache entries;
- each batch's host arrays (rows over `data`×`fsdp`).

Inside the compiled steps, `hook` pins every projection's output to its logical axes and gathers
each layer's adapter slice where it is used, and the `constrain_*` functions pin persistent outputs
(gradients, new weights and moments, the KV cache) to the shardings their inputs had, so a step's
outputs feed the next step without a reshard or a recompile.

On one device every function here is the identity (arrays stay uncommitted, steps unconstrained):
the single-device engine compiles exactly what it did before meshes existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from framework.optim import init_opt_state
from framework.sharding import MeshConfig, MeshRules, make_mesh
from lora import LoraBank, LoraWeights, make_hook
from models import ModelConfig, axes
from models.fused_attention import causal_attention_fn, splash_attention
from models.kv_cache import KVCache
from models.transformer import LinearHook, causal_attention

PREFIX_ENTRY_AXES: axes.LogicalAxes = (None, None, axes.CACHE_KV_HEADS, axes.CACHE_LENGTH, axes.HEAD_DIM)
"""A prefix-cache entry `[L, 2 (keys, values), K, n, H]`."""


def _tree_constrain(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


class Placement:
    """The mesh of one engine and the shardings of its state (identity on a single device)."""

    def __init__(self, model_config: ModelConfig, mesh: MeshConfig | None = None,
                 devices: Sequence[jax.Device] | None = None):
        self.mesh = make_mesh(mesh, devices)
        self.rules = MeshRules.for_model(self.mesh, model_config)
        self.sharded = self.mesh.size > 1
        self._zeros: dict[tuple, Callable[[], Any]] = {}

    def describe(self) -> str:
        """e.g. `8 cpu devices: data=1 fsdp=4 tp=2`."""
        platform = self.mesh.devices.flat[0].platform
        shape = " ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        return f"{self.mesh.size} {platform} device{'s' if self.mesh.size > 1 else ''}: {shape}"

    # ------------------------------------------------------------------------- base parameters
    def param_shardings(self, config: ModelConfig, abstract: nnx.State) -> dict | None:
        """`{state path: NamedSharding}` for `models.load_checkpoint(shardings=...)`; None on one device."""
        return self.rules.param_sharding_map(config, abstract) if self.sharded else None

    def base(self, config: ModelConfig, state: nnx.State) -> nnx.State:
        """A model state already in memory (a model handed to the engine), moved into its shards."""
        if not self.sharded:
            return state
        return jax.device_put(state, self.rules.param_shardings(config, state))

    # ------------------------------------------------------------------------ adapters (host ↔ device)
    def _adapter_shardings(self, weights: LoraWeights) -> LoraWeights:
        return self.rules.adapter_shardings(weights, slots=False)

    def _opt_shardings(self, opt_state: Any, weights: LoraWeights) -> Any:
        return self.rules.opt_state_shardings(init_opt_state, opt_state, self._adapter_shardings(weights))

    def adapter(self, weights: LoraWeights, dtype: Any | None = None) -> LoraWeights:
        """One adapter's weights (host or device arrays) on the device(s)."""
        if dtype is not None:
            weights = jax.tree.map(lambda w: np.asarray(w, dtype) if isinstance(w, np.ndarray) else w.astype(dtype),
                                   weights)
        if not self.sharded:
            # One device_put of the whole tree (its transfers go together, not one call per array) and no
            # device named, which keeps them uncommitted like the rest of the single-device state: jit keys
            # its cache on committedness, so committed arrays would compile every step again.
            return jax.device_put(weights)
        return jax.device_put(weights, self._adapter_shardings(weights))

    def opt_state(self, opt_state: Any, weights: LoraWeights) -> Any:
        """One adapter's AdamW state on the device(s), its moments sharded as `weights`."""
        if not self.sharded:
            return jax.device_put(opt_state)
        return jax.device_put(opt_state, self._opt_shardings(opt_state, weights))

    def new_opt_state(self, weights: LoraWeights) -> Any:
        return self.opt_state(init_opt_state(weights), weights)

    def adapter_state(self, weights: LoraWeights, opt_state: Any | None, grads: LoraWeights | None
                      ) -> tuple[LoraWeights, Any | None, LoraWeights | None]:
        """Everything an adapter owns, paged back in."""
        if not self.sharded:  # one transfer call for all of it
            return jax.device_put((weights, opt_state, grads))
        return (self.adapter(weights), None if opt_state is None else self.opt_state(opt_state, weights),
                None if grads is None else self.adapter(grads))

    def bank(self, bank: LoraBank) -> LoraBank:
        """The sampler bank `[L, S, ...]` (its slot axis whole)."""
        if not self.sharded:
            return bank
        return jax.device_put(bank, self.rules.bank_shardings(bank))

    # ----------------------------------------------------------------------------- decode pool
    def empty_cache(self, config: ModelConfig, rows: int, capacity: int, dtype: Any) -> KVCache:
        """A zero KV cache, created in its shards (never whole on one device first)."""
        if not self.sharded:
            return KVCache.empty(config, rows, capacity, dtype)
        return self._zeros_fn(("cache", rows, capacity, jnp.dtype(dtype).name),
                              lambda: KVCache.empty(config, rows, capacity, dtype), self.rules.kv_cache_shardings)()

    def zeros_rows(self, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """A zero `[rows, ...]` array split by rows (the decode pool's logits)."""
        if not self.sharded:
            return jnp.zeros(shape, dtype)
        return self._zeros_fn(("rows", shape, jnp.dtype(dtype).name), lambda: jnp.zeros(shape, dtype),
                              lambda x: self.rules.batch_sharding(x.shape))()

    def _zeros_fn(self, key: tuple, make: Callable[[], Any], shardings: Callable[[Any], Any]) -> Callable[[], Any]:
        """`make`, jitted once per key to create its output in its shards."""
        fn = self._zeros.get(key)
        if fn is None:
            fn = self._zeros[key] = jax.jit(make, out_shardings=shardings(jax.eval_shape(make)))
        return fn

    # ----------------------------------------------------------------------------------- batches
    def batch(self, tree: Any) -> Any:
        """A batch's host arrays (every leaf `[B, ...]`), split by rows over `data`×`fsdp`."""
        if not self.sharded:
            return tree
        return jax.device_put(tree, self.rules.batch_shardings(tree))

    def attention(self, name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None:
        """The attention kernel `name` for this mesh's backend (None: the model's own masked path)."""
        kernel = causal_attention_fn(name, self.mesh.devices.flat[0].platform)
        if kernel is causal_attention:
            return None
        if kernel is splash_attention and self.sharded:  # a per-device kernel XLA cannot partition
            return self.rules.shard_attention(kernel)
        return kernel

    # --------------------------------------------------------------------- inside compiled steps
    def hook(self, bank: LoraBank, rows: jax.Array, *, one_hot: bool = False) -> LinearHook:
        """`lora.make_hook` for `bank` and each row's slot, laid out for the mesh (`one_hot` for decode steps)."""
        if not self.sharded:
            return make_hook(bank, rows, one_hot=one_hot)
        return self.rules.constraining_hook(make_hook(bank, rows, one_hot=one_hot,
                                                      layout=self.rules.adapter_layout()))

    def constrain_adapter(self, weights: LoraWeights) -> LoraWeights:
        """Pin one adapter's weights (or gradients) to their sharding."""
        if not self.sharded:
            return weights
        return _tree_constrain(weights, self._adapter_shardings(weights))

    def constrain_opt_state(self, opt_state: Any, weights: LoraWeights) -> Any:
        if not self.sharded:
            return opt_state
        return _tree_constrain(opt_state, self._opt_shardings(opt_state, weights))

    def constrain_cache(self, cache: KVCache) -> KVCache:
        if not self.sharded:
            return cache
        return _tree_constrain(cache, self.rules.kv_cache_shardings(cache))

    def constrain_rows(self, x: jax.Array) -> jax.Array:
        if not self.sharded:
            return x
        return jax.lax.with_sharding_constraint(x, self.rules.batch_sharding(x.shape))

    def constrain_prefix_entry(self, kv: jax.Array) -> jax.Array:
        if not self.sharded:
            return kv
        return jax.lax.with_sharding_constraint(kv, self.rules.sharding(PREFIX_ENTRY_AXES, kv.shape))
