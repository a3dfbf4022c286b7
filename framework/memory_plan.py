"""Memory planner: per-device bytes of an engine configuration on a mesh, before anything is allocated.

`plan_memory(model_config, ...)` sizes every long-lived buffer the engine holds, per device, by the
same sharding rules the engine places them with (`framework.sharding.MeshRules` over an abstract
mesh, so no device is needed): base parameters, the training and sampler adapter banks, the
gradient buffer, AdamW moments of every adapter, the sampling KV cache, and the peak activations of
one training step. `MemoryPlan.check()` refuses a configuration that does not fit the device, with
a message naming what to change; `MemoryPlan.report()` is the table `python -m launcher
plan_only=true` prints.

Activations are a model, not a measurement: per token and layer, the values the backward pass
keeps (residual stream, norms, q/k/v, attention probabilities, MLP gate/up, LoRA products), the
per-row adapter copies of `lora.make_hook`, and the fp32 logits, under the rematerialisation
policy (`models.remat`); with FSDP, the layers' gathered weights (`fsdp_gather`). Its coefficients
were fitted to what JAX keeps (`jax.ad_checkpoint.print_saved_residuals`) and what XLA allocates
(`compiled.memory_analysis()`: arguments and temporaries of a training step, on one device and on
8-device meshes); `tests/test_memory_plan.py` and `tests/test_sharding_mesh.py` hold them within 25%
on the tiny configs. XLA:CPU schedules a layer's recomputation early, so on CPU rematerialisation
saves nothing in practice; the estimate with remat is what a memory-aware scheduler (GPU/TPU) gets.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from framework.sharding import MESH_AXES, MeshConfig, MeshRules
from lora import ALL_TARGETS, target_shape
from lora import axes as lora_axes
from models import ModelConfig, axes
from models.remat import REMAT_NAMES

GIB = 1024**3
CAUSAL_BLOCK = 128  # models.transformer.CAUSAL_BLOCK: query blocks skip keys above the diagonal

# Activation model coefficients (values kept per token and layer, in units of the named width).
_KEPT_PER_LAYER = {"embed": 3.0, "mlp": 6.0, "q": 2.0, "kv": 3.0, "rank_per_target": 1.7}
_ATTENTION_COPIES = 2.25  # [B, N, T, keys] fp32 scores/probabilities kept (plus a bool mask, counted as 1/4)
_LOGITS_COPIES = 3.0  # fp32 [B, T, V] buffers live around the loss (logits, exp, their cotangent)


class MemoryPlanError(ValueError):
    """The configuration does not fit the device memory; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the engine is asked to hold and run (the engine config's sizes)."""

    batch: int = 8  # training rows per step (B), after bucketing
    seq_len: int = 512  # training sequence bucket (T)
    train_slots: int = 9  # training bank slots (max_adapters + 1 for "no adapter")
    sampler_slots: int = 9  # sampler bank slots
    adapters: int = 8  # adapters with AdamW state
    max_rank: int = 32
    targets: tuple[str, ...] = ALL_TARGETS
    sample_batch: int = 8  # decode rows (KV cache batch)
    sample_len: int = 1024  # KV cache capacity (prompt + new tokens)
    remat: str = "none"  # models.remat policy of the training forward
    fused_attention: bool = False  # attention that never materialises [T, keys] (cuDNN / splash)

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "train_slots", "max_rank", "sample_batch", "sample_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be >= 1, got {getattr(self, name)}")
        if self.remat not in REMAT_NAMES:
            raise ValueError(f"Workload.remat must be one of {', '.join(REMAT_NAMES)}, got {self.remat!r}")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes by component, and the device's capacity (None: unknown)."""

    components: dict[str, int]
    capacity: int | None
    mesh: dict[str, int]
    dtype: str
    workload: Workload
    headroom: float = 0.1  # fraction of the device kept free for XLA's workspace and fragmentation

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * (1.0 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    def report(self) -> str:
        """A table of the plan, one component per line."""
        w = self.workload
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"memory plan per device (mesh {mesh}, {self.dtype} params; train batch {w.batch} x {w.seq_len}, "
                 f"remat={w.remat}; KV cache {w.sample_batch} x {w.sample_len})"]
        for name, size in self.components.items():
            lines.append(f"  {name:<12} {_fmt(size):>11}")
        lines.append(f"  {'total':<12} {_fmt(self.total):>11}")
        if self.capacity is not None:
            lines.append(f"  {'device':<12} {_fmt(self.capacity):>11} ({_fmt(self.usable or 0)} usable, "
                         f"{self.headroom:.0%} headroom): " + ("fits" if self.fits else "DOES NOT FIT"))
        return "\n".join(lines)

    def advice(self) -> list[str]:
        """What to change, largest component first, when the plan does not fit."""
        if self.fits:
            return []
        over = self.total - (self.usable or 0)
        tips = {
            "params": "shard the base model over more devices (mesh.fsdp / mesh.tp), or load it in bfloat16",
            "activations": "lower the training batch or sequence bucket, or set remat=full (or dots)",
            "kv_cache": "lower the sampling batch or the KV cache length (max_seq_len)",
            "optimizer": "allow fewer concurrent adapters (max_adapters) or a lower max_rank",
            "adapters": "use fewer adapter slots (max_adapters, sampler_slots) or a lower max_rank",
            "gradients": "use fewer training slots (max_adapters) or a lower max_rank",
            "fsdp_gather": "split the weights over tp as well (mesh.tp), or enable rematerialisation",
        }
        ranked = sorted(self.components.items(), key=lambda kv: -kv[1])
        return [f"{_fmt(over)} over: " + "; ".join(f"{name} ({_fmt(size)}): {tips[name]}"
                                                   for name, size in ranked[:3] if name in tips)]

    def check(self) -> None:
        """Raise `MemoryPlanError` (saying what to change) unless the plan fits."""
        if not self.fits:
            raise MemoryPlanError(f"the configuration needs {_fmt(self.total)} per device but "
                                  f"{_fmt(self.usable or 0)} is usable:\n{self.report()}\n" + "\n".join(self.advice()))


