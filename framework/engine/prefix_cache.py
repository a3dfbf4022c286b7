"""The prefix cache: keys/values of recent sequences per snapshot, so a request that extends an
earlier one (the next turn of a rollout, `compute_logprobs` after `sample`) computes only its new
tokens.

An entry is the KV of one token sequence under one snapshot, `[L, 2, K, n, H]` on the device with n
the sequence length rounded up to a power of two (few compiled copy programs). Keys and values at
position i depend only on tokens 0..i, so any entry that shares a prefix with a new sequence serves
that prefix: `lookup` returns the entry with the longest common prefix. Entries are evicted least
recently used first to stay within a byte budget; a freed snapshot's entries go at once (`purge`).
A sequence that is a prefix of a cached one adds nothing; one that extends a cached one replaces it.

An entry also keeps the logprob of each of its tokens where one is known (NaN elsewhere): sampled
tokens come with theirs, and `compute_logprobs` fills in the rest. Logits at a position need that
position's whole forward pass, which keys/values alone cannot give back, so `compute_logprobs` skips
exactly the tokens whose logprobs an entry holds.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import KVCache

MIN_SHARED = 8
"""Fewer shared tokens than this are recomputed: copying the entry would cost about as much."""


@dataclasses.dataclass
class PrefixEntry:
    snapshot_id: str
    tokens: np.ndarray  # [n] int32: the sequence whose keys/values `kv` holds
    kv: jax.Array  # [L, 2, K, n_bucket, H]
    logprobs: np.ndarray  # [n] float32: log p(token_t | tokens_<t) where known, NaN elsewhere (and at 0)

    @property
    def nbytes(self) -> int:
        return int(self.kv.nbytes) + self.logprobs.nbytes

    def known_logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """The logprobs of `tokens` as far as this entry knows them (its common prefix with them), NaN
        elsewhere (a new array)."""
        out = np.full(len(tokens), np.nan, np.float32)
        shared = shared_prefix(self.tokens, tokens)
        out[:shared] = self.logprobs[:shared]
        return out



def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()  # LRU order
        self._by_snapshot: dict[str, set[int]] = collections.defaultdict(set)
        self._ids = 0
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.cached_tokens = 0  # tokens served from entries instead of computed

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, snapshot_id: str, tokens: np.ndarray, max_shared: int, *,
               count: bool = True) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix (at most `max_shared` tokens) with `tokens`, and that length;
        `(None, 0)` when none shares at least `MIN_SHARED`. `count=False`: the caller counts the tokens
        it actually reuses (`count_reused`)."""
        if not self.enabled:
            return None, 0
        self.lookups += 1
        best, best_len = None, 0
        for key in self._by_snapshot.get(snapshot_id, ()):
            entry = self._entries[key]
            n = min(shared_prefix(entry.tokens, tokens), max_shared)
            if n > best_len:
                best, best_len = key, n
        if best is None or best_len < MIN_SHARED:
            return None, 0
        self._entries.move_to_end(best)
        if count:
            self.count_reused(best_len)
        return self._entries[best], best_len

    def cached_length(self, snapshot_id: str, tokens: np.ndarray) -> int:
        """How many leading tokens of `tokens` an entry holds the keys/values of, short of the last token
        (what `lookup(..., max_shared=len(tokens) - 1)` would take), 0 if under `MIN_SHARED`; without
        counting a lookup or touching the LRU."""
        longest = max((min(shared_prefix(self._entries[key].tokens, tokens), len(tokens) - 1)
                       for key in self._by_snapshot.get(snapshot_id, ())), default=0)
        return longest if longest >= MIN_SHARED else 0

    def count_reused(self, tokens: int) -> None:
        if tokens > 0:
            self.hits += 1
            self.cached_tokens += tokens

    def covering(self, snapshot_id: str, tokens: np.ndarray) -> PrefixEntry | None:
        """An entry that already holds all of `tokens` (inserting them would add nothing), if any."""
        for key in self._by_snapshot.get(snapshot_id, ()):
            entry = self._entries[key]
            if len(entry.tokens) >= len(tokens) and shared_prefix(entry.tokens, tokens) == len(tokens):
                self._entries.move_to_end(key)
                return entry
        return None

    def learn_logprobs(self, snapshot_id: str, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """Teach every entry of the snapshot the `logprobs` of `tokens` it shares with them (where unknown)."""
        for key in self._by_snapshot.get(snapshot_id, ()):
            entry = self._entries[key]
            head = entry.logprobs[: shared_prefix(entry.tokens, tokens)]
            np.copyto(head, logprobs[: len(head)], where=np.isnan(head))

    def insert(self, snapshot_id: str, tokens: np.ndarray, kv: jax.Array, logprobs: np.ndarray | None = None) -> None:
        """Cache `kv` (of `tokens`, with their `logprobs` where known: NaN elsewhere)."""
        if not self.enabled or kv.nbytes > self.budget_bytes:
            return
        tokens = np.asarray(tokens, np.int32)
        logprobs = (np.full(len(tokens), np.nan, np.float32) if logprobs is None
                    else np.asarray(logprobs, np.float32).copy())
        for key in list(self._by_snapshot.get(snapshot_id, ())):  # entries the new one extends (and what they knew)
            entry = self._entries[key]
            if len(entry.tokens) <= len(tokens) and shared_prefix(entry.tokens, tokens) == len(entry.tokens):
                head = logprobs[: len(entry.tokens)]
                np.copyto(head, entry.logprobs, where=np.isnan(head))
                self._drop(key)
        self._ids += 1
        entry = PrefixEntry(snapshot_id, tokens, kv, logprobs)
        self._entries[self._ids] = entry
        self._by_snapshot[snapshot_id].add(self._ids)
        self.bytes += entry.nbytes
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self.learn_logprobs(snapshot_id, tokens, logprobs)

    def purge(self, snapshot_id: str) -> None:
        for key in list(self._by_snapshot.get(snapshot_id, ())):
            self._drop(key)
        self._by_snapshot.pop(snapshot_id, None)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        keys = self._by_snapshot[entry.snapshot_id]
        keys.discard(key)
        if not keys:
            del self._by_snapshot[entry.snapshot_id]


def place_entry(cache: KVCache, kv: jax.Array, row: jax.Array) -> KVCache:
    """Copy a prefix-cache entry `kv [L, 2, K, n, H]` into positions 0..n-1 of `row`."""
    keys = tuple(jax.lax.dynamic_update_slice(k, kv[i, 0][None].astype(k.dtype), (row, 0, 0, 0))
                 for i, k in enumerate(cache.keys))
    values = tuple(jax.lax.dynamic_update_slice(v, kv[i, 1][None].astype(v.dtype), (row, 0, 0, 0))
                   for i, v in enumerate(cache.values))
    return KVCache(keys, values, cache.lengths)


def extract_entry(cache: KVCache, row: jax.Array, *, length: int) -> jax.Array:
    """Positions 0..length-1 of `row` as a prefix-cache entry `[L, 2, K, length, H]`."""
    def part(buf):
        return jax.lax.dynamic_slice_in_dim(buf[row], 0, length, axis=1)

    return jnp.stack([jnp.stack([part(k), part(v)]) for k, v in zip(cache.keys, cache.values, strict=True)])

