"""The adapter bank: every tenant's LoRA weights in one pytree with a leading slot axis.

For target linear `y = x W` and slot s: `y' = y + scale[s] · (x A[s]) B[s]`, where per target
`A [L, S, d_in, R]`, `B [L, S, R, d_out]` (L = decoder layers; 1 for the unembedding), R the bank's
maximum rank, `scale[s] = alpha / rank` of the adapter in slot s (0 for an empty slot).

- An adapter of rank r < R occupies columns `:r` of A and rows `:r` of B; the rest is zero and stays
  zero under training (its gradient is exactly zero because B starts at zero, and AdamW keeps zeros).
- Targets an adapter does not train (e.g. `train_mlp=False`) are all-zero in its slot for the same
  reason, so one compiled program serves adapters with different target sets.
- Rows of a batch carry their slot id; `make_hook` gathers each row's `A`/`B` (per row, never per
  token), or for one-token decode rows multiplies by every slot under a one-hot weight, and applies
  the low-rank update through the models' `LinearHook`.
- Everything here is a pure function over pytrees; slots are data, so writing or clearing one never
  changes a traced shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from models import ModelConfig
from models.transformer import UNEMBED_LAYER, LinearHook

ATTN_TARGETS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_TARGETS: tuple[str, ...] = ("gate", "up", "down")
UNEMBED_TARGET = "unembed"
ALL_TARGETS: tuple[str, ...] = (*ATTN_TARGETS, *MLP_TARGETS, UNEMBED_TARGET)
DEFAULT_ALPHA = 32.0
"""LoRA alpha used when none is given: scale = 32 / rank (1.0 at rank 32, as tinker's recommended rank)."""

LoraWeights = dict[str, dict[str, jax.Array]]
"""`{target: {"a": [L, S, d_in, R], "b": [L, S, R, d_out]}}` (bank) or without the S axis (one adapter)."""


def select_targets(*, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True) -> tuple[str, ...]:
    """Target names for tinker's `LoraConfig` flags."""
    targets = (ATTN_TARGETS if train_attn else ()) + (MLP_TARGETS if train_mlp else ())
    targets += (UNEMBED_TARGET,) if train_unembed else ()
    if not targets:
        raise ValueError("LoRA config trains nothing: set at least one of train_attn, train_mlp, train_unembed")
    return targets


def target_shape(config: ModelConfig, target: str) -> tuple[int, int, int]:
    """(layers, d_in, d_out) of a target linear."""
    d, f = config.hidden_size, config.intermediate_size
    dims = {"q": (d, config.q_size), "k": (d, config.kv_size), "v": (d, config.kv_size), "o": (config.q_size, d),
            "gate": (d, f), "up": (d, f), "down": (f, d), "unembed": (d, config.vocab_size)}
    if target not in dims:
        raise ValueError(f"unknown LoRA target {target!r}; targets: {', '.join(ALL_TARGETS)}")
    layers = 1 if target == UNEMBED_TARGET else config.num_layers
    return (layers, *dims[target])


def lora_relative_flops(config: ModelConfig, targets: Iterable[str], rank: int) -> float:
    """One adapter's low-rank products per token, as a fraction of the base model's linear layers' FLOPs."""
    lora = sum(layers * rank * (d_in + d_out) for layers, d_in, d_out in map(
        functools.partial(target_shape, config), targets))
    base = sum(layers * d_in * d_out for layers, d_in, d_out in map(functools.partial(target_shape, config),
                                                                     ALL_TARGETS))
    return lora / base


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraBank:
    weights: LoraWeights
    scales: jax.Array  # [S] fp32, alpha / rank per slot, 0 where the slot is empty

    @property
    def num_slots(self) -> int:
        return self.scales.shape[0]

    @property
    def max_rank(self) -> int:
        return next(iter(self.weights.values()))["a"].shape[-1]


def empty_bank(
    config: ModelConfig, num_slots: int, max_rank: int, *, targets: Iterable[str] = ALL_TARGETS,
    dtype: jnp.dtype = jnp.float32,
) -> LoraBank:
    weights = {}
    for t in targets:
        layers, d_in, d_out = target_shape(config, t)
        weights[t] = {"a": jnp.zeros((layers, num_slots, d_in, max_rank), dtype),
                      "b": jnp.zeros((layers, num_slots, max_rank, d_out), dtype)}
    return LoraBank(weights, jnp.zeros((num_slots,), jnp.float32))


def init_adapter(
    config: ModelConfig, *, rank: int, seed: int, targets: Iterable[str], bank_targets: Iterable[str],
    max_rank: int, dtype: jnp.dtype = jnp.float32,
) -> LoraWeights:
    """A fresh adapter laid out for one bank slot: A ~ U(±1/sqrt(d_in)) (as PEFT), B = 0.

    Columns past `rank` and targets not in `targets` are zero. Each target draws from its own
    stream seeded by `(seed, target index)`, so the same seed gives the same adapter.
    """
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}], got {rank}")
    targets = set(targets)
    out: LoraWeights = {}
    for ti, t in enumerate(bank_targets):
        layers, d_in, d_out = target_shape(config, t)
        a = np.zeros((layers, d_in, max_rank), np.float32)
        if t in targets:  # numpy, not jax.random: no per-shape compile, and just as reproducible
            bound = 1.0 / d_in**0.5
            rng = np.random.default_rng([seed % 2**63, ti])
            a[:, :, :rank] = rng.uniform(-bound, bound, (layers, d_in, rank))
        a = jnp.asarray(a, dtype)
        out[t] = {"a": a, "b": jnp.zeros((layers, max_rank, d_out), dtype)}
    return out


