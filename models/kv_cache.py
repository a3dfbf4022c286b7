"""Fixed-capacity KV cache: prefill a right-padded prompt batch, then decode one token per row per step.

The cache holds keys and values as one array per layer, head-major `[B, K, C, H]` (C = capacity):
the layout attention reads, so a decode step neither transposes nor slices the cache. Each row's
fill level is `lengths [B]`. Row b's next token sits at position `lengths[b]`: decoding writes its
key/value there and attends to slots `0..lengths[b]`, so rows of different prompt lengths decode
together without any shifting. Prefill writes the whole padded prompt; slots past a row's length
hold pad garbage that the mask hides and later steps overwrite.

Shapes never depend on data, so `prefill` and `decode_step` each compile once per (B, T, C).
Wrap them in `jax.jit` (donating the cache) via `nnx.split`/`nnx.merge`, as `greedy_generate` does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.transformer import LinearHook, Transformer, attention, attention_to_head_major_kv, causal_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [B, K, C, H]
    values: tuple[jax.Array, ...]  # per layer [B, K, C, H]
    lengths: jax.Array  # [B] int32: number of positions filled per row

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int, dtype: jnp.dtype) -> KVCache:
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        layers = range(config.num_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def prefill(
    model: Transformer,
    tokens: jax.Array,
    lengths: jax.Array,
    cache: KVCache,
    *,
    hook: LinearHook | None = None,
    all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Run the prompts `tokens [B, T]` (right-padded to T ≤ capacity) into an empty cache.

    Returns the fp32 logits of each row's last prompt token `[B, V]` (or of every position
    `[B, T, V]` with `all_logits`) and the filled cache with `lengths` set.
    """
    t = tokens.shape[1]
    if t > cache.capacity:
        raise ValueError(f"prompt length {t} exceeds the KV cache capacity {cache.capacity}")
    keys, values = [], []
    mask = causal_mask(t)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        keys.append(k)
        values.append(v)
        return attention(q, k, v, mask)

    hidden = model.hidden_states(tokens, hook=hook, attend_fns=[attend] * model.config.num_layers)

    def fill(buffers: tuple[jax.Array, ...], layers: list[jax.Array]) -> tuple[jax.Array, ...]:
        return tuple(jax.lax.dynamic_update_slice(buf, x.transpose(0, 2, 1, 3).astype(buf.dtype), (0,) * 4)
                     for buf, x in zip(buffers, layers, strict=True))

    cache = KVCache(keys=fill(cache.keys, keys), values=fill(cache.values, values), lengths=lengths.astype(jnp.int32))
    if all_logits:
        return model.logits(hidden, hook=hook), cache
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return model.logits(last, hook=hook), cache


def decode_step(
    model: Transformer, tokens: jax.Array, cache: KVCache, *, hook: LinearHook | None = None
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (`tokens [B]`) at position `cache.lengths`; fp32 logits `[B, V]`.

    Rows whose cache is full keep overwriting their last slot; callers stop before that.
    """
    b = tokens.shape[0]
    capacity = cache.capacity
    pos = jnp.minimum(cache.lengths, capacity - 1)
    rows = jnp.arange(b)
    mask = (jnp.arange(capacity)[None, :] <= pos[:, None])[:, None, :]  # [B, 1, C]
    # Updated in place layer by layer (the buffers are donated under jit), never copied whole.
    keys, values = list(cache.keys), list(cache.values)

    def make_attend(i: int):
        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            # (rows, pos) are advanced indices around a slice: the update is [B, K, H]
            keys[i] = keys[i].at[rows, :, pos].set(k[:, 0].astype(keys[i].dtype))
            values[i] = values[i].at[rows, :, pos].set(v[:, 0].astype(values[i].dtype))
            return attention_to_head_major_kv(q, keys[i], values[i], mask)

        return attend

    attend_fns = [make_attend(i) for i in range(model.config.num_layers)]
    hidden = model.hidden_states(tokens[:, None], pos[:, None], hook=hook, attend_fns=attend_fns)
    new_cache = KVCache(tuple(keys), tuple(values), cache.lengths + 1)
    return model.logits(hidden[:, 0], hook=hook), new_cache


def extend(
    model: Transformer,
    tokens: jax.Array,
    start: jax.Array,
    lengths: jax.Array,
    cache: KVCache,
    *,
    hook: LinearHook | None = None,
    all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Feed right-padded `tokens [B, T]` (row b holds `lengths[b]` of them) at positions
    `start[b] .. start[b] + T - 1` of each row's cache, attending to everything the row holds before.

    `prefill` is the case `start = 0`; with `start > 0` the first `start[b]` positions must already
    hold the keys/values of the row's prefix (a prefix cache entry), so only the new tokens are
    computed. Needs `start[b] + T <= capacity` for every row (the caller sizes the cache). Returns the
    fp32 logits of each row's last fed token `[B, V]` (every position `[B, T, V]` with `all_logits`)
    and the cache with `lengths = start + lengths`.
    """
    t = tokens.shape[1]
    capacity = cache.capacity
    if t > capacity:
        raise ValueError(f"{t} tokens exceed the KV cache capacity {capacity}")
    start = start.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    mask = jnp.arange(capacity)[None, None, :] <= positions[:, :, None]  # [B, T, C]: causal over the whole row
    keys, values = list(cache.keys), list(cache.values)
    write = jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice(buf, x, (0, s, 0)))

    def make_attend(i: int):
        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            keys[i] = write(keys[i], k.transpose(0, 2, 1, 3).astype(keys[i].dtype), start)
            values[i] = write(values[i], v.transpose(0, 2, 1, 3).astype(values[i].dtype), start)
            return attention_to_head_major_kv(q, keys[i], values[i], mask)

        return attend

    attend_fns = [make_attend(i) for i in range(model.config.num_layers)]
    hidden = model.hidden_states(tokens, positions, hook=hook, attend_fns=attend_fns)
    new_cache = KVCache(tuple(keys), tuple(values), start + lengths.astype(jnp.int32))
    if all_logits:
        return model.logits(hidden, hook=hook), new_cache
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return model.logits(last, hook=hook), new_cache


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(4,))
def _jit_prefill(graphdef, state, tokens, lengths, cache, all_logits: bool):
    return prefill(nnx.merge(graphdef, state), tokens, lengths, cache, all_logits=all_logits)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _jit_decode(graphdef, state, tokens, cache):
    return decode_step(nnx.merge(graphdef, state), tokens, cache)


def greedy_generate(
    model: Transformer, tokens: jax.Array, lengths: jax.Array, max_new_tokens: int, capacity: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of right-padded prompts with the KV cache.

    Returns the new tokens `[B, max_new_tokens]` and the fp32 logits that chose each `[B, N, V]`.
    """
    b, t = tokens.shape
    capacity = capacity or t + max_new_tokens
    if int(jnp.max(lengths)) + max_new_tokens > capacity:
        raise ValueError(f"capacity {capacity} < longest prompt + max_new_tokens")
    graphdef, state = nnx.split(model)
    cache = KVCache.empty(model.config, b, capacity, model.dtype)
    logits, cache = _jit_prefill(graphdef, state, tokens, lengths, cache, False)
    out_tokens, out_logits = [], []
    for step in range(max_new_tokens):
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out_tokens.append(next_tokens)
        out_logits.append(logits)
        if step + 1 < max_new_tokens:
            logits, cache = _jit_decode(graphdef, state, next_tokens, cache)
    return jnp.stack(out_tokens, axis=1), jnp.stack(out_logits, axis=1)
