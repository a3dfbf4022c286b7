"""The engine: one base model, many LoRA adapters, and the compiled steps they all share.

State it holds (all device arrays, never part of a traced shape):
- the frozen base parameters, once;
- the training bank (`LoraBank`, slot 0 reserved as "no adapter") and a gradient buffer of the same
  shape, where `forward_backward` accumulates until `optim_step`;
- per adapter: its slot, rank/alpha/targets, AdamW state and step count (= weights version);
- published sampler snapshots (immutable copies of one adapter) and a sampler bank that caches them
  in slots, so sampling never reads a slot that training is changing.

Compiled functions, one per (op, shape bucket): `_fwd` (logprobs + loss, no grad), `_fwd_bwd`
(logprobs, loss, gradients of the used slots only, added into the gradient buffer), `_optim`
(AdamW on one slot), `_sample` (also keyed by the top-k logprob width asked for, a power of two) and
`_topk` (prompt top-k logprobs). Rows are padded to a power of two, lengths to a power of two
≥ `min_seq_bucket`, and the number of distinct adapters in a batch to a power of two, so the
number of compilations stays small and adding or removing an adapter never compiles.

Calls are synchronous and not thread-safe: `framework.scheduler` serialises them on one worker.
Inputs arrive validated (`framework.requests`); the engine re-checks only what would corrupt state.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from framework.losses import LOSSES
from framework.optim import AdamHyperparams, adamw_step, init_opt_state
from framework.sampling import RowParams, generate, sample_keys, truncate_at_stop_strings
from lora import ALL_TARGETS, DEFAULT_ALPHA, LoraBank, LoraWeights, empty_bank, init_adapter, make_hook
from models import Transformer, load_checkpoint, token_logprobs

NULL_SLOT = 0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_adapters: int = 8  # concurrent training adapters (slots 1..max_adapters)
    max_rank: int = 32
    sampler_slots: int = 8  # published snapshots kept in the sampler bank at once
    targets: tuple[str, ...] = ALL_TARGETS  # LoRA targets the banks hold
    dtype: str = "float32"  # base and adapter parameter dtype
    min_seq_bucket: int = 32
    max_seq_len: int = 0  # 0 = the model's max_position_embeddings

    def __post_init__(self) -> None:
        # Training batches must never have one token per row: `lora.make_hook` then mixes every slot into
        # every row, which is only safe for the (finite-checked) sampler bank.
        if self.min_seq_bucket < 2:
            raise ValueError(f"min_seq_bucket must be >= 2, got {self.min_seq_bucket}")


@dataclasses.dataclass
class Adapter:
    adapter_id: str
    slot: int
    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int
    opt_state: Any
    step: int = 0  # optimizer steps applied: the weights version
    accumulated: int = 0  # forward_backward calls since the last optim_step

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Immutable published weights of one adapter version, for sampling."""

    snapshot_id: str
    adapter_id: str | None  # None: the base model
    version: int
    weights: LoraWeights | None
    scale: float


