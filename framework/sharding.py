"""Sharding over a `jax.sharding.Mesh`: mesh from config, one rules table, `NamedSharding` pytrees.

`models.axes` and `lora.axes` name the *logical* axes of every parameter, adapter weight, KV-cache
entry and activation; `RULES` below is the only place that maps them to the mesh axes
`("data", "fsdp", "tp")`:

- `data`: pure data parallelism (batch split, everything else replicated);
- `fsdp`: batch split *and* the weights' model dimension (`embed`) split, gathered layer by layer
  on use (ZeRO-3); the default axis, so a plain `MeshConfig()` spreads both the base model and
  the batch over every visible device;
- `tp`: tensor parallelism over heads / MLP width / vocabulary (Megatron-style column/row split).

A dimension that a mesh axis does not divide (or, for head dimensions, whose number of heads it
does not divide) is replicated over that axis and logged once, never an error: the tiny test
models and odd vocabularies run on any mesh.

How the engine uses this: see `docs/sharding.md`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora import LoraBank, LoraWeights
from lora import axes as lora_axes
from models import ModelConfig, axes
from models.transformer import LinearHook

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tp")
BATCH_MESH_AXES: tuple[str, ...] = ("data", "fsdp")

RULES: dict[str, tuple[str, ...]] = {
    # parameters
    axes.VOCAB: ("tp",),
    axes.EMBED: ("fsdp",),
    axes.HEADS: ("tp",),
    axes.KV_HEADS: ("tp",),
    axes.MLP: ("tp",),
    axes.HEAD_DIM: (),
    axes.NORM: (),
    lora_axes.LAYERS: (),
    lora_axes.SLOT: (),
    lora_axes.RANK: (),
    # adapter weights: as their kernel, and over fsdp too (they are trained: ZeRO-3 gradients and moments)
    lora_axes.ADAPTER_AXES[axes.EMBED]: ("fsdp",),
    lora_axes.ADAPTER_AXES[axes.HEADS]: ("tp", "fsdp"),
    lora_axes.ADAPTER_AXES[axes.KV_HEADS]: ("tp", "fsdp"),
    lora_axes.ADAPTER_AXES[axes.MLP]: ("tp", "fsdp"),
    lora_axes.ADAPTER_AXES[axes.VOCAB]: ("tp", "fsdp"),
    # activations
    axes.BATCH: BATCH_MESH_AXES,
    axes.LENGTH: (),
    axes.ACT_EMBED: (),
    axes.ACT_HEADS: ("tp",),
    axes.ACT_KV_HEADS: ("tp",),
    axes.ACT_MLP: ("tp",),
    axes.ACT_VOCAB: ("tp",),
    # KV cache
    axes.CACHE_BATCH: BATCH_MESH_AXES,
    axes.CACHE_KV_HEADS: ("tp",),
    axes.CACHE_LENGTH: (),
}
"""Logical axis -> mesh axes it is split over, in order (an empty tuple: replicated)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape: devices along `data`, `fsdp` and `tp`. One axis may be -1: all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(f"MeshConfig.{name} must be a positive integer or -1 (the rest), got {value!r}")
        if [getattr(self, n) for n in MESH_AXES].count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """`(data, fsdp, tp)` for `num_devices`, the -1 axis resolved."""
        sizes = [getattr(self, n) for n in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices are not a multiple of the fixed axes' "
                                 f"product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"MeshConfig {self} needs {math.prod(sizes)} devices but {num_devices} are visible; "
                             "set one of mesh.data / mesh.fsdp / mesh.tp to -1 to take the rest")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The `("data", "fsdp", "tp")` mesh over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = (config or MeshConfig()).shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


_logged: set[tuple[Any, ...]] = set()