def write_slot(bank: LoraBank, slot: jax.Array | int, adapter: LoraWeights, scale: jax.Array | float) -> LoraBank:
    """Bank with `adapter` in `slot` (other slots untouched)."""
    weights = {t: {k: w.at[:, slot].set(adapter[t][k].astype(w.dtype)) for k, w in ab.items()}
               for t, ab in bank.weights.items()}
    return LoraBank(weights, bank.scales.at[slot].set(scale))


def read_slot(bank: LoraBank, slot: jax.Array | int) -> LoraWeights:
    """The adapter in `slot` (`{target: {"a": [L, d_in, R], "b": [L, R, d_out]}}`)."""
    return {t: {k: w[:, slot] for k, w in ab.items()} for t, ab in bank.weights.items()}


ONE_HOT_MAX_SLOTS = 2
"""Decode steps over at most this many slots run faster with `make_hook(..., one_hot=True)`: measured on
CPU (bench Qwen3, rank 32), 8 rows of one snapshot decode ~1.6x faster one-hot than gathered, 8 rows
of 8 snapshots ~5-10% slower (the gathered copies are loop-invariant, so a decode loop makes them once)."""


def make_hook(
    bank: LoraBank, slot_ids: jax.Array, *, one_hot: bool = False, compute_dtype: jnp.dtype | None = None,
    layout: Callable[[str, str, jax.Array], jax.Array] | None = None,
) -> LinearHook:
    """A `LinearHook` adding each row's adapter: `slot_ids [B]` picks the slot of every batch row (with
    `one_hot`, `slot_ids [B, T]` may pick each token's: rows holding several adapters' sequences).

    `compute_dtype` (default: the bank's dtype) is the dtype of the low-rank products. An fp32 bank
    (master weights, hence fp32 gradients and AdamW moments) under a bf16 model takes bf16 here, so
    its products run at the model's precision; gradients still flow back to the fp32 weights.
    `layout(target, "a" | "b", w)` is applied to each layer's `A [S, d_in, R]` / `B [S, R, d_out]` where
    it is used: on a mesh, `framework.sharding.MeshRules.adapter_layout()` gathers it there, the way
    FSDP gathers a kernel.

    Two evaluations of the same sum:
    - by default, gather each row's `A`/`B` and run batched matmuls: right for rows of many tokens
      (training, prefill), where one copy of the row's adapter serves all its tokens;
    - `one_hot=True`, for rows of one token (decode steps): every slot's `A`/`B` is laid out once, here,
      as `[d_in, S·R]` / `[S·R, d_out]`, and each projection runs two plain matmuls over all slots, a
      one-hot weight keeping each row's own slot: plain matmuls instead of per-row batched ones, at
      FLOPs that grow with the slots, so it pays for few slots (`ONE_HOT_MAX_SLOTS`). Build the hook
      outside a decode loop, so the layout is done once per loop rather than once per step. The same
      serves training rows that mix adapters, per token (no per-row copies of the weights). Every slot
      then touches every row (0 · NaN = NaN), so banks used this way must hold finite weights: the
      engine refuses non-finite sampler snapshots, and reruns a mixed training batch unmixed when any
      result is not finite.
    """

    def laid_out(target: str, key: str, w: jax.Array) -> jax.Array:
        if layout is not None:
            w = layout(target, key, w)
        return w if compute_dtype is None else w.astype(compute_dtype)

    if one_hot:
        return _one_hot_hook(bank, slot_ids, laid_out)
    scales = bank.scales[slot_ids]
    # Split by layer here, once: inside a decode loop, slicing the stacked arrays in every step copies them.
    layers = {t: (list(ab["a"]), list(ab["b"])) for t, ab in bank.weights.items()}

    def hook(layer: int, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if target not in layers:
            return y
        li = 0 if layer == UNEMBED_LAYER else layer
        a = laid_out(target, "a", layers[target][0][li])[slot_ids]  # [B, d_in, R]
        b = laid_out(target, "b", layers[target][1][li])[slot_ids]  # [B, R, d_out]
        h = jnp.einsum("b...i,bir->b...r", x.astype(a.dtype), a)
        h = h * scales.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype)
        return y + jnp.einsum("b...r,bro->b...o", h, b).astype(y.dtype)

    return hook


def _one_hot_hook(bank: LoraBank, slot_ids: jax.Array,
                  laid_out: Callable[[str, str, jax.Array], jax.Array]) -> LinearHook:
    """`make_hook(..., one_hot=True)`."""
    slots, rank = bank.num_slots, bank.max_rank
    weight = jax.nn.one_hot(slot_ids, slots, dtype=jnp.float32) * bank.scales  # [B, S] or per token [B, T, S]
    flat: dict[str, tuple[list[jax.Array], list[jax.Array]]] = {}
    for t, ab in bank.weights.items():
        a_layers = [laid_out(t, "a", a) for a in ab["a"]]  # [S, d_in, R] each
        b_layers = [laid_out(t, "b", b) for b in ab["b"]]  # [S, R, d_out] each
        flat[t] = ([a.transpose(1, 0, 2).reshape(a.shape[1], slots * rank) for a in a_layers],
                   [b.reshape(slots * rank, b.shape[-1]) for b in b_layers])

    def hook(layer: int, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if target not in flat:
            return y
        li = 0 if layer == UNEMBED_LAYER else layer
        a, b = flat[target][0][li], flat[target][1][li]  # [d_in, S·R], [S·R, d_out]
        h = (x.astype(a.dtype) @ a).reshape(*x.shape[:-1], slots, rank)
        h = h * weight.reshape(weight.shape[:-1] + (1,) * (h.ndim - weight.ndim - 1) + (slots, 1)).astype(h.dtype)
        return y + (h.reshape(*x.shape[:-1], slots * rank) @ b).astype(y.dtype)

    return hook