@dataclasses.dataclass(frozen=True)
class DatumArrays:
    """One validated datum: input tokens `[n]` and per-token loss inputs `[n]` (host numpy)."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """One validated sampling request: `num_samples` continuations of `prompt` from a snapshot."""

    snapshot_id: str
    prompt: np.ndarray  # [n] int32
    num_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False
    topk_prompt: int = 0  # > 0: the k most likely tokens at each prompt position
    topk_sample: int = 0  # > 0: the k most likely tokens at each sampled position
    decode: Callable[[list[int]], str] | None = None  # tokenizer decode, needed for stop strings


@dataclasses.dataclass(frozen=True)
class SampledRow:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk: TopK | None = None  # per sampled token, with `topk_sample`


@dataclasses.dataclass(frozen=True)
class TopK:
    """The k most likely tokens at each of n positions, most likely first (raw model logprobs)."""

    ids: np.ndarray  # [n, k] int32
    logprobs: np.ndarray  # [n, k] float32


@dataclasses.dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledRow]
    prompt_logprobs: np.ndarray | None  # [n], NaN for the first token
    version: int
    prompt_topk: TopK | None = None  # [n, k]; row 0 (no prediction for the first token) is unused


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    logprobs: list[np.ndarray]  # per datum, [n]
    loss: float  # sum over the request's datums
    metrics: dict[str, float]


def _require_finite(weights: LoraWeights, what: str, hint: str) -> None:
    """Refuse NaN/inf adapter weights before they reach the sampler bank: a decode step multiplies
    every slot of the batch (`lora.make_hook`), so one tenant's NaN would reach every row."""
    if not all(bool(jnp.isfinite(w).all()) for w in jax.tree.leaves(weights)):
        raise ValueError(f"{what} has non-finite weights (NaN or inf); {hint}")


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Engine:
    """All adapters of one base model, and the compiled steps that serve them together."""

    def __init__(self, base_model: str, config: EngineConfig | None = None, *, model: Transformer | None = None):
        self.config = config or EngineConfig()
        self.base_model = base_model
        self.model = model if model is not None else load_checkpoint(base_model, dtype=self.config.dtype)
        self.model_config = self.model.config
        self.max_seq_len = self.config.max_seq_len or self.model_config.max_position_embeddings
        self._graphdef, self._base = nnx.split(self.model)
        dtype = jnp.dtype(self.config.dtype)
        self._bank = empty_bank(self.model_config, self.config.max_adapters + 1, self.config.max_rank,
                                targets=self.config.targets, dtype=dtype)
        self._grads = jax.tree.map(jnp.zeros_like, self._bank.weights)
        self._sampler_bank = empty_bank(self.model_config, self.config.sampler_slots + 1, self.config.max_rank,
                                        targets=self.config.targets, dtype=dtype)
        self._sampler_cache: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.adapters: dict[str, Adapter] = {}
        self.snapshots: dict[str, Snapshot] = {"base": Snapshot("base", None, 0, None, 0.0)}
        self._ids = itertools.count()
        self.compile_counts: collections.Counter[str] = collections.Counter()
        self._fwd = jax.jit(self._fwd_impl, static_argnames=("loss_name",))
        self._fwd_bwd = jax.jit(self._fwd_bwd_impl, static_argnames=("loss_name",), donate_argnames=("grads",))
        self._optim = jax.jit(self._optim_impl, donate_argnames=("weights", "grads", "opt_state"))
        self._custom_steps: dict[Any, Callable] = {}
        self._custom_seen: collections.Counter[Any] = collections.Counter()
        self._sample = jax.jit(self._sample_impl, static_argnames=("max_new", "capacity", "topk"))
        self._topk = jax.jit(self._topk_impl, static_argnames=("k",))

    # ----------------------------------------------------------------------------------- adapters
    def create_adapter(self, *, rank: int, seed: int = 0, targets: Sequence[str] = ALL_TARGETS,
                       alpha: float = DEFAULT_ALPHA, adapter_id: str | None = None) -> Adapter:
        if not 0 < rank <= self.config.max_rank:
            raise ValueError(f"rank must be in [1, {self.config.max_rank}] (the engine's max_rank), got {rank}")
        unknown = [t for t in targets if t not in self.config.targets]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not held by this engine (targets={self.config.targets})")
        used = {a.slot for a in self.adapters.values()}
        free = [s for s in range(1, self.config.max_adapters + 1) if s not in used]
        if not free:
            raise RuntimeError(f"all {self.config.max_adapters} adapter slots are in use; remove an adapter first")
        adapter_id = adapter_id or f"adapter-{next(self._ids)}"
        if adapter_id in self.adapters:
            raise ValueError(f"adapter_id {adapter_id!r} already exists")
        weights = init_adapter(self.model_config, rank=rank, seed=seed, targets=targets,
                               bank_targets=self.config.targets, max_rank=self.config.max_rank,
                               dtype=jnp.dtype(self.config.dtype))
        adapter = Adapter(adapter_id, free[0], rank, float(alpha), tuple(targets), seed, init_opt_state(weights))
        self._write_slot(adapter, weights)
        self.adapters[adapter_id] = adapter
        return adapter

    def remove_adapter(self, adapter_id: str) -> None:
        adapter = self._adapter(adapter_id)
        self._write_slot(adapter, None)
        del self.adapters[adapter_id]

    def adapter_weights(self, adapter_id: str) -> LoraWeights:
        """The live weights of one adapter (`[L, d_in, R]` / `[L, R, d_out]` per target)."""
        slot = self._adapter(adapter_id).slot
        return jax.tree.map(lambda w: w[:, slot], self._bank.weights)

    def set_adapter_state(self, adapter_id: str, weights: LoraWeights, opt_state: Any | None, step: int) -> None:
        """Overwrite an adapter's weights (and optimizer state, unless None); clears its gradients."""
        adapter = self._adapter(adapter_id)
        self._write_slot(adapter, weights)
        adapter.opt_state = opt_state if opt_state is not None else init_opt_state(weights)
        adapter.step = step

    def _write_slot(self, adapter: Adapter, weights: LoraWeights | None) -> None:
        s, scale = adapter.slot, adapter.scale if weights is not None else 0.0
        if weights is None:
            weights = jax.tree.map(lambda w: jnp.zeros_like(w[:, s]), self._bank.weights)
        self._bank = LoraBank(
            jax.tree.map(lambda w, a: w.at[:, s].set(jnp.asarray(a, w.dtype)), self._bank.weights, weights),
            self._bank.scales.at[s].set(scale),
        )
        self._grads = jax.tree.map(lambda g: g.at[:, s].set(0), self._grads)
        adapter.accumulated = 0

    def _adapter(self, adapter_id: str) -> Adapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise KeyError(f"unknown adapter {adapter_id!r}") from None

    # ------------------------------------------------------------------------- forward / backward
    def forward(self, requests: Sequence[tuple[str, Sequence[DatumArrays], str, dict[str, float]]],
                *, backward: bool) -> list[ForwardResult]:
        """Run `(adapter_id, datums, loss_name, loss_config)` requests of one loss in one batch."""
        loss_names = {r[2] for r in requests}
        if len(loss_names) != 1:
            raise ValueError(f"one batch runs one loss, got {sorted(loss_names)}")
        loss_name = loss_names.pop()
        adapters = [self._adapter(r[0]) for r in requests]
        datums = [(i, d) for i, r in enumerate(requests) for d in r[1]]
        used_slots = sorted({a.slot for a in adapters})
        g = bucket(len(used_slots))
        used = np.full((g,), NULL_SLOT, np.int32)
        used[: len(used_slots)] = used_slots
        local = {s: i for i, s in enumerate(used_slots)}
        batch = self._pack([d for _, d in datums], LOSSES[loss_name].input_keys)
        b = batch["tokens"].shape[0]
        row_slots = np.zeros((b,), np.int32)
        row_slots[: len(datums)] = [local[adapters[i].slot] for i, _ in datums]
        loss_cfg = self._row_configs(loss_name, [requests[i][3] for i, _ in datums], b)
        args = (self._base, self._bank.weights, self._bank.scales, used, row_slots, batch["tokens"],
                batch["inputs"], loss_cfg)
        if backward:
            self._grads, logprobs, loss_rows, metrics = self._fwd_bwd(*args, grads=self._grads, loss_name=loss_name)
            for a in {a.adapter_id: a for a in adapters}.values():
                a.accumulated += 1
        else:
            logprobs, loss_rows, metrics = self._fwd(*args, loss_name=loss_name)
        return self._split_results(requests, datums, np.asarray(logprobs), np.asarray(loss_rows),
                                   {k: np.asarray(v) for k, v in metrics.items()})

    def _pack(self, datums: Sequence[DatumArrays], input_keys: Sequence[str]) -> dict[str, Any]:
        n = max(len(d.tokens) for d in datums)
        if n > self.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds the engine's max_seq_len {self.max_seq_len}")
        t, b = bucket(n, self.config.min_seq_bucket), bucket(len(datums))
        tokens = np.zeros((b, t), np.int32)
        inputs = {k: np.zeros((b, t), np.int32 if k == "target_tokens" else np.float32) for k in input_keys}
        inputs["mask"] = np.zeros((b, t), np.float32)
        for i, d in enumerate(datums):
            m = len(d.tokens)
            tokens[i, :m] = d.tokens
            inputs["mask"][i, :m] = 1.0
            for k in input_keys:
                inputs[k][i, :m] = d.inputs[k]
        return {"tokens": tokens, "inputs": inputs}

    @staticmethod
    def _row_configs(loss_name: str, configs: Sequence[dict[str, float]], rows: int) -> dict[str, np.ndarray]:
        keys = LOSSES[loss_name].config_defaults.keys()
        out = {k: np.zeros((rows,), np.float32) for k in keys}
        for i, cfg in enumerate(configs):
            for k in keys:
                out[k][i] = cfg[k]
        return out

    @staticmethod
    def _split_results(requests, datums, logprobs, loss_rows, metrics) -> list[ForwardResult]:
        per_request: list[list[int]] = [[] for _ in requests]
        for row, (i, _) in enumerate(datums):
            per_request[i].append(row)
        results = []
        for rows in per_request:
            lps = [logprobs[row, : len(datums[row][1].tokens)].copy() for row in rows]
            out: dict[str, float] = {"loss:sum": float(loss_rows[rows].sum())}
            if "logprob_gap_sum" in metrics:
                count = float(metrics["logprob_gap_count"][rows].sum())
                out["sampler_logprob_gap:mean"] = float(metrics["logprob_gap_sum"][rows].sum()) / max(count, 1.0)
                out["sampler_logprob_gap:max"] = float(metrics["logprob_gap_max"][rows].max())
            results.append(ForwardResult(lps, out["loss:sum"], out))
        return results

    def _model_logits(self, base, weights, scales, used, row_slots, tokens):
        model = nnx.merge(self._graphdef, base)
        bank = LoraBank(jax.tree.map(lambda w: w[:, used], weights), scales[used])
        return model(tokens, hook=make_hook(bank, row_slots))

    def _model_logprobs(self, base, weights, scales, used, row_slots, tokens, targets):
        return token_logprobs(self._model_logits(base, weights, scales, used, row_slots, tokens), targets)

    def _fwd_impl(self, base, weights, scales, used, row_slots, tokens, inputs, loss_cfg, *, loss_name):
        self.compile_counts["forward"] += 1
        logprobs = self._model_logprobs(base, weights, scales, used, row_slots, tokens, inputs["target_tokens"])
        loss_rows, metrics = LOSSES[loss_name].fn(logprobs, inputs, loss_cfg)
        return logprobs, loss_rows, metrics

    def _fwd_bwd_impl(self, base, weights, scales, used, row_slots, tokens, inputs, loss_cfg, *, grads, loss_name):
        self.compile_counts["forward_backward"] += 1
        model = nnx.merge(self._graphdef, base)
        sub = jax.tree.map(lambda w: w[:, used], weights)

        def objective(sub_weights):
            hook = make_hook(LoraBank(sub_weights, scales[used]), row_slots)
            logprobs = token_logprobs(model(tokens, hook=hook), inputs["target_tokens"])
            loss_rows, metrics = LOSSES[loss_name].fn(logprobs, inputs, loss_cfg)
            return loss_rows.sum(), (logprobs, loss_rows, metrics)

        sub_grads, (logprobs, loss_rows, metrics) = jax.grad(objective, has_aux=True)(sub)
        grads = jax.tree.map(lambda acc, g: acc.at[:, used].add(g.astype(acc.dtype)), grads, sub_grads)
        return grads, logprobs, loss_rows, metrics

    def forward_backward_custom(self, adapter_id: str, datums: Sequence[DatumArrays], loss: Any, out_tree: Any
                                ) -> tuple[list[np.ndarray], float, dict[str, float]]:
        """forward_backward with a user loss traced to a jaxpr (`loss = jax.make_jaxpr(fn)(logprob shapes)`).

        The loss runs inside the compiled step: one forward, one backward. Its constants (arrays it
        closed over, e.g. the datums' advantages) are passed as arguments, so a new batch with the same
        loss structure and lengths reuses the compiled step; a new structure or length set compiles
        (callers use `wants_custom_step` to compile only for combinations that recur).
        """
        adapter = self._adapter(adapter_id)
        lengths = tuple(len(d.tokens) for d in datums)
        key = (str(loss.jaxpr), lengths)
        step = self._custom_steps.get(key)
        if step is None:
            step = self._custom_steps[key] = jax.jit(
                functools.partial(self._custom_impl, jaxpr=loss.jaxpr, out_tree=out_tree, lengths=lengths),
                donate_argnames=("grads",))
        batch = self._pack(datums, ("target_tokens",))
        used = np.full((1,), adapter.slot, np.int32)
        row_slots = np.zeros((batch["tokens"].shape[0],), np.int32)
        consts = [jnp.asarray(c) for c in loss.consts]
        self._grads, logprobs, value, metrics = step(self._base, self._bank.weights, self._bank.scales, used,
                                                     row_slots, batch["tokens"], batch["inputs"]["target_tokens"],
                                                     consts, grads=self._grads)
        adapter.accumulated += 1
        logprobs = np.asarray(logprobs)
        return ([logprobs[i, :n].copy() for i, n in enumerate(lengths)], float(value),
                {k: float(v) for k, v in metrics.items()})

    def wants_custom_step(self, loss: Any, lengths: Sequence[int]) -> bool:
        """Whether a traced custom loss should run in its own compiled step: yes once the same loss
        structure and lengths come a second time (or are compiled already). A one-off combination is
        cheaper through the two-pass path, which reuses the bucketed cross-entropy steps."""
        key = (str(loss.jaxpr), tuple(lengths))
        self._custom_seen[key] += 1
        return key in self._custom_steps or self._custom_seen[key] >= 2

    def _custom_impl(self, base, weights, scales, used, row_slots, tokens, targets, consts, *, grads, jaxpr,
                     out_tree, lengths):
        self.compile_counts["forward_backward_custom"] += 1
        model = nnx.merge(self._graphdef, base)

        def objective(sub_weights):
            hook = make_hook(LoraBank(sub_weights, scales[used]), row_slots)
            logprobs = token_logprobs(model(tokens, hook=hook), targets)
            outs = jax.core.eval_jaxpr(jaxpr, consts, *[logprobs[i, :n] for i, n in enumerate(lengths)])
            value, metrics = jax.tree.unflatten(out_tree, outs)
            return value, (logprobs, value, metrics)

        sub_grads, (logprobs, value, metrics) = jax.grad(objective, has_aux=True)(
            jax.tree.map(lambda w: w[:, used], weights))
        grads = jax.tree.map(lambda acc, g: acc.at[:, used].add(g.astype(acc.dtype)), grads, sub_grads)
        return grads, logprobs, value, metrics

    # ------------------------------------------------------------------------------------ optim
    def optim_step(self, adapter_id: str, hp: AdamHyperparams) -> dict[str, float]:
        adapter = self._adapter(adapter_id)
        weights, self._grads, adapter.opt_state, metrics = self._optim(
            self._bank.weights, self._grads, adapter.opt_state, np.int32(adapter.slot), hp)
        self._bank = LoraBank(weights, self._bank.scales)
        adapter.step += 1
        adapter.accumulated = 0
        return {k: float(v) for k, v in metrics.items()}

    def _optim_impl(self, weights, grads, opt_state, slot, hp):
        self.compile_counts["optim_step"] += 1
        params = jax.tree.map(lambda w: w[:, slot], weights)
        slot_grads = jax.tree.map(lambda g: g[:, slot], grads)
        params, opt_state, metrics = adamw_step(params, slot_grads, opt_state, hp)
        weights = jax.tree.map(lambda w, p: w.at[:, slot].set(p), weights, params)
        grads = jax.tree.map(lambda g: g.at[:, slot].set(0), grads)
        return weights, grads, opt_state, metrics

    # ------------------------------------------------------------------------ sampler snapshots
    def publish(self, adapter_id: str) -> Snapshot:
        """Freeze the adapter's current weights as a new sampler snapshot."""
        adapter = self._adapter(adapter_id)
        snapshot_id = f"{adapter_id}@{adapter.step}"
        if snapshot_id not in self.snapshots:
            weights = jax.tree.map(jnp.copy, self.adapter_weights(adapter_id))
            _require_finite(weights, f"adapter {adapter_id!r} at step {adapter.step}",
                            "training diverged: lower the learning rate or load an earlier checkpoint")
            self.snapshots[snapshot_id] = Snapshot(snapshot_id, adapter_id, adapter.step, weights, adapter.scale)
        return self.snapshots[snapshot_id]

    def add_snapshot(self, snapshot_id: str, weights: LoraWeights, scale: float, version: int,
                     adapter_id: str | None = None) -> Snapshot:
        """Register externally loaded sampler weights (e.g. a saved checkpoint) as a snapshot."""
        weights = jax.tree.map(lambda w: jnp.asarray(w, self.config.dtype), weights)
        _require_finite(weights, f"sampler weights {snapshot_id!r}", "the saved adapter is corrupt")
        self.snapshots[snapshot_id] = Snapshot(snapshot_id, adapter_id, version, weights, scale)
        return self.snapshots[snapshot_id]

    def _sampler_slots(self, snapshot_ids: Sequence[str]) -> dict[str, int]:
        """Load the snapshots into the sampler bank (LRU) and return their slots."""
        wanted = list(dict.fromkeys(snapshot_ids))
        if len([s for s in wanted if s != "base"]) > self.config.sampler_slots:
            raise ValueError(f"a sampling batch may use at most {self.config.sampler_slots} snapshots")
        slots = {"base": NULL_SLOT}
        for sid in wanted:
            if sid == "base":
                continue
            snap = self.snapshots[sid]
            if sid in self._sampler_cache:
                self._sampler_cache.move_to_end(sid)
            else:
                taken = set(self._sampler_cache.values())
                free = [s for s in range(1, self.config.sampler_slots + 1) if s not in taken]
                if not free:
                    evict = next(k for k in self._sampler_cache if k not in wanted)
                    free = [self._sampler_cache.pop(evict)]
                self._sampler_cache[sid] = free[0]
                s = free[0]
                self._sampler_bank = LoraBank(
                    jax.tree.map(lambda w, a, s=s: w.at[:, s].set(a), self._sampler_bank.weights, snap.weights),
                    self._sampler_bank.scales.at[s].set(snap.scale))
            slots[sid] = self._sampler_cache[sid]
        return slots

    def snapshot_logprobs(self, requests: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for each `(snapshot_id, tokens [n])`; the first entry is NaN."""
        datums = [DatumArrays(t, {"target_tokens": np.append(t[1:], 0), "weights": np.zeros(len(t), np.float32)})
                  for _, t in requests]
        batch = self._pack(datums, ("target_tokens", "weights"))
        used, row_slots = self._snapshot_rows([sid for sid, _ in requests], batch["tokens"].shape[0])
        logprobs, _, _ = self._fwd(self._base, self._sampler_bank.weights, self._sampler_bank.scales, used, row_slots,
                                   batch["tokens"], batch["inputs"], {}, loss_name="cross_entropy")
        logprobs = np.asarray(logprobs)
        return [np.concatenate([[np.nan], logprobs[i, : len(t) - 1]]).astype(np.float32)
                for i, (_, t) in enumerate(requests)]

    def snapshot_topk(self, requests: Sequence[tuple[str, np.ndarray]], k: int) -> list[TopK]:
        """The k most likely tokens at each position t ≥ 1 of each `(snapshot_id, tokens [n])`, given
        tokens_<t; row 0 (nothing predicts the first token) holds token 0 with logprob -inf."""
        k = min(k, self.model_config.vocab_size)
        n = max(len(t) for _, t in requests)
        if n > self.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds the engine's max_seq_len {self.max_seq_len}")
        tokens = np.zeros((bucket(len(requests)), bucket(n, self.config.min_seq_bucket)), np.int32)
        for i, (_, t) in enumerate(requests):
            tokens[i, : len(t)] = t
        used, row_slots = self._snapshot_rows([sid for sid, _ in requests], tokens.shape[0])
        kb = min(bucket(k, 4), self.model_config.vocab_size)
        ids, logprobs = self._topk(self._base, self._sampler_bank.weights, self._sampler_bank.scales, used,
                                   row_slots, tokens, k=kb)
        ids, logprobs = np.asarray(ids)[..., :k], np.asarray(logprobs)[..., :k]
        out = []
        for i, (_, t) in enumerate(requests):
            row_ids = np.concatenate([np.zeros((1, k), np.int32), ids[i, : len(t) - 1]])
            row_lps = np.concatenate([np.full((1, k), -np.inf, np.float32), logprobs[i, : len(t) - 1]])
            out.append(TopK(row_ids, row_lps))
        return out

    def _topk_impl(self, base, weights, scales, used, row_slots, tokens, *, k):
        self.compile_counts["topk"] += 1
        logits = self._model_logits(base, weights, scales, used, row_slots, tokens).astype(jnp.float32)
        values, ids = jax.lax.top_k(logits, k)
        return ids, values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def _snapshot_rows(self, snapshot_ids: Sequence[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Load the snapshots into the sampler bank; `used` (its slots, padded to a power of two) and
        each row's index into `used` (padding rows read the first)."""
        slots = self._sampler_slots(snapshot_ids)
        sampler_slots = sorted({slots[sid] for sid in snapshot_ids})
        used = np.full((bucket(len(sampler_slots)),), NULL_SLOT, np.int32)
        used[: len(sampler_slots)] = sampler_slots
        local = {s: i for i, s in enumerate(sampler_slots)}
        row_slots = np.zeros((rows,), np.int32)
        row_slots[: len(snapshot_ids)] = [local[slots[sid]] for sid in snapshot_ids]
        return used, row_slots

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Sample every job's `num_samples` rows in one batch (any mix of snapshots and settings)."""
        for job in jobs:
            if job.snapshot_id not in self.snapshots:
                raise KeyError(f"unknown sampler snapshot {job.snapshot_id!r}")
        rows = [(j, i) for j in jobs for i in range(j.num_samples)]
        b = bucket(len(rows))
        t = bucket(max(len(j.prompt) for j in jobs), self.config.min_seq_bucket)
        max_new = bucket(max(j.max_tokens for j in jobs), 16)
        k = max(j.topk_sample for j in jobs)
        topk = min(bucket(k, 4), self.model_config.vocab_size) if k else 0  # few distinct compiled shapes
        m = bucket(max([len(j.stop_tokens) for j in jobs] + [1]), 4)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        temperature, top_p = np.ones((b,), np.float32), np.ones((b,), np.float32)
        top_k, max_tokens = np.full((b,), -1, np.int32), np.ones((b,), np.int32)
        stop_tokens = np.full((b, m), -1, np.int32)
        keys = [sample_keys(j.seed, j.num_samples) for j in jobs]
        keys = jnp.concatenate([*keys, sample_keys(0, b - len(rows))] if b > len(rows) else keys)
        used, row_slots = self._snapshot_rows([j.snapshot_id for j, _ in rows], b)
        for r, (j, _) in enumerate(rows):
            tokens[r, : len(j.prompt)] = j.prompt
            lengths[r] = len(j.prompt)
            temperature[r], top_p[r], top_k[r], max_tokens[r] = j.temperature, j.top_p, j.top_k, j.max_tokens
            stop_tokens[r, : len(j.stop_tokens)] = j.stop_tokens
        params = RowParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, keys=keys,
                           stop_tokens=stop_tokens)
        out = self._sample(self._base, self._sampler_bank.weights, self._sampler_bank.scales, used, row_slots,
                           tokens, lengths, params, max_new=max_new, capacity=t + max_new, topk=topk)
        out_tokens, out_logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
        num_tokens, hit_stop = np.asarray(out.num_tokens), np.asarray(out.hit_stop_token)
        if topk:
            topk_ids, topk_logprobs = np.asarray(out.topk_ids), np.asarray(out.topk_logprobs)
        with_lps = [j for j in jobs if j.prompt_logprobs]
        prompt_lps = dict(zip(map(id, with_lps), self.snapshot_logprobs([(j.snapshot_id, j.prompt) for j in with_lps])
                              if with_lps else [], strict=True))
        with_topk = [j for j in jobs if j.topk_prompt]
        prompt_topk = dict(zip(map(id, with_topk), self.snapshot_topk(
            [(j.snapshot_id, j.prompt) for j in with_topk], max(j.topk_prompt for j in with_topk))
            if with_topk else [], strict=True))
        results, r = [], 0
        for j in jobs:
            sequences = []
            for _ in range(j.num_samples):
                n, stopped = int(num_tokens[r]), bool(hit_stop[r])
                ids = out_tokens[r, :n].tolist()
                if j.stop_strings and j.decode is not None:
                    keep, hit = truncate_at_stop_strings(ids, list(j.stop_strings), j.decode)
                    if hit:
                        n, stopped, ids = keep, True, ids[:keep]
                top = (TopK(topk_ids[r, :n, : j.topk_sample], topk_logprobs[r, :n, : j.topk_sample])
                       if j.topk_sample else None)
                sequences.append(SampledRow(ids, out_logprobs[r, :n].tolist(), "stop" if stopped else "length", top))
                r += 1
            top = prompt_topk.get(id(j))
            if top is not None:
                top = TopK(top.ids[:, : j.topk_prompt], top.logprobs[:, : j.topk_prompt])
            results.append(SampleResult(sequences, prompt_lps.get(id(j)), self.snapshots[j.snapshot_id].version, top))
        return results

    def _sample_impl(self, base, weights, scales, used, row_slots, tokens, lengths, params, *, max_new, capacity,
                     topk):
        self.compile_counts["sample"] += 1
        model = nnx.merge(self._graphdef, base)
        hook = make_hook(LoraBank(jax.tree.map(lambda w: w[:, used], weights), scales[used]), row_slots)
        return generate(model, hook, tokens, lengths, params, max_new=max_new, capacity=capacity, topk_logprobs=topk)
