"""`compute_logprobs` through the prefix cache: only the tokens whose logprobs no entry holds are fed.

A request's tokens are looked up in the prefix cache of its snapshot. Of the shared prefix, the
entry gives back the logprobs it knows (tokens sampled under that snapshot, or scored before); the
tokens it does not know form runs, and so does everything after the shared prefix. A run of
positions `[a, b)` needs the logits at `a-1 .. b-1`, so its row feeds tokens `a-1 .. b-1` on top
of the entry's keys/values for positions `< a-1` (`models.kv_cache.extend`); known gaps shorter
than `MIN_SHARED` are fed through rather than split. Rows of any requests and snapshots go
through one compiled step per shape bucket, in calls that hold at most `token_budget` cache
positions. The scored sequence goes back to the cache with all its logprobs (the row that fed the
tail holds the whole sequence's keys/values), so a request extending it computes only its new tokens.

A request the cache knows nothing of is left to the engine's training forward: a sequence nothing
has computed then gets exactly the logprobs a training step computes (a DPO policy equal to its
reference has margin 0, a KL penalty at the start is 0). Reused logprobs equal the recomputed ones
up to float rounding (a sampled token's comes from its decode step).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from framework.engine.placement import Placement
from framework.engine.prefix_cache import MIN_SHARED, PrefixCache, PrefixEntry
from framework.engine.requests import LogprobsRequest
from framework.engine.shapes import bucket
from framework.engine.training import stack_adapters
from lora import LoraBank
from models import token_logprobs
from models.kv_cache import extend


@dataclasses.dataclass
class _Run:
    """One row of a scoring call: the tokens `start .. stop-1` of `requests` (those whose first `stop`
    tokens are the same, under the same snapshot: one row serves them all)."""

    requests: list[int]
    start: int
    stop: int
    entry: PrefixEntry | None  # the keys/values of positions < start come from it
    tail_of: int | None = None  # the request whose last tokens this row feeds (its keys/values are kept)


def unknown_runs(logprobs: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs `[a, b)` of positions ≥ 1 whose logprob is NaN, merging runs whose known gap is
    shorter than `MIN_SHARED` (feeding through a short gap costs less than another row)."""
    unknown = np.flatnonzero(np.isnan(logprobs[1:])) + 1
    runs: list[list[int]] = []
    for j in unknown.tolist():
        if runs and j - runs[-1][1] < MIN_SHARED:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return [(a, b) for a, b in runs]


