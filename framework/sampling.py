"""Batched sampling: prefill + a `while_loop` decode over the KV cache, with per-row sampling settings.

`generate` is pure and traceable; the engine calls it inside its own `jax.jit`, with the adapter
bank's `LinearHook` (or None for the base model). What is unusual, and why:

- Every row carries its own temperature / top-k / top-p / token budget / stop tokens / PRNG key,
  so requests with different settings and adapters share one compiled program; settings are data.
- A row's draw at step s uses `fold_in(keys[b], s)` and a per-row `categorical`, so its tokens
  depend only on its own key, prompt and adapter, never on which rows share the batch.
- The logprob reported for a sampled token is the raw model log-probability (log-softmax of the
  fp32 logits before temperature and truncation): exactly what a training forward pass computes
  for the same sequence, which is what importance-sampling / PPO losses need.
- Top-k / top-p are decided on the `CANDIDATES` most likely tokens of each row (`lax.top_k`), not
  on a sort of the whole vocabulary, whenever that is exact: every truncating row has top-k ≤
  `CANDIDATES`, or its nucleus closes inside them. Otherwise (a very flat distribution, a huge
  top-k) a `lax.cond` falls back to the full sort. On CPU at V=151936 the sort takes ~290 ms for
  8 rows (2.4 s for 64), `top_k(1024)` 6 ms (52 ms). A batch with no truncating row skips both.
- The loop exits as soon as every row is done (stop token emitted or budget spent). Rows that are
  done keep riding along in the batch (their tokens are masked to 0) until then.

Stop *strings* need the tokenizer, so they are handled on the host by `truncate_at_stop_strings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import KVCache, decode_step, prefill
from models.transformer import LinearHook, Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Sampling settings, one entry per batch row (all arrays have a leading `[B]` axis)."""

    temperature: jax.Array  # [B] f32; 0 = greedy
    top_p: jax.Array  # [B] f32; >= 1 = off
    top_k: jax.Array  # [B] int32; <= 0 = off
    max_tokens: jax.Array  # [B] int32; the row's budget (capped by the static max_new)
    keys: jax.Array  # [B] typed PRNG keys, each row's own stream
    stop_tokens: jax.Array  # [B, M] int32, padded with -1

    @classmethod
    def create(
        cls,
        keys: jax.Array,
        *,
        temperature: float | np.ndarray = 1.0,
        top_p: float | np.ndarray = 1.0,
        top_k: int | np.ndarray = -1,
        max_tokens: int | np.ndarray,
        stop_tokens: list[list[int]] | np.ndarray | None = None,
        num_stop: int | None = None,
    ) -> RowParams:
        """Broadcast scalars to the batch (`keys.shape[0]` rows) and pad stop lists to `num_stop` (≥ 1)."""
        b = keys.shape[0]
        if stop_tokens is None or isinstance(stop_tokens, list):
            lists = stop_tokens or [[]] * b
            if len(lists) != b:
                raise ValueError(f"stop_tokens has {len(lists)} rows for a batch of {b}")
            width = num_stop or max([1, *map(len, lists)])
            if any(len(s) > width for s in lists):
                raise ValueError(f"a row has more than num_stop={width} stop tokens")
            stop = np.full((b, width), -1, np.int32)
            for row, ids in enumerate(lists):
                stop[row, : len(ids)] = ids
        else:
            stop = np.asarray(stop_tokens, np.int32)

        def rows(value, dtype):
            return jnp.broadcast_to(jnp.asarray(value, dtype), (b,))

        return cls(temperature=rows(temperature, jnp.float32), top_p=rows(top_p, jnp.float32),
                   top_k=rows(top_k, jnp.int32), max_tokens=rows(max_tokens, jnp.int32), keys=keys,
                   stop_tokens=jnp.asarray(stop))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [B, N] int32; 0 past num_tokens
    logprobs: jax.Array  # [B, N] f32 raw model logprob of each token; 0 past num_tokens
    num_tokens: jax.Array  # [B] int32, the stop token included
    hit_stop_token: jax.Array  # [B] bool: stopped on a stop token (else: budget spent)
    topk_ids: jax.Array | None = None  # [B, N, k] int32 with `topk_logprobs=k`, else None
    topk_logprobs: jax.Array | None = None  # [B, N, k] f32 raw logprobs of the k most likely tokens


