"""The compiled programs of the decode loop (`decode.DecodeLoop`): pure functions of their arguments,
each counted in `compile_counts` under its name when it compiles.

- `chunk` ("decode"): every active pool row decodes up to `steps` tokens in one `while_loop`;
- `prefill`: prompts (after any cached prefix) into a small cache of their own;
- `admit`: prefilled prompts copied into pool rows (one per sample);
- `resize` ("pool_resize"): the pool moved into a new number of rows and capacity;
- `place_entry` / `extract_entry`: copies between a cache row and a prefix-cache entry.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from framework.engine.placement import Placement
from framework.engine.prefix_cache import extract_entry, place_entry
from framework.sampling import RowParams, choose_tokens
from lora import LoraBank
from models.kv_cache import KVCache, decode_step, extend


class DecodePrograms:
    """The decode loop's jitted programs over one model graph and placement."""

    def __init__(self, graphdef: Any, placement: Placement, compile_counts: collections.Counter[str]):
        self._graphdef, self._placement = graphdef, placement
        self.compile_counts = compile_counts
        self.chunk = jax.jit(self._chunk_impl, static_argnames=("steps", "topk"), donate_argnames=("cache", "logits"))
        self.prefill = jax.jit(self._prefill_impl, donate_argnames=("temp",))
        self.admit = jax.jit(self._admit_impl, donate_argnames=("cache", "logits"))
        self.resize = jax.jit(self._resize_impl, static_argnames=("rows", "capacity"))
        self.place_entry = jax.jit(lambda cache, kv, row: placement.constrain_cache(place_entry(cache, kv, row)),
                                   donate_argnames=("cache",))
        self.extract_entry = jax.jit(lambda cache, row, length: placement.constrain_prefix_entry(
            extract_entry(cache, row, length=length)), static_argnames=("length",))

    def _model(self, base: Any) -> Any:
        return nnx.merge(self._graphdef, base)

    def _chunk_impl(self, base, bank_weights, bank_scales, used, slot, cache, logits, key_data, temperature, top_p,
                    top_k, stop, counts, budget, active, *, steps: int, topk: int) -> dict[str, Any]:
        self.compile_counts["decode"] += 1
        model = self._model(base)
        if used is None:  # every row gathers its own slot of the whole bank
            hook = self._placement.hook(LoraBank(bank_weights, bank_scales), slot)
        else:  # the few slots in use, one-hot; laid out here, outside the loop, once per chunk
            bank = LoraBank(jax.tree.map(lambda w: w[:, used], bank_weights), bank_scales[used])
            hook = self._placement.hook(bank, slot, one_hot=True)
        params = RowParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=budget,
                           keys=jax.random.wrap_key_data(key_data), stop_tokens=stop)
        rows = counts.shape[0]
        out = {"tokens": jnp.zeros((rows, steps), jnp.int32), "logprobs": jnp.zeros((rows, steps), jnp.float32)}
        if topk:
            out["topk_ids"] = jnp.zeros((rows, steps, topk), jnp.int32)
            out["topk_logprobs"] = jnp.zeros((rows, steps, topk), jnp.float32)
        # Output column of a row = its draw number within this chunk; rows stay aligned because a row
        # that goes inactive never comes back within a chunk.
        column0 = counts

        def cond(carry):
            i, _, _, _, active, _, _ = carry
            return (i < steps) & jnp.any(active)

        def body(carry):
            i, cache, logits, counts, active, hit, out = carry
            token = jnp.where(active, choose_tokens(logits, params, counts), 0)
            logz = jax.nn.logsumexp(logits, axis=-1)
            logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - logz
            col = counts - column0
            write = jax.vmap(lambda buf, c, x: jax.lax.dynamic_update_index_in_dim(buf, x, c, axis=0))
            out = dict(out)
            out["tokens"] = write(out["tokens"], col, jnp.where(active, token, 0))
            out["logprobs"] = write(out["logprobs"], col, jnp.where(active, logprob, 0.0))
            if topk:
                values, ids = jax.lax.top_k(logits, topk)
                out["topk_ids"] = write(out["topk_ids"], col, ids)
                out["topk_logprobs"] = write(out["topk_logprobs"], col, values - logz[:, None])
            stopped = active & jnp.any(token[:, None] == params.stop_tokens, axis=-1)
            counts = counts + active.astype(jnp.int32)
            lengths = cache.lengths
            new_logits, cache = decode_step(model, token, cache, hook=hook)
            cache = dataclasses.replace(cache, lengths=jnp.where(active, cache.lengths, lengths))  # freeze idle rows
            logits = jnp.where(active[:, None], new_logits, logits)
            active = active & ~stopped & (counts < budget)
            return i + 1, cache, logits, counts, active, hit | stopped, out

        carry = (jnp.int32(0), cache, logits, counts, active, jnp.zeros_like(active), out)
        steps_run, cache, logits, counts, active, hit, out = jax.lax.while_loop(cond, body, carry)
        place = self._placement
        return {**out, "cache": place.constrain_cache(cache), "logits": place.constrain_rows(logits), "counts": counts,
                "active": active, "hit": hit, "steps": steps_run}

    def _prefill_impl(self, base, bank_weights, bank_scales, prompt_slots, temp, tokens, start, lengths):
        """Prefill the prompts into `temp` after any cached prefix; the logits of each one's last token."""
        self.compile_counts["prefill"] += 1
        model = self._model(base)
        hook = self._placement.hook(LoraBank(bank_weights, bank_scales), prompt_slots)
        return extend(model, tokens, start, lengths, temp, hook=hook)

    def _admit_impl(self, cache, logits, temp, last_logits, dest, src):
        """Copy prefilled prompt `src[i]` (of `temp`, at most the pool's capacity) into pool row `dest[i]`.
        Positions past the prompt's capacity keep what the row held before: past its length, never read."""
        self.compile_counts["admit"] += 1

        def scatter(pool, new):
            new = new[src]
            if pool.ndim == 4:  # keys/values [rows, K, C, H]
                return pool.at[dest, :, : new.shape[2]].set(new, mode="drop")
            return pool.at[dest].set(new, mode="drop")

        cache = KVCache(tuple(map(scatter, cache.keys, temp.keys)), tuple(map(scatter, cache.values, temp.values)),
                        scatter(cache.lengths, temp.lengths))
        place = self._placement
        return place.constrain_cache(cache), place.constrain_rows(scatter(logits, last_logits))

    def _resize_impl(self, cache, logits, index, *, rows: int, capacity: int):
        """A pool of `rows` x `capacity` holding old rows `index` (-1: empty) at rows 0.. (truncating or
        zero-padding positions: rows never hold more than `capacity`)."""
        self.compile_counts["pool_resize"] += 1
        valid = index >= 0
        safe = jnp.maximum(index, 0)

        def move(buf):
            out = jnp.where(valid.reshape((-1,) + (1,) * (buf.ndim - 1)), buf[safe], 0)
            c = buf.shape[2]
            if capacity > c:
                return jnp.pad(out, ((0, 0), (0, 0), (0, capacity - c), (0, 0)))
            return out[:, :, :capacity]

        lengths = jnp.where(valid, cache.lengths[safe], 0)
        place = self._placement
        return (place.constrain_cache(KVCache(tuple(map(move, cache.keys)), tuple(map(move, cache.values)), lengths)),
                place.constrain_rows(jnp.where(valid[:, None], logits[safe], 0.0)))