class PrefixScorer:
    """Prefix-cached `compute_logprobs` of one engine (worker thread only)."""

    def __init__(self, *, graphdef: Any, base: Any, model_config: Any, dtype: Any, prefix_cache: PrefixCache,
                 placement: Placement, compile_counts: collections.Counter[str], min_capacity: int,
                 token_budget: int, place_entry: Callable[..., Any], extract_entry: Callable[..., Any]):
        """`place_entry` / `extract_entry`: the decode loop's compiled copies between a cache row and a
        prefix-cache entry."""
        self._graphdef, self._base = graphdef, base
        self._config, self._dtype = model_config, dtype
        self._prefix, self._placement = prefix_cache, placement
        self.compile_counts = compile_counts
        self._min_capacity, self._token_budget = min_capacity, token_budget
        self._place_entry, self._extract_entry = place_entry, extract_entry
        self.stats: collections.Counter[str] = collections.Counter()  # requests, tokens, fed_tokens
        self._score = jax.jit(self._score_impl, donate_argnames=("cache",))

    def logprobs(self, requests: Sequence[LogprobsRequest], adapters: tuple, scales: np.ndarray,
                 group: dict[str, int]) -> list[np.ndarray | None]:
        """log p(token_t | tokens_<t) of each request the cache knows something of (first entry NaN); None
        for the others, which the caller computes with the training forward (so that a sequence nothing
        has computed gets exactly the training step's logprobs: a policy equal to its reference scores
        the same, bit for bit). `adapters[group[snapshot]]` is a request's snapshot weights."""
        return self.logprobs_and_next(requests, adapters, scales, group, want_next=False)[0]

    def logprobs_and_next(self, requests: Sequence[LogprobsRequest], adapters: tuple, scales: np.ndarray,
                          group: dict[str, int], *, want_next: bool = True
                          ) -> tuple[list[np.ndarray | None], dict[int, tuple[jax.Array, int]]]:
        """`logprobs`, and for each request it scored, where the logits of the token after its last one
        are: `(array [rows, V], row)` (a one-token sample draws from them). A request whose last logprob
        the cache knew already feeds its last token for them."""
        requests = [LogprobsRequest(r.snapshot_id, np.asarray(r.tokens, np.int32)) for r in requests]
        results: list[np.ndarray | None] = []
        found: list[tuple[PrefixEntry | None, int]] = []
        runs: dict[tuple[str, bytes], _Run] = {}  # rows by what they compute: the samples of one prompt share it
        for i, request in enumerate(requests):
            tokens, n = request.tokens, len(request.tokens)
            entry, shared = self._prefix.lookup(request.snapshot_id, tokens, max_shared=n, count=False)
            known = entry.known_logprobs(tokens) if entry is not None else None
            if known is None or np.isnan(known[1:]).all():
                results.append(None)
                found.append((None, 0))
                continue
            found.append((entry, shared))
            results.append(known)
            for a, b in unknown_runs(known):
                key = (request.snapshot_id, tokens[:b].tobytes())
                run = runs.setdefault(key, _Run([], a - 1, b, entry if a - 1 > 0 else None))
                if a - 1 < run.start:  # this request knows less: the shared row starts where it needs
                    run.start, run.entry = a - 1, entry if a - 1 > 0 else None
                run.requests.append(i)
                if b == n and shared < n:
                    run.tail_of = i
            if want_next and not np.isnan(known[n - 1]):  # no run ends at n: feed the last token alone
                # (position n-1's logprob is known, so the entry holds every position before it)
                runs.setdefault((request.snapshot_id, tokens.tobytes()), _Run([], n - 1, n, entry)).requests.append(i)
            self._prefix.count_reused(n - 1 - int(np.isnan(known[1:]).sum()))
            self.stats["requests"] += 1
            self.stats["tokens"] += n
        tails: dict[int, jax.Array] = {}
        following: dict[int, tuple[jax.Array, int]] = {}
        for call in self._calls(list(runs.values())):
            call_tails, call_next = self._run_call(call, requests, results, adapters, scales, group)
            tails.update(call_tails)
            following.update(call_next)
        for i, request in enumerate(requests):
            if results[i] is not None:
                self._remember(request, results[i], *found[i], tails.get(i))
        return results, following

    def _calls(self, runs: list[_Run]) -> list[list[_Run]]:
        """Runs grouped into calls of at most `token_budget` cache positions (a run alone may exceed it)."""
        calls: list[list[_Run]] = []
        for run in sorted(runs, key=lambda r: r.stop):
            if calls:
                members = [*calls[-1], run]
                if bucket(len(members)) * self._capacity(members) <= self._token_budget:
                    calls[-1] = members
                    continue
            calls.append([run])
        return calls

    def _width(self, runs: list[_Run]) -> int:
        return bucket(max(r.stop - r.start for r in runs), 16)

    def _capacity(self, runs: list[_Run]) -> int:
        return bucket(max(r.start for r in runs) + self._width(runs), self._min_capacity)

    def _run_call(self, runs: list[_Run], requests: Sequence[LogprobsRequest], results: list[np.ndarray | None],
                  adapters: tuple, scales: np.ndarray, group: dict[str, int]
                  ) -> tuple[dict[int, jax.Array], dict[int, tuple[jax.Array, int]]]:
        """Score `runs` in one compiled call, filling in `results`; returns the keys/values of each request
        whose tail was fed here (its whole sequence), for the prefix cache, and, for each request whose
        last token a row fed here, that row of the call's logits after each row's last token."""
        p, t, capacity = bucket(len(runs)), self._width(runs), self._capacity(runs)
        cache = self._placement.empty_cache(self._config, p, capacity, self._dtype)
        tokens, targets = np.zeros((p, t), np.int32), np.zeros((p, t), np.int32)
        start, lengths, rows = np.zeros(p, np.int32), np.ones(p, np.int32), np.zeros(p, np.int32)
        for k, run in enumerate(runs):
            request = requests[run.requests[0]]
            fed = request.tokens[run.start: run.stop]
            tokens[k, : len(fed)] = fed
            targets[k, : len(fed) - 1] = fed[1:]
            start[k], lengths[k], rows[k] = run.start, len(fed), group[request.snapshot_id]
            if run.entry is not None:
                cache = self._place_entry(cache, run.entry.kv[:, :, :, :capacity], jnp.int32(k))
            self.stats["fed_tokens"] += len(fed)
        arrays = self._placement.batch((rows, tokens, targets, start, lengths))
        logprobs, last_logits, cache = self._score(self._base, adapters, scales, cache, *arrays)
        logprobs = np.asarray(logprobs)
        tails, following = {}, {}
        for k, run in enumerate(runs):
            following.update({i: (last_logits, k) for i in run.requests if len(requests[i].tokens) == run.stop})
            # row k's output i is the logprob of position start + 1 + i; keep what the cache knew
            span = slice(run.start + 1, run.stop)
            fresh = logprobs[k, : run.stop - run.start - 1]
            for i in run.requests:
                out = results[i]
                out[span] = np.where(np.isnan(out[span]), fresh, out[span])
            if run.tail_of is not None:  # this row holds the whole sequence's keys/values
                length = min(bucket(run.stop, 16), capacity)
                tails[run.tail_of] = self._extract_entry(cache, jnp.int32(k), length=length)
        return tails, following

    def _remember(self, request: LogprobsRequest, logprobs: np.ndarray, entry: PrefixEntry | None, shared: int,
                  kv: jax.Array | None) -> None:
        """Put the scored sequence (all its logprobs) into the prefix cache."""
        sid, tokens = request.snapshot_id, request.tokens
        if (entry is not None and shared == len(tokens)) or self._prefix.covering(sid, tokens) is not None:
            self._prefix.learn_logprobs(sid, tokens, logprobs)  # held already (or by a longer request of this call)
        elif kv is not None:
            self._prefix.insert(sid, tokens, kv, logprobs)

    def _score_impl(self, base, adapters, scales, cache, rows, tokens, targets, start, lengths):
        self.compile_counts["score"] += 1
        model = nnx.merge(self._graphdef, base)
        hook = self._placement.hook(LoraBank(stack_adapters(adapters), scales), rows)
        logits, cache = extend(model, tokens, start, lengths, cache, hook=hook, all_logits=True)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return token_logprobs(logits, targets), last, self._placement.constrain_cache(cache)