def sample_keys(seed: int, num_samples: int) -> jax.Array:
    """`[num_samples]` keys `fold_in(key(seed), i)`: the streams of one request's samples.

    The full 64-bit seed counts (`jax.random.key` alone keeps only the low 32 bits when x64 is off,
    so seeds 5 and 2**40 + 5 would collide); for seeds below 2**32 this equals `jax.random.key(seed)`.
    """
    seed %= 2**64
    root = jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, jnp.arange(num_samples, dtype=jnp.uint32))


CANDIDATES = 1024
"""Tokens per row among which top-k / top-p are decided when that is exact (see the module doc)."""


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set `logits [B, V]` outside each row's top-k, then nucleus (top-p), to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability (after top-k) reaches
    `top_p`, and always the most likely token. Tokens tied with the last kept one are kept too.
    Decided on the `CANDIDATES` most likely tokens when that gives the same answer, else on a sort
    of the whole vocabulary.
    """
    v = logits.shape[-1]
    if v <= CANDIDATES:
        return _filter_ranked(logits, jnp.sort(logits, axis=-1, descending=True), top_k, top_p)
    top, _ = jax.lax.top_k(logits, CANDIDATES)  # [B, C], descending
    # Where top-k is off, the nucleus is measured against the whole vocabulary's probability mass.
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    mass = jnp.sum(jnp.exp(top - logz), axis=-1)  # of the candidates, in the untruncated distribution
    exact = (top_k <= 0) & ((top_p >= 1.0) | (mass >= top_p)) | (top_k > 0) & (top_k <= CANDIDATES)
    return jax.lax.cond(
        jnp.all(exact),
        lambda x: _filter_ranked(x, top, top_k, top_p, logz=jnp.where(top_k[:, None] > 0, jnp.nan, logz)),
        lambda x: _filter_ranked(x, jnp.sort(x, axis=-1, descending=True), top_k, top_p),
        logits)


def _filter_ranked(logits: jax.Array, ranked: jax.Array, top_k: jax.Array, top_p: jax.Array,
                   logz: jax.Array | None = None) -> jax.Array:
    """`filter_logits` given the row's most likely logits `ranked [B, R]` in descending order, R ≤ V.

    With R < V, `logz [B, 1]` is the log-normaliser over the whole vocabulary for rows without
    top-k (NaN for rows with top-k, which normalise over their own top-k, all among the R). The
    caller guarantees the kept set lies inside the R.
    """
    r = ranked.shape[-1]
    rank = jnp.arange(r)[None, :]
    in_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    masked = jnp.where(in_k, ranked, -jnp.inf)
    own = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    probs = jnp.exp(masked - (own if logz is None else jnp.where(jnp.isnan(logz), own, logz)))
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    keep = in_k & ((top_p[:, None] >= 1.0) | (before < top_p[:, None]) | (rank == 0))
    last = jnp.sum(keep, axis=-1, keepdims=True) - 1  # keep is a prefix of the ranking
    threshold = jnp.take_along_axis(ranked, last, axis=-1)
    # A row that truncates nothing (top-k off, top-p 1) keeps all, even past the R candidates.
    threshold = jnp.where((top_k[:, None] <= 0) & (top_p[:, None] >= 1.0), -jnp.inf, threshold)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, params: RowParams, step: jax.Array) -> jax.Array:
    """One token per row `[B]` from fp32 `logits [B, V]`; `step` (scalar or `[B]`) is the index of the
    token each row draws, so a row's draws depend only on its own key and position in its output."""
    temperature = params.temperature
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    truncating = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
    scaled = jax.lax.cond(truncating, lambda x: filter_logits(x, params.top_k, params.top_p), lambda x: x, scaled)
    step_keys = jax.vmap(jax.random.fold_in)(params.keys, jnp.broadcast_to(step, params.keys.shape))
    drawn = jax.vmap(jax.random.categorical)(step_keys, scaled)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


class _Carry(NamedTuple):
    step: jax.Array  # scalar int32: the output column written next
    logits: jax.Array  # [B, V] fp32 logits that choose column `step`
    cache: KVCache
    done: jax.Array  # [B] bool
    out: SampleOutput


