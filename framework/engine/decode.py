"""Continuous batching for sampling: a pool of KV-cache rows that sequences join and leave at step
boundaries.

The pool is `R` rows of capacity `C` (both powers of two, grown on demand and shrunk as rows finish;
on an accelerator, where a few more rows cost nothing and each other size would be a program to
compile, never under `min_decode_rows` and only once the rows in use fit in a quarter of it, and its
capacity only to a quarter or less; prompts prefill there in batches padded to powers of four). Each
engine call (`step`) first admits waiting requests, then decodes every active row `decode_chunk`
steps in one compiled loop:

- Admission prefills each request's prompt once, whatever its `num_samples`, then copies the
  prompt's keys/values into one pool row per sample. With the prefix cache it first copies the
  longest cached prefix of the prompt (from an earlier prompt or a finished sequence of the same
  snapshot) and computes only the rest (`models.kv_cache.extend`).
- A decode step emits one token per active row, then feeds it: a row's draw number i uses
  `fold_in(key(seed, sample), i)`, and rows never read each other's data, so a sequence gets the
  same tokens and logprobs whichever requests share its steps. A row that emits a stop token or
  spends its budget goes inactive at once; its cache length freezes, so its keys/values stay whole.
- Rows of any snapshots, budgets and sampling settings share a step: settings are per-row data and
  adapters come from the sampler bank by per-row slot. A short request waits at most one chunk
  behind a long one. Finished rows free their space at the chunk's end, and their
  prompt + completion go to the prefix cache for the next turn.

Nothing here blocks: `step` is called by the scheduler's worker between training batches.
A one-token request for its prompt's logprobs (the SDK's `compute_logprobs`) skips the pool: one
forward pass serves it (`one_pass`).
Requests whose snapshot has no free sampler slot, or that find the pool full, wait in FIFO order.
A request with more samples than pool rows is admitted a few samples at a time. The compiled programs
this loop runs are in `decode_programs`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from framework.engine.decode_programs import DecodePrograms
from framework.engine.one_pass import ForwardWithCache, OnePass, ScorePrompts, eligible
from framework.engine.placement import Placement
from framework.engine.pool_rows import PoolRows, Running
from framework.engine.prefix_cache import MIN_SHARED, PrefixCache, shared_prefix
from framework.engine.requests import SampledRow, SampleJob, SampleResult, TopK
from framework.engine.shapes import bucket, coarse_bucket
from framework.engine.snapshots import NoFreeSlot, Snapshot, SnapshotRegistry
from framework.sampling import sample_keys, truncate_at_stop_strings
from lora import ONE_HOT_MAX_SLOTS
from models.kv_cache import KVCache

logger = logging.getLogger(__name__)


class DecodeLoop:
    """The continuous-batching sampler of one engine (worker thread only, except `submit`)."""

    def __init__(self, *, graphdef: Any, base: Any, model_config: Any, dtype: Any, registry: SnapshotRegistry,
                 prefix_cache: PrefixCache, max_rows: int, chunk: int, min_capacity: int, min_rows: int = 1,
                 min_prefill_tokens: int = 1,
                 prompt_extras: Callable[[SampleJob], tuple[np.ndarray | None, TopK | None]],
                 compile_counts: collections.Counter[str], placement: Placement, continuous: bool = True,
                 prefill_once: bool = True, forward_with_cache: ForwardWithCache | None = None,
                 score_prompts: ScorePrompts | None = None, one_pass_tokens: int = 2048):
        self._base = base
        self._placement = placement
        self._config, self._dtype = model_config, dtype
        self._registry, self._prefix = registry, prefix_cache
        self.max_rows, self.chunk, self._min_capacity = max_rows, chunk, min_capacity
        # Floors of the pool's rows and of a prefill's prompts x tokens (`EngineConfig.min_decode_rows`).
        self._min_rows, self._min_prefill_tokens = min(max(min_rows, 1), max_rows), max(min_prefill_tokens, 1)
        # A row floor marks a backend where programs cost more than padding: admission copies as many rows
        # as the pool holds, and a chunk multiplies by at least ONE_HOT_MAX_SLOTS snapshots (one program per
        # pool shape for each, not one per count).
        self._pad_for_programs = self._min_rows > 1
        # Padding never makes a temporary of more than this many positions (prompts x capacity): long
        # contexts take exact sizes.
        self._pad_positions = 64 * self._min_prefill_tokens
        self._prompt_extras = prompt_extras
        self._continuous, self._prefill_once = continuous, prefill_once  # off only to measure what they save
        self.compile_counts = compile_counts
        self._lock = threading.Lock()
        self._waiting: collections.deque[Running] = collections.deque()
        self._stop_width = 4
        self._rows = PoolRows.empty(0, self._stop_width)
        self._cache: KVCache | None = None
        self._logits: jax.Array | None = None
        self._capacity = 0
        self.stats = collections.Counter()  # chunks, row_steps, active_row_steps, tokens, prefill_tokens, ...
        self.queue_wait_seconds = 0.0
        programs = DecodePrograms(graphdef, placement, compile_counts)
        self._chunk, self._prefill, self._admit, self._resize = (programs.chunk, programs.prefill, programs.admit,
                                                                 programs.resize)
        # Prefix-cache copies (the engine's scorer uses them too).
        self.place_entry, self.extract_entry = programs.place_entry, programs.extract_entry
        # One-token requests for prompt logprobs (the SDK's compute_logprobs), in one forward pass each.
        self._one_pass = (None if forward_with_cache is None or score_prompts is None
                          else OnePass(forward_with_cache, score_prompts, prefix_cache, self.extract_entry,
                                       min_capacity))
        self._one_pass_tokens = one_pass_tokens

    # ------------------------------------------------------------------------------- interface
    def submit(self, job: SampleJob, snapshot: Snapshot, future: Future) -> None:
        """Queue a request (any thread). `snapshot` carries a reference the loop releases when done."""
        running = Running(job, future, snapshot, time.perf_counter(), [None] * job.num_samples)
        with self._lock:
            self._waiting.append(running)

    def has_work(self) -> bool:
        with self._lock:
            waiting = bool(self._waiting)
        return waiting or bool(self._rows.active.any())

    @property
    def active_rows(self) -> int:
        return int(self._rows.active.sum())

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def collect(self) -> None:
        """Drop what released snapshots held: their bank slots and prefix-cache entries."""
        for snapshot_id in self._registry.drain_freed():
            self._prefix.purge(snapshot_id)

    def step(self) -> None:
        """Admit what fits, then decode one chunk; resolves the futures of finished requests."""
        self.collect()
        try:
            self._serve_one_pass()
            self._admit_waiting()
            if self._rows.active.any():
                self._ensure_pool(self.active_rows, 0, 0)  # shrinks the pool to the rows still decoding
                self._decode_chunk()
        except Exception as error:  # the pool's donated buffers may be gone: fail what it held, start afresh
            logger.exception("sampling step failed; failing the requests in the pool")
            self._fail_running(error)

    def fail_all(self, error: BaseException) -> None:
        """Resolve every waiting and running request with `error` (shutdown)."""
        self._fail_running(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for running in waiting:
            self._settle(running, error=error)

    # ------------------------------------------------------------------------------- admission
    def _one_pass_candidate(self, running: Running) -> bool:
        return (self._one_pass is not None and not running.started and eligible(running.job)
                and running.job.num_samples <= self.max_rows)

    def _serve_one_pass(self) -> None:
        """Serve waiting one-token requests for prompt logprobs (`one_pass`) without the pool, up to
        `one_pass_tokens` padded positions a step (at least one request). A prompt that shares more with
        one chosen than the prefix cache holds of it waits for that one's pass, then extends its cache
        entry (in another round of this step if the budget allows, else the next step). If a pass fails,
        its requests go through the decode loop instead; otherwise the decode loop leaves them to this."""
        spent = 0
        while True:
            with self._lock:
                candidates = [r for r in self._waiting if self._one_pass_candidate(r)]
            chosen: list[Running] = []
            cached: list[int] = []  # prompt tokens the prefix cache holds, per chosen request
            try:
                for running in candidates:
                    job = running.job
                    if ((chosen or spent) and spent + self._one_pass.positions([r.job for r in chosen] + [job])
                            > self._one_pass_tokens):
                        break
                    held = self._prefix.cached_length(job.snapshot_id, job.prompt)
                    if self._prefix.enabled and any(
                            r.job.snapshot_id == job.snapshot_id
                            and shared_prefix(r.job.prompt, job.prompt) >= held + MIN_SHARED for r in chosen):
                        continue  # it waits for that one's pass, to extend its cache entry
                    self._remove_waiting(running)
                    if not running.future.set_running_or_notify_cancel():
                        self._settle(running)
                        continue
                    running.started = True
                    self.queue_wait_seconds += time.perf_counter() - running.submitted
                    chosen.append(running)
                    cached.append(held)
                if not chosen:
                    return
                served = self._one_pass.run([r.job for r in chosen], cached)
                spent += self._one_pass.positions([r.job for r in chosen])
                for running, (prompt_logprobs, rows, from_cache) in zip(chosen, served, strict=True):
                    self._settle(running, result=SampleResult(rows, prompt_logprobs, running.snapshot.version,
                                                              cached_prompt_tokens=from_cache))
                    self.stats["one_pass_requests"] += 1
                    self.stats["cached_prompt_tokens"] += from_cache
            except Exception:
                logger.exception("one-pass scoring failed; the decode loop serves its requests")
                with self._lock:
                    self._waiting.extendleft(reversed([r for r in chosen if not r.settled]))
                return

    def _admit_waiting(self) -> None:
        if not self._continuous and self._rows.active.any():
            return  # batch-synchronous: a batch runs until its longest row is done
        plan: list[tuple[Running, int]] = []  # (request, samples to admit now)
        free = self.max_rows - self.active_rows
        with self._lock:
            candidates = list(self._waiting)
        active_sids = {o.job.snapshot_id for o in self._rows.owner if o is not None}
        for running in candidates:
            if free <= 0:
                break
            if not running.started and running.future.cancelled():
                self._remove_waiting(running)
                self._settle(running)
                continue
            if self._one_pass_candidate(running):
                continue  # the next step's one pass serves it
            try:
                self._registry.place(sorted(active_sids | {running.job.snapshot_id}))
            except NoFreeSlot:
                # FIFO under contention: admitting later requests would keep the slots pinned and
                # starve this one; it goes first once running rows free a slot.
                break
            except Exception as error:  # e.g. the snapshot's weights could not be placed
                if running.next_sample == 0:
                    self._remove_waiting(running)
                    self._settle(running, error=error)
                    continue
                raise  # some of its samples are in the pool: fail the pool with it
            if not running.started:
                if not running.future.set_running_or_notify_cancel():  # cancelled just now
                    self._remove_waiting(running)
                    self._settle(running)
                    continue
                running.started = True
            active_sids.add(running.job.snapshot_id)
            n = min(running.job.num_samples - running.next_sample, free)
            plan.append((running, n))
            free -= n
        if not plan:
            return
        try:
            self._admit_plan(plan)
        except Exception as error:
            # Requests with no row in the pool yet are failed here (the pool's failure handling only sees
            # rows); the pool itself may be half-updated, so the caller resets it.
            for running, _ in plan:
                if not any(o is running for o in self._rows.owner):
                    self._remove_waiting(running)
                    self._settle(running, error=error)
            raise
        for running, _ in plan:
            if running.next_sample == running.job.num_samples:
                self._remove_waiting(running)
            self.queue_wait_seconds += time.perf_counter() - running.submitted

    def _remove_waiting(self, running: Running) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiting.remove(running)

    def _admit_plan(self, plan: list[tuple[Running, int]]) -> None:
        slots = self._registry.place(sorted({o.job.snapshot_id for o in self._rows.owner if o is not None}
                                            | {r.job.snapshot_id for r, _ in plan}))
        prompts = []  # (request, prefix-cache entry, shared length) per prefilled prompt row
        sources: list[list[int]] = []  # per planned request: the prompt row of each sample admitted now
        for running, n in plan:
            prompt = running.job.prompt
            entry, shared = self._prefix.lookup(running.job.snapshot_id, prompt, max_shared=len(prompt) - 1)
            if running.prompt_logprobs is None:
                running.prompt_logprobs = (entry.known_logprobs(prompt) if entry is not None
                                           else np.full(len(prompt), np.nan, np.float32))
            copies = 1 if self._prefill_once else n
            prompts += [(running, entry, shared)] * copies
            sources.append([len(prompts) - 1] * n if self._prefill_once else list(range(len(prompts) - n,
                                                                                          len(prompts))))
        new_rows = sum(n for _, n in plan)
        need_capacity = max(len(r.job.prompt) + r.job.max_tokens + 1 for r, _ in plan)
        suffix_len = bucket(max(len(r.job.prompt) - shared for r, _, shared in prompts), 16)
        need_capacity = max(need_capacity, max(shared for _, _, shared in prompts) + suffix_len)
        stop_width = bucket(max([len(r.job.stop_tokens) for r, _ in plan] + [1]), 4)
        self._ensure_pool(self.active_rows + new_rows, need_capacity, stop_width)

        # The prompts prefill into their own small cache, sized by what they hold (not by the pool), so the
        # model's prefill compiles per (prompts, suffix, capacity) bucket whatever the pool's shape.
        temp_capacity = bucket(max(shared for _, _, shared in prompts) + suffix_len, self._min_capacity)
        p = bucket(len(prompts), min(self._min_prefill_tokens // suffix_len, self._pad_positions // temp_capacity))
        if self._pad_for_programs:  # powers of four where the temporary stays small: fewer prefill programs
            coarse_capacity, coarse_p = coarse_bucket(temp_capacity), coarse_bucket(p)
            if coarse_p * coarse_capacity <= self._pad_positions and coarse_capacity <= self._capacity:
                temp_capacity = coarse_capacity
            if coarse_p * temp_capacity <= self._pad_positions:
                p = coarse_p
        temp = self._placement.empty_cache(self._config, p, temp_capacity, self._dtype)
        tokens = np.zeros((p, suffix_len), np.int32)
        start, lengths, prompt_slots = np.zeros(p, np.int32), np.ones(p, np.int32), np.zeros(p, np.int32)
        for i, (running, entry, shared) in enumerate(prompts):
            suffix = running.job.prompt[shared:]
            tokens[i, : len(suffix)] = suffix
            start[i], lengths[i] = shared, len(suffix)
            prompt_slots[i] = slots[running.job.snapshot_id]
            running.cached_tokens = max(running.cached_tokens, shared)
            if entry is not None:
                temp = self.place_entry(temp, entry.kv[:, :, :, :temp_capacity], jnp.int32(i))
        free = self._rows.free()
        # Padded entries of `dest` are dropped.
        q = bucket(new_rows)
        if self._pad_for_programs and len(self._rows.owner) * temp_capacity <= self._pad_positions:
            q = len(self._rows.owner)  # one admission program per pool shape
        dest = np.full(q, len(self._rows.owner), np.int32)  # out of range: dropped
        src = np.zeros(q, np.int32)
        k = 0
        for i, (running, n) in enumerate(plan):
            job = running.job
            keys = np.asarray(jax.random.key_data(sample_keys(job.seed, job.num_samples)))
            for j, s in enumerate(range(running.next_sample, running.next_sample + n)):
                row = free[k]
                dest[k], src[k] = row, sources[i][j]
                self._start_row(row, running, s, slots[job.snapshot_id], keys[s])
                k += 1
            running.next_sample += n
        bank = self._registry.bank
        prompt_slots, tokens, start, lengths = self._placement.batch((prompt_slots, tokens, start, lengths))
        last_logits, temp = self._prefill(self._base, bank.weights, bank.scales, prompt_slots, temp, tokens, start,
                                          lengths)
        self._cache, self._logits = self._admit(self._cache, self._logits, temp, last_logits, dest, src)
        self.stats["prefill_tokens"] += int(lengths[: len(prompts)].sum())
        self.stats["cached_prompt_tokens"] += int(start[: len(prompts)].sum())
        if self._prefix.enabled:
            for i, (running, _, _) in enumerate(prompts):
                prompt = running.job.prompt
                if self._prefix.covering(running.job.snapshot_id, prompt) is None:
                    length = min(bucket(len(prompt), 16), temp_capacity)
                    self._prefix.insert(running.job.snapshot_id, prompt,
                                        self.extract_entry(temp, jnp.int32(i), length=length),
                                        running.prompt_logprobs)

    def _start_row(self, row: int, running: Running, sample: int, slot: int, key_data: np.ndarray) -> None:
        job, rows = running.job, self._rows
        rows.owner[row] = running
        rows.sample[row], rows.active[row], rows.counts[row], rows.budget[row] = sample, True, 0, job.max_tokens
        rows.temperature[row], rows.top_p[row], rows.top_k[row] = job.temperature, job.top_p, job.top_k
        rows.slot[row], rows.key_data[row], rows.prompt_len[row] = slot, key_data, len(job.prompt)
        rows.stop[row] = -1
        rows.stop[row, : len(job.stop_tokens)] = job.stop_tokens
        rows.tokens[row], rows.logprobs[row], rows.topk_ids[row], rows.topk_logprobs[row] = [], [], [], []
        self._registry.pin(slot)

    def _ensure_pool(self, rows_needed: int, capacity_needed: int, stop_width: int) -> None:
        """Make the pool at least `bucket(rows_needed)` rows (and `min_rows`) of at least `capacity_needed`
        positions (and stop lists at least `stop_width` wide), moving the occupied rows to the front."""
        current = len(self._rows.owner)
        occupied = [r for r, owner in enumerate(self._rows.owner) if owner is not None]
        held = max([int(self._rows.prompt_len[r] + self._rows.budget[r]) + 1 for r in occupied], default=0)
        grow = rows_needed > current or capacity_needed > self._capacity or stop_width > self._stop_width
        # Every row costs a decode step its compute whether it is active or not, so the pool follows the
        # demand down as well as up (a resize copies only the occupied rows' keys/values). Where programs
        # cost more than rows (`_pad_for_programs`) it shrinks lazily: only once what it needs fits in a
        # quarter of it, and then to twice that, so load that wavers around a size resizes nothing.
        want = bucket(rows_needed, self._min_rows)
        lazy = self._pad_for_programs
        shrink = (4 * want <= current) if lazy else want < current
        if self._cache is not None and not grow and not shrink:
            return
        rows = (2 * want if lazy else want) if shrink else max(want, current)
        capacity = bucket(max(capacity_needed, held), self._min_capacity)
        if not shrink or (lazy and 4 * capacity > self._capacity):  # lazily, positions too shrink by 4x or not
            capacity = max(capacity, self._capacity)
        stop_width = max(stop_width, self._stop_width)
        if self._cache is None:
            self._cache = self._placement.empty_cache(self._config, rows, capacity, self._dtype)
            self._logits = self._placement.zeros_rows((rows, self._config.vocab_size), jnp.float32)
        else:
            index = np.full(rows, -1, np.int32)
            index[: len(occupied)] = occupied
            self._cache, self._logits = self._resize(self._cache, self._logits, index, rows=rows, capacity=capacity)
        self._rows = self._rows.take(occupied, rows, stop_width)
        self._capacity, self._stop_width = capacity, stop_width

    # ---------------------------------------------------------------------------------- decoding
    def _decode_chunk(self) -> None:
        rows = self._rows
        wanted = [o.job.topk_sample for o in rows.owner if o is not None and o.job.topk_sample]
        topk = min(bucket(max(wanted), 4), self._config.vocab_size) if wanted else 0
        bank = self._registry.bank
        steps = self.chunk if self._continuous else bucket(int((rows.budget - rows.counts)[rows.active].max()))
        active_before = rows.active.copy()
        # Few snapshots (≤ ONE_HOT_MAX_SLOTS): the chunk multiplies each row by every one of them (one-hot),
        # so it reads only these, padded to a power of two with the empty slot. More: each row gathers its
        # own slot of the whole bank, which costs the same whatever the number in use, so one program
        # serves them all (`used` None) instead of one per power of two.
        in_use = sorted({int(rows.slot[r]) for r in np.flatnonzero(rows.active)})
        used, local = None, rows.slot
        if len(in_use) <= ONE_HOT_MAX_SLOTS:
            used = np.zeros(bucket(len(in_use), ONE_HOT_MAX_SLOTS if self._pad_for_programs else 1), np.int32)
            used[: len(in_use)] = in_use
            local = np.zeros(len(rows.owner), np.int32)
            for i, slot in enumerate(in_use):
                local[rows.slot == slot] = i
        out = self._chunk(self._base, bank.weights, bank.scales, used, local, self._cache, self._logits,
                          rows.key_data, rows.temperature, rows.top_p, rows.top_k, rows.stop, rows.counts,
                          rows.budget, rows.active, steps=steps, topk=topk)
        self._cache, self._logits = out["cache"], out["logits"]
        tokens, logprobs = np.asarray(out["tokens"]), np.asarray(out["logprobs"])
        counts, active, hit = np.asarray(out["counts"]), np.asarray(out["active"]), np.asarray(out["hit"])
        if topk:
            topk_ids, topk_lps = np.asarray(out["topk_ids"]), np.asarray(out["topk_logprobs"])
        self.stats["chunks"] += 1
        self.stats["row_steps"] += len(rows.owner) * int(np.asarray(out["steps"]))
        self.stats["pool_rows"] += len(rows.owner)
        emitted = counts - rows.counts
        self.stats["tokens"] += int(emitted.sum())
        self.stats["active_rows"] += int(active_before.sum())
        for row in np.flatnonzero(active_before):
            n = int(emitted[row])
            rows.tokens[row].extend(tokens[row, :n].tolist())
            rows.logprobs[row].extend(logprobs[row, :n].tolist())
            width = rows.owner[row].job.topk_sample
            if topk and width:  # the chunk's width is the widest request's: keep this request's own
                rows.topk_ids[row].append(topk_ids[row, :n, :width].copy())
                rows.topk_logprobs[row].append(topk_lps[row, :n, :width].copy())
        rows.counts[:] = counts
        rows.active[:] = active
        for row in np.flatnonzero(active_before):
            owner = rows.owner[row]
            job = owner.job
            stopped = bool(hit[row])
            keep = len(rows.tokens[row])
            if job.stop_strings and job.decode is not None:
                keep, found = truncate_at_stop_strings(rows.tokens[row], list(job.stop_strings), job.decode)
                stopped = stopped or found
                if found:
                    rows.active[row] = False
            if not rows.active[row]:
                self._finish_row(int(row), keep, stopped)

    def _finish_row(self, row: int, keep: int, stopped: bool) -> None:
        rows = self._rows
        running = rows.owner[row]
        job = running.job
        top = None
        if job.topk_sample and rows.topk_ids[row]:
            top = TopK(np.concatenate(rows.topk_ids[row])[:keep], np.concatenate(rows.topk_logprobs[row])[:keep])
        running.results[rows.sample[row]] = SampledRow(rows.tokens[row][:keep], rows.logprobs[row][:keep],
                                                       "stop" if stopped else "length", top)
        if self._prefix.enabled and keep > 0:
            sequence = np.concatenate([job.prompt, np.asarray(rows.tokens[row][:keep], np.int32)])
            logprobs = np.concatenate([running.prompt_logprobs, np.asarray(rows.logprobs[row][:keep], np.float32)])
            fed = int(rows.prompt_len[row]) + len(rows.tokens[row])  # every emitted token was fed
            if self._prefix.covering(job.snapshot_id, sequence) is not None:
                self._prefix.learn_logprobs(job.snapshot_id, sequence, logprobs)
            else:
                kv = self.extract_entry(self._cache, jnp.int32(row), length=min(bucket(fed, 16), self._capacity))
                self._prefix.insert(job.snapshot_id, sequence, kv, logprobs)
        self._registry.unpin(int(rows.slot[row]))
        rows.owner[row] = None
        rows.active[row] = False
        if running.finished:
            self._complete(running)

    def _complete(self, running: Running) -> None:
        try:
            prompt_lps, prompt_topk = self._prompt_extras(running.job)
            result = SampleResult(list(running.results), prompt_lps, running.snapshot.version, prompt_topk,
                                  cached_prompt_tokens=running.cached_tokens)
        except Exception as error:
            self._settle(running, error=error)
            return
        self._settle(running, result=result)

    def _settle(self, running: Running, *, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve the request's future (unless it was cancelled) and release its snapshot, once."""
        if running.settled:
            return
        running.settled = True
        self._registry.release(running.snapshot.snapshot_id)
        future = running.future
        if future.done() or (not future.running() and not future.set_running_or_notify_cancel()):
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_running(self, error: BaseException) -> None:
        running = {id(o): o for o in self._rows.owner if o is not None}
        for owner in running.values():
            self._settle(owner, error=error)
        for row, owner in enumerate(self._rows.owner):
            if owner is not None:
                self._registry.unpin(int(self._rows.slot[row]))
        # Requests only partly admitted also leave the queue: their remaining samples cannot complete them.
        with self._lock:
            self._waiting = collections.deque(r for r in self._waiting if id(r) not in running)
        self._rows = PoolRows.empty(0, self._stop_width)
        self._cache = self._logits = None
        self._capacity = 0