def _log_once(key: tuple[Any, ...], message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and the rules that place logical axes on it; makes `PartitionSpec`s and `NamedSharding`s.

    `units[axis]` is the number of indivisible groups in a dimension of that logical axis (heads);
    a dimension is split over a mesh axis only if the mesh axis divides its units (or its size).
    """

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(RULES))
    units: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_model(cls, mesh: Mesh, config: ModelConfig, rules: Mapping[str, tuple[str, ...]] | None = None
                  ) -> MeshRules:
        """Rules for `config`'s dimensions: head dimensions (and their adapters') split between whole heads,
        so an adapter's output is laid out as its kernel's."""
        units = axes.axis_units(config)
        units.update({lora_axes.ADAPTER_AXES[a]: n for a, n in units.items() if a in lora_axes.ADAPTER_AXES})
        return cls(mesh, dict(RULES if rules is None else rules), units)

    def spec(self, logical: axes.LogicalAxes, shape: Sequence[int]) -> PartitionSpec:
        """The `PartitionSpec` of an array of `shape` whose dimensions have the `logical` axes."""
        if len(logical) != len(shape):
            raise ValueError(f"logical axes {logical} do not match the shape {tuple(shape)}")
        used: set[str] = set()
        entries: list[str | tuple[str, ...] | None] = []
        for name, size in zip(logical, shape, strict=True):
            if name is None:
                entries.append(None)
                continue
            if name not in self.rules:
                raise KeyError(f"logical axis {name!r} has no sharding rule; rules: {sorted(self.rules)}")
            wanted = [a for a in self.rules[name] if a not in used and self.mesh.shape[a] > 1]
            units = self.units.get(name, size)
            chosen: list[str] = []
            for a in wanted:  # in order, every wanted axis that still divides the dimension
                n = math.prod(self.mesh.shape[b] for b in [*chosen, a])
                if units % n == 0 and size % n == 0:
                    chosen.append(a)
            if len(chosen) < len(wanted):
                dropped = [a for a in wanted if a not in chosen]
                _log_once((name, size, units, tuple(dropped), tuple(self.mesh.shape.items())),
                          f"sharding: {name} dimension of size {size}" + (f" ({units} heads)" if units != size else "")
                          + f" does not divide over mesh axes {dropped} "
                          f"({', '.join(f'{a}={self.mesh.shape[a]}' for a in dropped)}): replicated over them")
            used.update(chosen)
            entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
        return PartitionSpec(*entries)

    def sharding(self, logical: axes.LogicalAxes, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # ------------------------------------------------------------------------------- pytrees
    def param_shardings(self, config: ModelConfig, state: nnx.State) -> nnx.State:
        """An `nnx.State` like `state` (the model's params, abstract or not) holding `NamedSharding`s."""
        table = axes.param_axes(config)
        return nnx.from_flat_state([(path, v.replace(value=self.sharding(table[path], v.shape)))
                                    for path, v in nnx.to_flat_state(state)])

    def param_sharding_map(self, config: ModelConfig, state: nnx.State) -> dict[axes.StatePath, NamedSharding]:
        """`{state path: NamedSharding}` (what `models.load_checkpoint(shardings=...)` takes)."""
        table = axes.param_axes(config)
        return {path: self.sharding(table[path], v.shape) for path, v in nnx.to_flat_state(state)}

    def adapter_shardings(self, weights: LoraWeights, *, slots: bool) -> LoraWeights:
        """Shardings for adapter weights: a bank's (`slots=True`, `[L, S, ...]`) or one adapter's."""
        return {t: {k: self.sharding(lora_axes.weight_axes(t, k, slots=slots), w.shape) for k, w in ab.items()}
                for t, ab in weights.items()}

    def bank_shardings(self, bank: LoraBank) -> LoraBank:
        """A `LoraBank` of shardings for `bank` (also right for a gradient buffer of its weights)."""
        return LoraBank(self.adapter_shardings(bank.weights, slots=True),
                        self.sharding(lora_axes.SCALES_AXES, bank.scales.shape))

    def opt_state_shardings(self, init: Callable[[Any], Any], opt_state: Any, weight_shardings: LoraWeights) -> Any:
        """Shardings for an optax state made by `init(weights)` (e.g. `framework.optim.init_opt_state`):
        every weight-shaped subtree (Adam's moments) as its weights, scalars replicated."""
        return optax.tree_map_params(init, lambda _, s: s, opt_state, weight_shardings,
                                     transform_non_params=lambda _: self.replicated())

    def kv_cache_shardings(self, cache: Any) -> Any:
        """A pytree like `cache` (a `models.kv_cache.KVCache`) of shardings."""
        return jax.tree.map(lambda x: self.sharding(axes.kv_cache_leaf_axes(x.ndim), x.shape), cache)

    def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """An input of `shape` `[B, ...]` (tokens, targets, weights, slot ids): split by rows."""
        return self.sharding((axes.BATCH, *([None] * (len(shape) - 1))), shape)

    def batch_shardings(self, tree: Any) -> Any:
        """`batch_sharding` for every leaf of `tree` (scalars replicated)."""
        return jax.tree.map(lambda x: self.batch_sharding(np.shape(x)) if np.ndim(x) else self.replicated(), tree)

    def adapter_layout(self) -> Callable[[str, str, jax.Array], jax.Array]:
        """For `lora.make_hook(layout=...)`: pins one layer's adapter slice (`A [S, d_in, R]` /
        `B [S, R, d_out]`) to the layout its product is computed in: gathered over `fsdp` (as FSDP gathers
        a kernel on use), split over `tp` like its kernel. Without it XLA cannot move the bank's
        fsdp-split dimension to the rows of the per-row adapter copies and replicates it involuntarily."""
        compute = MeshRules(self.mesh, {k: tuple(a for a in v if a != "fsdp") for k, v in self.rules.items()},
                            self.units)

        def layout(target: str, key: str, w: jax.Array) -> jax.Array:
            logical = lora_axes.weight_axes(target, key, slots=True)[1:]  # one layer: no layer axis
            return jax.lax.with_sharding_constraint(w, compute.sharding(logical, w.shape))

        return layout

    # ---------------------------------------------------------------------------- activations
    def constrain(self, x: jax.Array, logical: axes.LogicalAxes) -> jax.Array:
        """`with_sharding_constraint` of `x` to its logical axes (inside `jit`)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    def constraining_hook(self, hook: LinearHook | None = None) -> LinearHook:
        """A `LinearHook` that applies `hook` (e.g. `lora.make_hook`'s) and then pins the projection's
        output activation to its logical axes: batch-split rows, heads / MLP / vocabulary over `tp`,
        the residual stream's model dimension whole. One constraint per projection pins every layer's
        activations, so XLA never chooses to shard a weight-sized dimension of an activation."""

        def constrained(layer: int, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
            if hook is not None:
                y = hook(layer, target, x, y)
            return self.constrain(y, axes.activation_axes(axes.PROJECTION_AXES[target][1], y.ndim))

        return constrained


    def shard_attention(self, attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
                        ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """`attend(q, k, v)`, a per-device kernel XLA cannot partition (the Pallas splash kernel), run
        under `shard_map`: rows split like the batch, heads over `tp` when both the query and the kv heads
        split (a shard then holds whole query groups with their kv heads), T and H whole on every device."""

        def sharded(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            q_spec = self.spec((axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.HEAD_DIM), q.shape)
            kv_spec = self.spec((axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, axes.HEAD_DIM), k.shape)
            if q_spec[2] != kv_spec[2]:
                q_spec = PartitionSpec(q_spec[0], None, None, None)
                kv_spec = PartitionSpec(kv_spec[0], None, None, None)
            return jax.shard_map(attend, mesh=self.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                                 check_vma=False)(q, k, v)

        return sharded


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of `tree` onto `shardings` (a matching pytree, or one sharding for all leaves)."""
    return jax.device_put(tree, shardings)