def _emit(carry: _Carry, params: RowParams, budget: jax.Array) -> tuple[_Carry, jax.Array]:
    """Choose and record the token of column `carry.step` for every row not yet done (0 for the others)."""
    out, step, logits = carry.out, carry.step, carry.logits
    active = ~carry.done
    token = jnp.where(active, choose_tokens(logits, params, step), 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - logz
    logprob = jnp.where(active, logprob, 0.0)
    hit = active & jnp.any(token[:, None] == params.stop_tokens, axis=-1)
    num_tokens = out.num_tokens + active.astype(jnp.int32)
    put = lambda buf, col: jax.lax.dynamic_update_index_in_dim(buf, col, step, axis=1)
    topk_ids, topk_logprobs = out.topk_ids, out.topk_logprobs
    if topk_ids is not None:
        top_values, top_ids = jax.lax.top_k(logits, topk_ids.shape[-1])
        topk_ids = put(topk_ids, jnp.where(active[:, None], top_ids, 0))
        topk_logprobs = put(topk_logprobs, jnp.where(active[:, None], top_values - logz[:, None], 0.0))
    out = SampleOutput(
        tokens=put(out.tokens, token), logprobs=put(out.logprobs, logprob), num_tokens=num_tokens,
        hit_stop_token=out.hit_stop_token | hit, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
    )
    done = carry.done | hit | (num_tokens >= budget)
    return carry._replace(step=step + 1, done=done, out=out), token


def generate(
    model: Transformer,
    hook: LinearHook | None,
    tokens: jax.Array,
    lengths: jax.Array,
    params: RowParams,
    *,
    max_new: int,
    capacity: int,
    topk_logprobs: int = 0,
) -> SampleOutput:
    """Sample up to `max_new` tokens for each right-padded prompt `tokens [B, T]` of `lengths [B]`.

    A row is done after it emits one of its stop tokens (kept in the output and counted) or after
    `min(max_tokens, max_new)` tokens. `capacity` (static) is the KV cache size and must hold
    `T + max_new` positions: each iteration emits a token, then decodes it, so the last decode is
    spare (one sampling site in the program instead of two: a third less compile time on CPU).
    With `topk_logprobs=k > 0` the output also holds the k most likely tokens and their raw
    logprobs at every generated position.
    """
    b, t = tokens.shape
    if max_new < 1:
        raise ValueError(f"max_new must be >= 1, got {max_new}")
    if capacity < t + max_new:
        raise ValueError(f"KV cache capacity {capacity} < prompt length {t} + max_new {max_new}")
    cache = KVCache.empty(model.config, b, capacity, model.dtype)
    logits, cache = prefill(model, tokens, lengths, cache, hook=hook)
    budget = jnp.minimum(params.max_tokens, max_new)
    k = topk_logprobs
    out = SampleOutput(
        tokens=jnp.zeros((b, max_new), jnp.int32), logprobs=jnp.zeros((b, max_new), jnp.float32),
        num_tokens=jnp.zeros((b,), jnp.int32), hit_stop_token=jnp.zeros((b,), bool),
        topk_ids=jnp.zeros((b, max_new, k), jnp.int32) if k else None,
        topk_logprobs=jnp.zeros((b, max_new, k), jnp.float32) if k else None,
    )
    carry = _Carry(jnp.int32(0), logits, cache, budget <= 0, out)

    def cond(c: _Carry) -> jax.Array:
        return (c.step < max_new) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        c, token = _emit(c, params, budget)
        logits, cache = decode_step(model, token, c.cache, hook=hook)
        return c._replace(logits=logits, cache=cache)

    return jax.lax.while_loop(cond, body, carry).out


def truncate_at_stop_strings(
    token_ids: list[int], stop_strings: list[str], decode: Callable[[list[int]], str]
) -> tuple[int, bool]:
    """How many of `token_ids` to keep, and whether a stop string was hit.

    Keeps tokens up to and including the one whose decoding completes the first stop string (which
    may span several tokens); all of them if none occurs. Decodes the whole sequence once, then
    bisects on prefixes: O(log n) decodes, not one per token.
    """
    stops = [s for s in stop_strings if s]

    def contains(n: int) -> bool:
        text = decode(token_ids[:n])
        return any(s in text for s in stops)

    n = len(token_ids)
    if not stops or not contains(n):
        return n, False
    lo, hi = 0, n  # invariant: prefix lo has no stop string, prefix hi has one
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if contains(mid) else (mid, hi)
    return hi, True
