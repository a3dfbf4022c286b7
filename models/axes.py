"""Logical axis names of every parameter, KV-cache entry and activation of `Transformer`.

The model names *what* each dimension is (`embed`, `heads`, `mlp`, ...) and nothing more; which
mesh axis a logical axis is split over is decided by one rules table outside `models/`
(`framework.sharding`), as maxtext does. This module is that naming, in one place:

- `param_axes(config)`: `{state path: logical axes}` for every parameter, derived from the same
  `weight_map` table the loader uses and checked against the module's state both ways
  (`check_param_axes`), so a parameter can be neither unnamed nor named twice.
- `PROJECTION_AXES`: the (input, output) logical axes of each `LinearHook` target.
- `activation_axes(...)`: the logical axes of a projection's input/output activations.
- `kv_cache_leaf_axes(ndim)`: the axes of a `KVCache` leaf (by rank, so fields added later that
  lead with the batch axis are covered).
- `axis_units(config)`: how many indivisible units a dimension of each logical axis holds. A
  projection's output is `N·H` wide, but it may only be split between whole heads, so `heads` has
  `N` units; a mesh axis that does not divide the units leaves the dimension replicated.

Parameters and activations use distinct names for the same feature (`embed` vs `act_embed`):
FSDP splits the weights' model dimension but never the activations', whose batch dimension it
splits instead.
"""

from __future__ import annotations

from typing import Any

from models.config import ModelConfig
from models.loading import weight_map

# Parameters.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"  # N·H: query heads (attention input of o_proj, output of q_proj)
KV_HEADS = "kv_heads"  # K·H
HEAD_DIM = "head_dim"  # H (q/k norm scales)
MLP = "mlp"
NORM = "norm"  # a D-wide norm scale
# Activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
# KV cache `[B, K, C, H]`.
CACHE_BATCH = "cache_batch"
CACHE_KV_HEADS = "cache_kv_heads"  # K (whole heads, not K·H)
CACHE_LENGTH = "cache_length"

LogicalAxes = tuple[str | None, ...]
StatePath = tuple[str | int, ...]

PROJECTION_AXES: dict[str, tuple[str, str]] = {
    "q": (EMBED, HEADS), "k": (EMBED, KV_HEADS), "v": (EMBED, KV_HEADS), "o": (HEADS, EMBED),
    "gate": (EMBED, MLP), "up": (EMBED, MLP), "down": (MLP, EMBED), "unembed": (EMBED, VOCAB),
}
"""`LinearHook` target -> logical axes of its `[d_in, d_out]` kernel (the unembedding's as `x @ W^T`)."""

_MODULE_TARGET = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                  "up_proj": "up", "down_proj": "down"}
_ACTIVATION = {EMBED: ACT_EMBED, HEADS: ACT_HEADS, KV_HEADS: ACT_KV_HEADS, MLP: ACT_MLP, VOCAB: ACT_VOCAB}


def _axes_of(path: StatePath) -> LogicalAxes:
    """Logical axes of the parameter at `path` (a path of `weight_map`)."""
    *module, leaf = path
    if path in (("embed",), ("lm_head",)):
        return (VOCAB, EMBED)  # both stored [V, D]
    if leaf == "scale":
        return (HEAD_DIM,) if module[-1] in ("q_norm", "k_norm") else (NORM,)
    target = _MODULE_TARGET[module[-1]]
    d_in, d_out = PROJECTION_AXES[target]
    return (d_in, d_out) if leaf == "kernel" else (d_out,)


def param_axes(config: ModelConfig) -> dict[StatePath, LogicalAxes]:
    """`{nnx state path: logical axes}` of every parameter of `Transformer(config)`."""
    return {spec.path: _axes_of(spec.path) for spec in weight_map(config)}


def check_param_axes(config: ModelConfig, state: Any) -> None:
    """Raise `AssertionError` unless `param_axes(config)` names exactly the parameters in `state`
    (an `nnx.State` of `Transformer(config)`), each with one axis name per dimension."""
    from flax import nnx

    flat = {path: v for path, v in nnx.to_flat_state(state)}
    table = param_axes(config)
    unnamed, stale = sorted(map(str, set(flat) - set(table))), sorted(map(str, set(table) - set(flat)))
    if unnamed or stale:
        raise AssertionError(f"param_axes disagrees with the model: unnamed {unnamed}, not in the model {stale}")
    for path, axes in table.items():
        ndim = len(flat[path].shape)
        if len(axes) != ndim:
            raise AssertionError(f"param_axes{path} = {axes} names {len(axes)} dimensions of a {ndim}-d parameter")


def activation_axes(axis: str, ndim: int) -> LogicalAxes:
    """Axes of an activation `[B, (T,) ..., d]` whose last dimension is the parameter axis `axis`."""
    return (BATCH, *([LENGTH] * (ndim - 2)), _ACTIVATION[axis])


def hidden_axes(ndim: int = 3) -> LogicalAxes:
    """Axes of the residual stream `[B, T, D]` (or `[B, D]`)."""
    return activation_axes(EMBED, ndim)


def logits_axes(ndim: int = 3) -> LogicalAxes:
    """Axes of logits `[B, T, V]` (or `[B, V]`)."""
    return activation_axes(VOCAB, ndim)


def kv_cache_leaf_axes(ndim: int) -> LogicalAxes:
    """Logical axes of a `KVCache` leaf of rank `ndim`: the `[B, K, C, H]` key/value buffers, or any
    per-row field leading with the batch axis (`lengths [B]`, ...)."""
    if ndim == 4:
        return (CACHE_BATCH, CACHE_KV_HEADS, CACHE_LENGTH, HEAD_DIM)
    return (CACHE_BATCH, *([None] * (ndim - 1)))


def axis_units(config: ModelConfig) -> dict[str, int]:
    """`{logical axis: indivisible units}` for axes whose dimension may only split between groups
    (whole heads); other axes split anywhere their size allows."""
    return {HEADS: config.num_heads, KV_HEADS: config.num_kv_heads, ACT_HEADS: config.num_heads,
            ACT_KV_HEADS: config.num_kv_heads, CACHE_KV_HEADS: config.num_kv_heads}