def _fmt(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def device_capacity(device: jax.Device | None = None) -> int | None:
    """Bytes the device can allocate: what the backend reports (GPU/TPU), or for CPU devices their share
    of the host's physical memory; None when neither is known."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
        except (ValueError, OSError):
            return None
    return None


def abstract_rules(config: ModelConfig, mesh_shape: Sequence[int]) -> MeshRules:
    """The engine's sharding rules on a `(data, fsdp, tp)` mesh of that shape, without devices."""
    mesh = AbstractMesh(tuple(mesh_shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return MeshRules.for_model(mesh, config)


def _local(rules: MeshRules, logical: axes.LogicalAxes, shape: Sequence[int]) -> int:
    """Elements one device holds of an array of `shape` with those logical axes."""
    spec = rules.spec(logical, shape)
    n = 1
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        split = 1 if entry is None else math.prod(rules.mesh.shape[a] for a in ((entry,) if isinstance(entry, str)
                                                                                else entry))
        n *= size // split
    return n


def plan_memory(
    config: ModelConfig,
    *,
    dtype: str = "float32",
    mesh: MeshConfig | Sequence[int] = (1, 1, 1),
    num_devices: int | None = None,
    workload: Workload | None = None,
    adapter_dtype: str = "float32",
    capacity: int | None = None,
    headroom: float = 0.1,
    gathered_layers: int | None = None,
) -> MemoryPlan:
    """Per-device memory of an engine for `config` on a mesh (`MeshConfig` resolved over `num_devices`,
    default every visible device, or an explicit `(data, fsdp, tp)` shape).

    `gathered_layers`: how many layers' FSDP-gathered weights are live at once during a step. XLA's
    latency-hiding schedulers on GPU/TPU gather one layer ahead (2, the default there); XLA:CPU
    gathers every layer up front (the default on CPU)."""
    w = workload or Workload()
    if gathered_layers is None:
        gathered_layers = config.num_layers if jax.default_backend() == "cpu" else 2
    if isinstance(mesh, MeshConfig):
        mesh = mesh.shape(num_devices if num_devices is not None else jax.device_count())
    rules = abstract_rules(config, mesh)
    p_bytes, a_bytes = np.dtype(dtype).itemsize, np.dtype(adapter_dtype).itemsize

    params = sum(_local(rules, ax, _param_shape(config, path)) for path, ax in axes.param_axes(config).items())

    def bank(slots: int | None) -> int:
        total = 0
        for t in w.targets:
            layers, d_in, d_out = target_shape(config, t)
            lead = (layers,) if slots is None else (layers, slots)
            total += _local(rules, lora_axes.weight_axes(t, "a", slots=slots is not None), (*lead, d_in, w.max_rank))
            total += _local(rules, lora_axes.weight_axes(t, "b", slots=slots is not None), (*lead, w.max_rank, d_out))
        return total

    gathered = _fsdp_gathered(config, rules, gathered_layers) * p_bytes
    kv_shape = (w.sample_batch, config.num_kv_heads, w.sample_len, config.head_dim)
    kv = 2 * config.num_layers * _local(rules, axes.kv_cache_leaf_axes(4), kv_shape)
    components = {
        "params": params * p_bytes,
        "adapters": (bank(w.train_slots) + bank(w.sampler_slots)) * a_bytes,
        "gradients": bank(w.train_slots) * a_bytes,
        "optimizer": 2 * w.adapters * bank(None) * a_bytes,
        "kv_cache": kv * p_bytes,
        "activations": training_activations(config, rules, w, dtype),
        "fsdp_gather": gathered,
    }
    return MemoryPlan(components, capacity, dict(zip(MESH_AXES, mesh, strict=True)), str(np.dtype(dtype)), w,
                      headroom)


def _fsdp_gathered(config: ModelConfig, rules: MeshRules, layers: int) -> int:
    """Extra elements per device while parameters are all-gathered over `fsdp`: `layers` decoder layers'
    worth, plus the (un)embedding, each gathered to its `tp` shard."""
    if rules.mesh.shape["fsdp"] == 1:
        return 0
    no_fsdp = MeshRules(rules.mesh, {k: tuple(a for a in v if a != "fsdp") for k, v in rules.rules.items()},
                        rules.units)
    per_layer, other = 0, 0
    for path, ax in axes.param_axes(config).items():
        shape = _param_shape(config, path)
        extra = _local(no_fsdp, ax, shape) - _local(rules, ax, shape)
        if path[0] != "layers":
            other += extra
        elif path[1] == 0:  # every layer has the same parameters
            per_layer += extra
    return min(layers, config.num_layers) * per_layer + other


def _param_shape(config: ModelConfig, path: axes.StatePath) -> tuple[int, ...]:
    d, v = config.hidden_size, config.vocab_size
    if path in (("embed",), ("lm_head",)):
        return (v, d)
    *module, leaf = path
    if leaf == "scale":
        return (config.head_dim,) if module[-1] in ("q_norm", "k_norm") else (d,)
    target = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}[module[-1]]
    _, d_in, d_out = target_shape(config, target)
    return (d_in, d_out) if leaf == "kernel" else (d_out,)


def training_activations(config: ModelConfig, rules: MeshRules, w: Workload, dtype: str = "float32") -> int:
    """Peak bytes per device of one training step's activations (see the module docstring): what the
    forward keeps for the backward (`residual_bytes`), plus the loss's fp32 logits buffers and, under
    rematerialisation, the layer being recomputed."""
    kept, one_layer, logits = _activation_terms(config, rules, w, dtype)
    recompute = one_layer if w.remat != "none" else 0.0
    return int(kept + recompute + _LOGITS_COPIES * logits)


def residual_bytes(config: ModelConfig, rules: MeshRules, w: Workload, dtype: str = "float32") -> int:
    """Bytes per device the forward pass keeps for the backward pass under `w.remat`."""
    kept, _, logits = _activation_terms(config, rules, w, dtype)
    return int(kept + logits)


def _activation_terms(config: ModelConfig, rules: MeshRules, w: Workload, dtype: str) -> tuple[float, float, float]:
    """(values kept by all layers plus the final norm and unembedding, one layer's full set, one fp32
    `[B, T, V]` buffer), per device."""
    b, t = w.batch, w.seq_len
    # Per-device widths: rows over data x fsdp, heads / mlp / vocabulary over tp, as the rules place them.
    rows = _local(rules, (axes.BATCH,), (b,))
    d = config.hidden_size
    f = _local(rules, (axes.ACT_MLP,), (config.intermediate_size,))
    q = _local(rules, (axes.ACT_HEADS,), (config.q_size,))
    kv = _local(rules, (axes.ACT_KV_HEADS,), (config.kv_size,))
    heads = config.num_heads * q // config.q_size
    vocab = _local(rules, (axes.ACT_VOCAB,), (config.vocab_size,))
    act, f32 = np.dtype(dtype).itemsize, 4
    tokens = rows * t
    layer_targets = [x for x in w.targets if x != "unembed"]
    keys = t if t <= CAUSAL_BLOCK else CAUSAL_BLOCK * (math.ceil(t / CAUSAL_BLOCK) + 1) / 2
    attention = 0.0 if w.fused_attention else (_ATTENTION_COPIES * f32 + 0.25) * heads * keys
    k = _KEPT_PER_LAYER
    width = (k["embed"] * d + k["mlp"] * f + k["q"] * q + k["kv"] * kv) * act
    lora_rank = k["rank_per_target"] * len(layer_targets) * w.max_rank * f32
    per_token = width + attention + lora_rank + (2 * heads + 8) * f32
    per_row = sum(sum(target_shape(config, x)[1:]) for x in layer_targets) * w.max_rank * f32  # adapter copies
    one_layer = per_token * tokens + per_row * rows
    if w.remat == "none":
        layers = config.num_layers * one_layer
    else:  # the layer's input (with `dots`, the projections' outputs too) and its slice of the used slots
        saved = d if w.remat == "full" else 3 * d + 2 * f + q + 2 * kv
        layers = config.num_layers * (saved * act * tokens + per_row * min(b, w.train_slots))
    unembed = (2 * d * act + w.max_rank * f32) * tokens
    if "unembed" in w.targets:
        unembed += (d + vocab) * w.max_rank * f32 * rows
    return layers + unembed, one_layer, tokens * vocab * f32
