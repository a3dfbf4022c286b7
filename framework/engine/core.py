"""The engine: one base model, any number of LoRA adapters, and the compiled steps they all share.

It composes the parts, each in its own module:
- `adapters.AdapterPool`: every training adapter's weights, AdamW state, gradients, step and
  version, on the device or paged out to host memory (LRU);
- `snapshots.SnapshotRegistry`: published sampler weights with reference counts, and the sampler
  bank that holds the ones being sampled;
- `training.TrainingSteps` + `packing.layout`: forward, forward/backward, custom losses and AdamW,
  compiled per shape bucket, with short sequences packed into shared rows (of one adapter or, when
  cheaper, several);
- `decode.DecodeLoop` + `prefix_cache.PrefixCache`: continuous batching for sampling, prompts
  prefilled once per request and cached per snapshot; `one_pass` serves the SDK's compute_logprobs
  in one pass (the training forward for a new prompt, the prefix scorer for one the cache knows part of);
- `scoring.PrefixScorer`: compute_logprobs of sequences the prefix cache knows part of.

Calls are synchronous and not thread-safe, except `submit_sample`: `framework.scheduler` runs
everything on one worker thread. Inputs arrive validated (`framework.validation`); the engine
re-checks only what would corrupt state.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from framework.engine.adapters import AdapterPool, AdapterState
from framework.engine.config import EngineConfig
from framework.engine.decode import DecodeLoop
from framework.engine.packing import Batch, layout
from framework.engine.placement import Placement
from framework.engine.prefix_cache import PrefixCache
from framework.engine.requests import (
    CustomLossRequest,
    DatumArrays,
    ForwardRequest,
    ForwardResult,
    LogprobsRequest,
    OptimRequest,
    OptimResult,
    SampleJob,
    SampleResult,
    TopK,
)
from framework.engine.scoring import PrefixScorer
from framework.engine.shapes import bucket, length_bucket
from framework.engine.snapshots import BASE, Snapshot, SnapshotRegistry, require_finite
from framework.engine.training import TrainingSteps, batch_arrays, stack_adapters
from framework.losses import LOSSES
from framework.optim import AdamHyperparams, init_opt_state
from lora import ALL_TARGETS, DEFAULT_ALPHA, LoraBank, LoraWeights, empty_bank, init_adapter, lora_relative_flops
from models import Transformer, load_checkpoint, read_config
from models.kv_cache import KVCache


class Engine:
    """All adapters of one base model, and the compiled steps that serve them together."""

    def __init__(self, base_model: str, config: EngineConfig | None = None, *, model: Transformer | None = None,
                 devices: Sequence[jax.Device] | None = None):
        """`devices`: the devices of the mesh (default: every visible device of every process)."""
        self.config = config or EngineConfig()
        self.base_model = base_model
        model_config = model.config if model is not None else read_config(base_model)[0]
        self.placement = Placement(model_config, self.config.mesh, devices)
        if model is None:
            abstract = nnx.state(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
            model = load_checkpoint(base_model, dtype=self.config.dtype,
                                    shardings=self.placement.param_shardings(model_config, abstract))
        self.model = model
        self.model_config = model_config
        self.max_seq_len = self.config.max_seq_len or self.model_config.max_position_embeddings
        self._graphdef, self._base = nnx.split(self.model)
        self._base = self.placement.base(model_config, self._base)
        self._dtype = jnp.dtype(self.config.dtype)
        self.compile_counts: collections.Counter[str] = collections.Counter()
        self.adapters = AdapterPool(self.config.max_adapters, self.placement.adapter_state)
        self._zero = self.placement.adapter(jax.tree.map(lambda w: np.zeros(w.shape, w.dtype),
                                                         self._new_weights(rank=1, seed=0, targets=())))
        self._zero_opt_state = self.placement.new_opt_state(self._zero)
        self._zero_hp = AdamHyperparams.make(0.0)
        self.snapshots = SnapshotRegistry(self.placement.bank(empty_bank(
            self.model_config, self.config.sampler_slots + 1, self.config.max_rank, targets=self.config.targets,
            dtype=self._dtype)), place=self.placement.bank)
        self.prefix_cache = PrefixCache(int(self.config.prefix_cache_mb * 2**20))
        self._steps = TrainingSteps(self._graphdef, self.compile_counts, self.config.custom_steps, self.placement,
                                    remat=self.config.remat, attention=self.config.attention)
        self.decoder = DecodeLoop(graphdef=self._graphdef, base=self._base, model_config=self.model_config,
                                  dtype=self._dtype, registry=self.snapshots, prefix_cache=self.prefix_cache,
                                  placement=self.placement,
                                  max_rows=self.config.decode_rows, chunk=self.config.decode_chunk,
                                  min_rows=self._by_backend(self.config.min_decode_rows, 8),
                                  min_prefill_tokens=self._by_backend(self.config.min_prefill_tokens, 128),
                                  min_capacity=self.config.min_seq_bucket, prompt_extras=self._prompt_extras,
                                  compile_counts=self.compile_counts,
                                  continuous=self.config.continuous_batching, prefill_once=self.config.prefill_once,
                                  forward_with_cache=self._forward_with_cache, score_prompts=self._score_prompts,
                                  one_pass_tokens=self.config.max_batch_tokens)
        self.scorer = PrefixScorer(graphdef=self._graphdef, base=self._base, model_config=self.model_config,
                                   dtype=self._dtype, prefix_cache=self.prefix_cache, placement=self.placement,
                                   compile_counts=self.compile_counts, min_capacity=self.config.min_seq_bucket,
                                   token_budget=self.config.max_batch_tokens, place_entry=self.decoder.place_entry,
                                   extract_entry=self.decoder.extract_entry)
        self._cold_tokens = 0  # compute_logprobs tokens the cache knew nothing of (the training forward's)
        # Rows mixing adapters cost G times one adapter's LoRA FLOPs per token (`packing.layout`); this is one's.
        self._lora_cost = lora_relative_flops(self.model_config, self.config.targets, self.config.max_rank)
        self._unmixable: dict[str, int] = {}  # adapter -> the version whose results came out non-finite
        self._topk = jax.jit(self._topk_impl, static_argnames=("k",))
        self._ids = itertools.count()
        self._stats: collections.Counter[str] = collections.Counter()
        self._seconds: collections.Counter[str] = collections.Counter()

    def _by_backend(self, value: int, accelerator: int) -> int:
        """A shape floor from the config: `value`, or for 0 `accelerator` on an accelerator and 1 on CPU."""
        if value:
            return value
        return 1 if self.placement.mesh.devices.flat[0].platform == "cpu" else accelerator

    def _check_length(self, lengths: Iterable[int], what: str = "sequence") -> int:
        """The longest of `lengths`; a ValueError if it exceeds `max_seq_len`."""
        n = max(lengths)
        if n > self.max_seq_len:
            raise ValueError(f"{what} length {n} exceeds the engine's max_seq_len {self.max_seq_len}")
        return n

    # ----------------------------------------------------------------------------------- adapters
    def _new_weights(self, *, rank: int, seed: int, targets: Sequence[str]) -> LoraWeights:
        return self.placement.adapter(init_adapter(
            self.model_config, rank=rank, seed=seed, targets=targets, bank_targets=self.config.targets,
            max_rank=self.config.max_rank, dtype=self._dtype))

    def create_adapter(self, *, rank: int, seed: int = 0, targets: Sequence[str] = ALL_TARGETS,
                       alpha: float = DEFAULT_ALPHA, adapter_id: str | None = None) -> AdapterState:
        if not 0 < rank <= self.config.max_rank:
            raise ValueError(f"rank must be in [1, {self.config.max_rank}] (the engine's max_rank), got {rank}")
        unknown = [t for t in targets if t not in self.config.targets]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not held by this engine (targets={self.config.targets})")
        adapter_id = adapter_id or f"adapter-{next(self._ids)}"
        if adapter_id in self.adapters:
            raise ValueError(f"adapter_id {adapter_id!r} already exists")
        weights = self._new_weights(rank=rank, seed=seed, targets=targets)
        return self.adapters.add(AdapterState(adapter_id, rank, float(alpha), tuple(targets), seed, weights,
                                              incarnation=next(self._ids)))

    def remove_adapter(self, adapter_id: str) -> None:
        """Forget an adapter and free its memory (its published snapshots live on while referenced)."""
        self.adapters.remove(adapter_id)

    def zero_adapter(self) -> LoraWeights:
        """An all-zero adapter in this engine's layout (a shape template; never modified)."""
        return self._zero

    def adapter_weights(self, adapter_id: str) -> LoraWeights:
        """An adapter's current weights (`[L, d_in, R]` / `[L, R, d_out]` per target)."""
        return self.adapters.get(adapter_id).weights

    def training_state(self, adapter_id: str) -> dict[str, Any]:
        """A host copy of everything `save_state` writes, consistent with the adapter's request order."""
        adapter = self.adapters.get(adapter_id)
        opt_state = adapter.opt_state if adapter.opt_state is not None else init_opt_state(adapter.weights)
        weights, opt_state = jax.device_get((adapter.weights, opt_state))
        return {"weights": weights, "opt_state": opt_state, "step": adapter.step, "version": adapter.version}

    def set_adapter_state(self, adapter_id: str, weights: LoraWeights, opt_state: Any | None, step: int) -> int:
        """Overwrite an adapter's weights (and AdamW state; None starts it afresh) and drop its pending
        gradients. Returns the new version."""
        adapter = self.adapters.ensure_resident([adapter_id])[0]
        adapter.weights = self.placement.adapter(weights, self._dtype)
        adapter.opt_state = None if opt_state is None else self.placement.opt_state(opt_state, adapter.weights)
        adapter.grads, adapter.accumulated = None, 0
        adapter.step = step
        adapter.version += 1
        return adapter.version

    # ---------------------------------------------------------------------------- forward/backward
    def _adapter_args(self, weights: Sequence[LoraWeights], scales: Sequence[float]) -> tuple[tuple, np.ndarray]:
        g = bucket(len(weights))
        padded = tuple(weights) + (self._zero,) * (g - len(weights))
        scale = np.zeros((g,), np.float32)
        scale[: len(scales)] = scales
        return padded, scale

    def forward(self, requests: Sequence[ForwardRequest], *, backward: bool) -> list[ForwardResult]:
        """Run requests of one loss (any adapters) as one batch; with `backward`, add each adapter's
        gradient to its accumulator."""
        loss_names = {r.loss_name for r in requests}
        if len(loss_names) != 1:
            raise ValueError(f"one batch runs one loss, got {sorted(loss_names)}")
        loss_name = loss_names.pop()
        t0 = time.perf_counter()
        adapters = self.adapters.ensure_resident([r.adapter_id for r in requests])
        group = {a.adapter_id: i for i, a in enumerate(adapters)}
        weights, scales = self._adapter_args([a.weights for a in adapters], [a.scale for a in adapters])
        flat = [(group[r.adapter_id], d, r.loss_config) for r in requests for d in r.datums]
        results = self._run_forward(loss_name, weights, scales, flat, backward=backward, adapters=adapters)
        self._seconds["forward_backward" if backward else "forward"] += time.perf_counter() - t0
        return self._split(requests, *results)

    def _run_forward(self, loss_name: str, weights: tuple, scales: np.ndarray,
                     flat: list[tuple[int, DatumArrays, dict[str, float]]], *, backward: bool,
                     adapters: Sequence[AdapterState] = (), mix: bool | None = None
                     ) -> tuple[list[np.ndarray], np.ndarray, dict]:
        self._check_length(len(d.tokens) for _, d, _ in flat)
        mix = self.config.pack_across_adapters if mix is None else mix
        if any(self._unmixable.get(a.adapter_id) == a.version for a in adapters):
            mix = False  # an adapter whose results were not finite at these weights: it would rerun every batch
        batch = layout([g for g, _, _ in flat], [d for _, d, _ in flat], [c for _, _, c in flat],
                       LOSSES[loss_name].input_keys, min_bucket=self.config.min_seq_bucket, pack=self.config.pack,
                       mix_cost=self._lora_cost if mix else None)
        arrays = self.placement.batch(batch_arrays(batch))
        grads_finite = None
        if backward:
            grads, logprobs, loss, metrics, grads_finite = self._steps.forward_backward(
                self._base, weights, scales, arrays, loss_name=loss_name, num_datums=batch.num_datums)
        else:
            logprobs, loss, metrics = self._steps.forward(self._base, weights, scales, arrays, loss_name=loss_name,
                                                          num_datums=batch.num_datums)
        # Wait for the step before touching any adapter: an execution error surfaces here, with every
        # adapter's state as it was (so the scheduler can retry each request alone).
        logprobs, loss, metrics, grads_finite = jax.device_get((logprobs, loss, metrics, grads_finite))
        if batch.mixed and not _all_finite(batch, logprobs, loss, grads_finite):
            # A non-finite value in a row shared by several adapters may have leaked into its neighbours
            # (`packing`): run the batch again with one adapter per row, where it cannot.
            self._stats["unmixed_reruns"] += 1
            out = self._run_forward(loss_name, weights, scales, flat, backward=backward, adapters=adapters, mix=False)
            for (group, _, _), logprobs_i, loss_i in zip(flat, out[0], out[1], strict=False):
                if group < len(adapters) and not (np.isfinite(logprobs_i).all() and np.isfinite(loss_i)):
                    self._unmixable[adapters[group].adapter_id] = adapters[group].version
            return out
        if backward:
            new = [grads[i] if a.grads is None else self._steps.accumulate(a.grads, grads[i])
                   for i, a in enumerate(adapters)]
            jax.block_until_ready(new)
            for adapter, g in zip(adapters, new, strict=False):
                adapter.grads = g
                adapter.accumulated += 1
        real = sum(p[2] for p in batch.placement)
        self._stats["batches"] += 1
        self._stats["packed_batches"] += batch.packed
        self._stats["mixed_batches"] += batch.mixed
        self._stats["tokens"] += real
        self._stats["padded_tokens"] += batch.tokens.size
        per_datum = [np.asarray(logprobs[r, s: s + n]) for r, s, n in batch.placement]
        return per_datum, np.asarray(loss), {k: np.asarray(v) for k, v in metrics.items()}

    @staticmethod
    def _split(requests: Sequence[ForwardRequest], logprobs: list[np.ndarray], loss: np.ndarray,
               metrics: dict[str, np.ndarray]) -> list[ForwardResult]:
        results, start = [], 0
        for request in requests:
            idx = slice(start, start + len(request.datums))
            start += len(request.datums)
            out: dict[str, float] = {"loss:sum": float(loss[idx].sum())}
            if "logprob_gap_sum" in metrics:
                count = float(metrics["logprob_gap_count"][idx].sum())
                out["sampler_logprob_gap:mean"] = float(metrics["logprob_gap_sum"][idx].sum()) / max(count, 1.0)
                out["sampler_logprob_gap:max"] = float(metrics["logprob_gap_max"][idx].max())
            results.append(ForwardResult(logprobs[idx], out["loss:sum"], out))
        return results

    def forward_backward_custom(self, request: CustomLossRequest) -> ForwardResult:
        """forward_backward with a user loss traced to a jaxpr (`loss = jax.make_jaxpr(fn)(logprob shapes)`).

        The loss runs inside a compiled step of its own (one forward, one backward); its constants
        (arrays it closed over, e.g. the datums' advantages) are arguments, so a new batch with the same
        loss structure and lengths reuses the step. Callers use `wants_custom_step` to compile only for
        combinations that recur.
        """
        adapter = self.adapters.ensure_resident([request.adapter_id])[0]
        lengths = tuple(len(d.tokens) for d in request.datums)
        step = self._steps.custom_step(request.loss, request.out_tree, lengths)
        b, t = bucket(len(lengths)), length_bucket(max(lengths), self.config.min_seq_bucket)
        tokens, targets = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        for i, d in enumerate(request.datums):
            tokens[i, : len(d.tokens)], targets[i, : len(d.tokens)] = d.tokens, d.inputs["target_tokens"]
        consts = [jnp.asarray(c) for c in request.loss.consts]
        tokens, targets = self.placement.batch((tokens, targets))
        grads, logprobs, value, metrics = step(self._base, adapter.weights, jnp.float32(adapter.scale), tokens,
                                               targets, consts)
        logprobs, value, metrics = jax.device_get((logprobs, value, metrics))
        grads = grads if adapter.grads is None else self._steps.accumulate(adapter.grads, grads)
        adapter.grads = jax.block_until_ready(grads)
        adapter.accumulated += 1
        return ForwardResult([logprobs[i, :n].copy() for i, n in enumerate(lengths)], float(value),
                             {k: float(v) for k, v in metrics.items()})

    def wants_custom_step(self, loss: Any, out_tree: Any, lengths: Sequence[int]) -> bool:
        return self._steps.wants_custom_step(loss, out_tree, lengths)

    # ------------------------------------------------------------------------------------- optim
    def optim_step(self, requests: Sequence[OptimRequest]) -> list[OptimResult]:
        """AdamW for each request's adapter from its accumulated gradients (zero if none), several
        adapters per compiled call; requests of the same adapter apply in order. All or nothing: the
        new states are committed only once every call has succeeded, so a failure (and the
        scheduler's retry of each request alone) never steps an adapter twice."""
        t0 = time.perf_counter()
        metrics: list[dict[str, Any] | None] = [None] * len(requests)
        staged: dict[str, dict[str, Any]] = {}  # adapter id -> its state after the calls so far
        pending = list(enumerate(requests))
        while pending:
            batch, rest, seen = [], [], set()
            for i, request in pending:
                if request.adapter_id in seen or len(batch) >= self.config.max_optim_batch:
                    rest.append((i, request))
                else:
                    seen.add(request.adapter_id)
                    batch.append((i, request))
            adapters = self.adapters.ensure_resident([r.adapter_id for _, r in batch])
            states = [staged.get(a.adapter_id) or {"weights": a.weights, "grads": a.grads, "opt_state": a.opt_state}
                      for a in adapters]
            pad = bucket(len(batch)) - len(batch)  # a power of two of adapters per call: few compiled programs
            params = tuple(st["weights"] for st in states) + (self._zero,) * pad
            grads = tuple(st["grads"] if st["grads"] is not None else self._zero for st in states) + (self._zero,) * pad
            opt = tuple(st["opt_state"] if st["opt_state"] is not None else self.placement.new_opt_state(st["weights"])
                        for st in states) + (self._zero_opt_state,) * pad
            hps = tuple(r.hp for _, r in batch) + (self._zero_hp,) * pad
            new_params, new_opt, step_metrics = self._steps.optim(params, grads, opt, hps)
            step_metrics = jax.device_get(step_metrics)  # waits: an execution error surfaces here
            for k, (i, request) in enumerate(batch):
                staged[request.adapter_id] = {"weights": new_params[k], "grads": None, "opt_state": new_opt[k]}
                metrics[i] = step_metrics[k]
            pending = rest
        for adapter_id, state in staged.items():  # commit
            adapter = self.adapters.get(adapter_id)
            if not adapter.resident:  # paged out by a later call of this batch: keep it on the host
                state = jax.device_get(state)
            adapter.weights, adapter.opt_state = state["weights"], state["opt_state"]
            adapter.grads, adapter.accumulated = None, 0
        results = []
        for request, m in zip(requests, metrics, strict=True):
            adapter = self.adapters.get(request.adapter_id)
            adapter.step += 1
            adapter.version += 1
            results.append(OptimResult({name: float(v) for name, v in m.items()}, adapter.version))
        self._seconds["optim_step"] += time.perf_counter() - t0
        self._stats["optim_steps"] += len(requests)
        return results

    # ---------------------------------------------------------------------------------- snapshots
    def publish(self, adapter_id: str) -> Snapshot:
        """The adapter's current weights as a sampler snapshot (no copy), holding one reference for the
        caller (`release_snapshot` when done)."""
        self.collect()
        adapter = self.adapters.ensure_resident([adapter_id])[0]
        return self._snapshot_of(adapter, adapter.weights)

    def publish_resident(self, adapter_id: str) -> Snapshot | None:
        """`publish` from any thread, for a caller that guarantees no request of the adapter is queued or
        running (`Scheduler.try_now`); None when the adapter is paged out (publish it on the worker, which
        pages it in). Reads only the adapter's immutable weight arrays and the (locked) snapshot registry,
        so it runs beside whatever the worker is doing for other adapters."""
        adapter = self.adapters.get(adapter_id)
        weights = adapter.weights  # once: a page-out on the worker may swap in host copies meanwhile
        if not all(isinstance(w, jax.Array) for w in jax.tree.leaves(weights)):
            return None
        return self._snapshot_of(adapter, weights)

    def _snapshot_of(self, adapter: AdapterState, weights: LoraWeights) -> Snapshot:
        snapshot_id = f"{adapter.adapter_id}#{adapter.incarnation}@v{adapter.version}"
        live = self.snapshots.try_acquire(snapshot_id)
        if live is not None:
            return live
        require_finite(weights, f"adapter {adapter.adapter_id!r} at step {adapter.step}",
                       "training diverged: lower the learning rate or load an earlier checkpoint")
        return self.snapshots.add(Snapshot(snapshot_id, adapter.adapter_id, adapter.version, weights, adapter.scale))

    def add_snapshot(self, snapshot_id: str, weights: LoraWeights, scale: float, version: int,
                     adapter_id: str | None = None) -> Snapshot:
        """Register externally loaded sampler weights (e.g. a saved adapter), holding one reference."""
        self.collect()
        live = self.snapshots.try_acquire(snapshot_id)
        if live is not None:
            return live
        weights = self.placement.adapter(weights, self._dtype)
        require_finite(weights, f"sampler weights {snapshot_id!r}", "the saved adapter is corrupt")
        return self.snapshots.add(Snapshot(snapshot_id, adapter_id, version, weights, scale))

    def acquire_snapshot(self, snapshot_id: str) -> Snapshot:
        return self.snapshots.acquire(snapshot_id)

    def release_snapshot(self, snapshot_id: str) -> None:
        """Drop one reference (any thread); the snapshot is freed when none are left."""
        self.snapshots.release(snapshot_id)

    def collect(self) -> None:
        """Free what released snapshots held: bank slots and prefix-cache entries (worker side)."""
        self.decoder.collect()

    def _snapshot_args(self, snapshot_ids: Sequence[str]) -> tuple[dict[str, int], tuple, np.ndarray]:
        unique = list(dict.fromkeys(snapshot_ids))
        snaps = [self.snapshots.get(s) for s in unique]
        weights, scales = self._adapter_args([s.weights if s.weights is not None else self._zero for s in snaps],
                                             [s.scale for s in snaps])
        return {s: i for i, s in enumerate(unique)}, weights, scales

    def logprobs(self, requests: Sequence[LogprobsRequest]) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for each request (first entry NaN), in one batch. With the prefix cache,
        a request it knows something of (a sampled sequence, one extending a scored one) computes only the
        tokens whose logprobs no cached sequence holds; the others go through the training forward, so
        they equal a training step's logprobs exactly."""
        self.collect()
        self._check_length(len(r.tokens) for r in requests)
        group, weights, scales = self._snapshot_args([r.snapshot_id for r in requests])
        known: list[np.ndarray | None] = [None] * len(requests)
        if self.prefix_cache.enabled:  # what the cache knows something of; the rest through the training forward
            t0 = time.perf_counter()
            known = self.scorer.logprobs(requests, weights, scales, group)
            self._seconds["logprobs"] += time.perf_counter() - t0
        cold = [r for r, k in zip(requests, known, strict=True) if k is None]
        self._cold_tokens += sum(len(r.tokens) for r in cold)
        computed = self._forward_logprobs(cold, group, weights, scales) if cold else []
        for request, logprobs in zip(cold, computed, strict=True):  # cached keys/values of these tokens learn them
            self.prefix_cache.learn_logprobs(request.snapshot_id, request.tokens, logprobs)
        fill = iter(computed)
        return [k if k is not None else next(fill) for k in known]

    def _forward_logprobs(self, requests: Sequence[LogprobsRequest], group: dict[str, int], weights: tuple,
                          scales: np.ndarray) -> list[np.ndarray]:
        flat = [(group[r.snapshot_id], _scored(r.tokens), {}) for r in requests]
        logprobs, _, _ = self._run_forward("cross_entropy", weights, scales, flat, backward=False)
        return [_from_position_one(lp, len(r.tokens)) for lp, r in zip(logprobs, requests, strict=True)]

    def _forward_with_cache(self, jobs: Sequence[SampleJob]) -> tuple[list[np.ndarray], jax.Array, KVCache]:
        """The prompts of `jobs` through the training forward, one row each: their logprobs (for a prompt
        alone, exactly what `logprobs` computes for it when the cache knows nothing of it), last logits and
        keys/values."""
        self._check_length((len(j.prompt) for j in jobs), "prompt")
        group, weights, scales = self._snapshot_args([j.snapshot_id for j in jobs])
        batch = layout([group[j.snapshot_id] for j in jobs], [_scored(j.prompt) for j in jobs], [{}] * len(jobs),
                       LOSSES["cross_entropy"].input_keys, min_bucket=self.config.min_seq_bucket, pack=False)
        last = np.zeros(batch.tokens.shape[0], np.int32)
        last[: len(jobs)] = [len(j.prompt) - 1 for j in jobs]
        arrays, last = self.placement.batch((batch_arrays(batch), last))
        logprobs, last_logits, cache = self._steps.forward_with_cache(self._base, weights, scales, arrays, last)
        logprobs = np.asarray(logprobs)
        self._cold_tokens += sum(len(j.prompt) for j in jobs)
        return [_from_position_one(logprobs[i], len(j.prompt)) for i, j in enumerate(jobs)], last_logits, cache

    def _score_prompts(self, jobs: Sequence[SampleJob]
                       ) -> tuple[list[np.ndarray | None], dict[int, tuple[jax.Array, int]]]:
        """The prompts of `jobs` through the prefix scorer (as `logprobs` computes a sequence the cache knows
        part of): their logprobs, None for a prompt of whose logprobs the cache knows none, and where
        the logits after each scored prompt are."""
        requests = [LogprobsRequest(j.snapshot_id, j.prompt) for j in jobs]
        self._check_length((len(r.tokens) for r in requests), "prompt")
        group, weights, scales = self._snapshot_args([r.snapshot_id for r in requests])
        return self.scorer.logprobs_and_next(requests, weights, scales, group)

    def topk(self, requests: Sequence[LogprobsRequest], k: int) -> list[TopK]:
        """The k most likely tokens at each position t ≥ 1 of each request, given tokens_<t; row 0
        (nothing predicts the first token) holds token 0 with logprob -inf."""
        self.collect()
        k = min(k, self.model_config.vocab_size)
        n = self._check_length(len(r.tokens) for r in requests)
        group, weights, scales = self._snapshot_args([r.snapshot_id for r in requests])
        tokens = np.zeros((bucket(len(requests)), length_bucket(n, self.config.min_seq_bucket)), np.int32)
        rows = np.zeros((tokens.shape[0],), np.int32)
        for i, r in enumerate(requests):
            tokens[i, : len(r.tokens)], rows[i] = r.tokens, group[r.snapshot_id]
        kb = min(bucket(k, 4), self.model_config.vocab_size)
        rows, tokens = self.placement.batch((rows, tokens))
        ids, lps = self._topk(self._base, weights, scales, rows, tokens, k=kb)
        ids, lps = np.asarray(ids)[..., :k], np.asarray(lps)[..., :k]
        out = []
        for i, r in enumerate(requests):
            m = len(r.tokens)
            out.append(TopK(np.concatenate([np.zeros((1, k), np.int32), ids[i, : m - 1]]),
                            np.concatenate([np.full((1, k), -np.inf, np.float32), lps[i, : m - 1]])))
        return out

    def _topk_impl(self, base, adapters, scales, rows, tokens, *, k):
        self.compile_counts["topk"] += 1
        model = nnx.merge(self._graphdef, base)
        logits = model(tokens, hook=self.placement.hook(LoraBank(stack_adapters(adapters), scales), rows))
        values, ids = jax.lax.top_k(logits, k)
        return ids, values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    # ----------------------------------------------------------------------------------- sampling
    def submit_sample(self, job: SampleJob, future: Future | None = None) -> Future:
        """Queue a sampling request for the decode loop (any thread); its future resolves to a
        `SampleResult`. Holds a reference to the snapshot until the request is done."""
        snapshot = self.snapshots.acquire(job.snapshot_id)
        future = future if future is not None else Future()
        self.decoder.submit(job, snapshot, future)
        return future

    def sample(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Sample `jobs` to completion on the calling thread (for callers without a scheduler)."""
        futures = [self.submit_sample(job) for job in jobs]
        while not all(f.done() for f in futures):
            self.step_sampling()
        return [f.result() for f in futures]

    def step_sampling(self) -> None:
        """One step of the decode loop (admit waiting requests, decode a chunk)."""
        t0 = time.perf_counter()
        self.decoder.step()
        self._seconds["sample"] += time.perf_counter() - t0

    def _prompt_extras(self, job: SampleJob) -> tuple[np.ndarray | None, TopK | None]:
        request = LogprobsRequest(job.snapshot_id, job.prompt)
        prompt_lps = self.logprobs([request])[0] if job.prompt_logprobs else None
        prompt_topk = None
        if job.topk_prompt:
            top = self.topk([request], job.topk_prompt)[0]
            prompt_topk = TopK(top.ids[:, : job.topk_prompt], top.logprobs[:, : job.topk_prompt])
        return prompt_lps, prompt_topk

    # ------------------------------------------------------------------------------ observability
    def metrics(self) -> dict[str, Any]:
        """Counters a server exports: compiles, adapters (resident / paged), snapshots, the prefix cache,
        the decode pool, and per-op time and tokens."""
        pool, dec, cache = self.adapters, self.decoder, self.prefix_cache
        padded = max(self._stats["padded_tokens"], 1)
        return {
            "compiles": dict(self.compile_counts),
            "adapters": {"total": len(pool), "resident": pool.resident_count, "paged": len(pool) - pool.resident_count,
                         "page_ins": pool.page_ins, "page_outs": pool.page_outs,
                         "page_in_seconds_mean": pool.page_in_seconds / max(pool.page_ins, 1)},
            "snapshots": {"count": len(self.snapshots), "bytes": self.snapshots.live_bytes(),
                          "sampler_slot_loads": self.snapshots.slot_loads},
            "prefix_cache": {"entries": len(cache), "bytes": cache.bytes, "lookups": cache.lookups,
                             "hits": cache.hits, "cached_tokens": cache.cached_tokens},
            "logprobs": {"cached_requests": self.scorer.stats["requests"], "cached_tokens": self.scorer.stats["tokens"],
                         "computed_tokens": self.scorer.stats["fed_tokens"] + self._cold_tokens},
            "sampling": {"waiting": dec.waiting, "active_rows": dec.active_rows, "chunks": dec.stats["chunks"],
                         "tokens": dec.stats["tokens"], "prefill_tokens": dec.stats["prefill_tokens"],
                         "cached_prompt_tokens": dec.stats["cached_prompt_tokens"],
                         "one_pass_requests": dec.stats["one_pass_requests"],
                         "batch_fill": dec.stats["active_rows"] / max(dec.stats["pool_rows"], 1),
                         "queue_wait_seconds": dec.queue_wait_seconds, "seconds": self._seconds["sample"],
                         "tokens_per_s": dec.stats["tokens"] / max(self._seconds["sample"], 1e-9)},
            "training": {"batches": self._stats["batches"], "packed_batches": self._stats["packed_batches"],
                         "mixed_batches": self._stats["mixed_batches"], "unmixed_reruns": self._stats["unmixed_reruns"],
                         "tokens": self._stats["tokens"], "padding_fraction": 1 - self._stats["tokens"] / padded,
                         "optim_steps": self._stats["optim_steps"],
                         "seconds": {k: v for k, v in self._seconds.items() if k != "sample"},
                         "tokens_per_s": self._stats["tokens"] / max(self._seconds["forward"]
                                                                     + self._seconds["forward_backward"], 1e-9)},
        }


def _scored(tokens: np.ndarray) -> DatumArrays:
    """`tokens` as a datum whose logprobs are wanted (each position's target is the next token)."""
    return DatumArrays(tokens, {"target_tokens": np.append(tokens[1:], 0).astype(np.int32),
                                "weights": np.zeros(len(tokens), np.float32)})


def _from_position_one(logprobs: np.ndarray, n: int) -> np.ndarray:
    """A row's next-token logprobs (position t predicts t + 1) as log p(token_t | tokens_<t) for the n
    tokens: NaN first, as nothing predicts it."""
    return np.concatenate([[np.nan], logprobs[: n - 1]]).astype(np.float32)


def _all_finite(batch: Batch, logprobs: np.ndarray, loss: np.ndarray, grads_finite: np.ndarray | None) -> bool:
    """Whether every datum's logprobs and loss, and every adapter's gradient, came out finite."""
    return (bool(np.isfinite(loss).all()) and (grads_finite is None or bool(np.all(grads_finite)))
            and all(np.isfinite(logprobs[r, s: s + n]).all() for r, s, n in batch.placement))


__all__ = ["BASE", "Engine"]
