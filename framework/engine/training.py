"""The compiled training steps: forward (logprobs + loss; or logprobs, last logits and keys/values for a
prompt to sample after), forward/backward (+ gradients), a custom loss's forward/backward, and AdamW
over several adapters at once.

Adapters come in as a tuple of G weight pytrees (one per adapter the batch uses, padded to a power of
two with a shared all-zero adapter of scale 0) and are stacked inside the step, so a step's cost and
memory follow the adapters it uses, never the number of adapters the engine holds. Gradients come
back per adapter; the engine adds them to each adapter's own accumulator.

Nothing is donated: a step that fails leaves every adapter's weights, moments and gradients as they
were (the engine then retries each request alone, and no tenant's state is lost).

Compiled once per (op, loss, G, rows, row length, datum count, packed, mixed) — all powers of two —
and, for custom losses, per loss structure and lengths (an LRU of `custom_steps` programs).
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from framework.engine.packing import Batch
from framework.engine.placement import Placement
from framework.losses import LOSSES
from framework.optim import adamw_step
from lora import LoraBank, LoraWeights
from models import token_logprobs
from models.kv_cache import KVCache
from models.transformer import causal_attention


def stack_adapters(adapters: Sequence[LoraWeights]) -> LoraWeights:
    """`G` adapters `[L, d, R]` → one bank `[L, G, d, R]` per leaf."""
    return jax.tree.map(lambda *ws: jnp.stack(ws, axis=1), *adapters)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _reduce_by_datum(values: jax.Array, datum_ids: jax.Array, num_datums: int, op: str) -> jax.Array:
    """Per-token `[B*T]` values → per datum `[D]` (padding tokens carry id D and are dropped)."""
    if op == "max":
        return jax.ops.segment_max(values, datum_ids, num_segments=num_datums + 1)[:num_datums]
    return jax.ops.segment_sum(values, datum_ids, num_segments=num_datums + 1)[:num_datums]


_METRIC_REDUCTION = {"logprob_gap_sum": "sum", "logprob_gap_max": "max", "logprob_gap_count": "sum"}


class TrainingSteps:
    """The jitted steps of one engine (state-free: the engine passes everything in)."""

    def __init__(self, graphdef: Any, compile_counts: collections.Counter[str], custom_capacity: int,
                 placement: Placement, *, remat: str = "none", attention: str = "auto"):
        """`remat`: each layer's rematerialisation in backward passes (`models.remat`); `attention`: the
        kernel of unpacked rows (`models.fused_attention`; packed rows take the masked path)."""
        self._graphdef = graphdef
        self._placement = placement
        self._remat = remat
        self._attend = placement.attention(attention)
        self.compile_counts = compile_counts
        self.forward = jax.jit(self._forward_impl, static_argnames=("loss_name", "num_datums"))
        self.forward_backward = jax.jit(self._forward_backward_impl, static_argnames=("loss_name", "num_datums"))
        self.optim = jax.jit(self._optim_impl)
        self.forward_with_cache = jax.jit(self._forward_with_cache_impl)
        self.accumulate = jax.jit(lambda acc, g: placement.constrain_adapter(jax.tree.map(jnp.add, acc, g)))
        self._custom: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._custom_seen: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self._custom_capacity = custom_capacity
        self._lock = threading.Lock()  # `wants_custom_step` runs on client threads

    # ------------------------------------------------------------------------------ built-in losses
    def _logprobs(self, base, adapters, scales, batch_arrays, remat: str = "none") -> jax.Array:
        model = nnx.merge(self._graphdef, base)
        groups = batch_arrays["groups"]  # per token when rows mix adapters: every adapter's products, one-hot
        hook = self._placement.hook(LoraBank(stack_adapters(adapters), scales), groups, one_hot=groups.ndim == 2)
        segments = batch_arrays.get("segments")
        logits = model(batch_arrays["tokens"], batch_arrays["positions"], hook=hook, segment_ids=segments,
                       remat=remat, attention=self._attend if segments is None else None)
        return token_logprobs(logits, batch_arrays["inputs"]["target_tokens"])

    @staticmethod
    def _loss(loss_name, logprobs, batch_arrays, num_datums):
        """Per-token loss summed by datum: `(total, loss [D], metrics {k: [D]})`."""
        inputs = {k: v.reshape(-1, 1) for k, v in batch_arrays["inputs"].items()}
        config = {k: v.reshape(-1) for k, v in batch_arrays["config"].items()}
        loss_tokens, metrics = LOSSES[loss_name].fn(logprobs.reshape(-1, 1), inputs, config)
        ids = batch_arrays["datum_ids"].reshape(-1)
        per_datum = _reduce_by_datum(loss_tokens, ids, num_datums, "sum")
        metrics = {k: _reduce_by_datum(v, ids, num_datums, _METRIC_REDUCTION[k]) for k, v in metrics.items()}
        return loss_tokens.sum(), per_datum, metrics

    def _forward_impl(self, base, adapters, scales, batch_arrays, *, loss_name, num_datums):
        self.compile_counts["forward"] += 1
        logprobs = self._logprobs(base, adapters, scales, batch_arrays)
        _, loss, metrics = self._loss(loss_name, logprobs, batch_arrays, num_datums)
        return logprobs, loss, metrics

    def _forward_backward_impl(self, base, adapters, scales, batch_arrays, *, loss_name, num_datums):
        self.compile_counts["forward_backward"] += 1

        def objective(adapters):
            logprobs = self._logprobs(base, adapters, scales, batch_arrays, self._remat)
            total, loss, metrics = self._loss(loss_name, logprobs, batch_arrays, num_datums)
            return total, (logprobs, loss, metrics)

        grads, (logprobs, loss, metrics) = jax.grad(objective, has_aux=True)(adapters)
        # Rows that mix adapters are checked by the engine (`packing`): here, whether each adapter's
        # gradient is finite.
        finite = None if batch_arrays["groups"].ndim == 1 else jnp.stack([_all_finite(g) for g in grads])
        return tuple(map(self._placement.constrain_adapter, grads)), logprobs, loss, metrics, finite

    def _forward_with_cache_impl(self, base, adapters, scales, batch_arrays, last):
        """The forward's logprobs of unpacked rows, plus what sampling after them needs: each row's logits at
        position `last [B]` and the keys/values of every position (a `KVCache` of capacity T). The same
        operations as `forward`, so the same logprobs; keys/values are recorded on the way."""
        self.compile_counts["forward_with_cache"] += 1
        model = nnx.merge(self._graphdef, base)
        hook = self._placement.hook(LoraBank(stack_adapters(adapters), scales), batch_arrays["groups"])
        keys: list[jax.Array] = []
        values: list[jax.Array] = []
        attend = self._attend or causal_attention

        def recording(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            keys.append(k.transpose(0, 2, 1, 3))  # the cache's head-major [B, K, T, H]
            values.append(v.transpose(0, 2, 1, 3))
            return attend(q, k, v)

        hidden = model.hidden_states(batch_arrays["tokens"], batch_arrays["positions"], hook=hook,
                                     attend_fns=[recording] * model.config.num_layers)
        logits = model.logits(hidden, hook=hook)
        logprobs = token_logprobs(logits, batch_arrays["inputs"]["target_tokens"])
        last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        cache = KVCache(tuple(keys), tuple(values), last + 1)
        return logprobs, self._placement.constrain_rows(last_logits), self._placement.constrain_cache(cache)

    # ---------------------------------------------------------------------------------- custom loss
    def custom_step(self, loss: Any, out_tree: Any, lengths: tuple[int, ...]) -> Any:
        """The compiled step for a traced custom loss over datums of `lengths` (LRU-cached)."""
        key = (str(loss.jaxpr), str(out_tree), lengths)
        with self._lock:
            step = self._custom.get(key)
            if step is None:
                step = jax.jit(functools.partial(self._custom_impl, jaxpr=loss.jaxpr, out_tree=out_tree,
                                                 lengths=lengths))
                self._custom[key] = step
                while len(self._custom) > self._custom_capacity:
                    self._custom.popitem(last=False)
            self._custom.move_to_end(key)
        return step

    def wants_custom_step(self, loss: Any, out_tree: Any, lengths: Sequence[int]) -> bool:
        """Whether a traced custom loss should get a compiled step of its own: once the same structure
        and lengths come a second time (or are compiled already). A one-off is cheaper through the
        two-pass path, which reuses the bucketed cross-entropy steps."""
        key = (str(loss.jaxpr), str(out_tree), tuple(lengths))
        with self._lock:
            seen = self._custom_seen.pop(key, 0) + 1
            self._custom_seen[key] = seen
            while len(self._custom_seen) > 64 * self._custom_capacity:
                self._custom_seen.popitem(last=False)
            return key in self._custom or seen >= 2

    def _custom_impl(self, base, adapter, scale, tokens, targets, consts, *, jaxpr, out_tree, lengths):
        self.compile_counts["forward_backward_custom"] += 1
        model = nnx.merge(self._graphdef, base)
        rows = jnp.zeros((tokens.shape[0],), jnp.int32)

        def objective(adapter):
            hook = self._placement.hook(LoraBank(stack_adapters([adapter]), scale[None]), rows)
            logprobs = token_logprobs(model(tokens, hook=hook, remat=self._remat, attention=self._attend), targets)
            outs = jax.core.eval_jaxpr(jaxpr, consts, *[logprobs[i, :n] for i, n in enumerate(lengths)])
            value, metrics = jax.tree.unflatten(out_tree, outs)
            return value, (logprobs, value, metrics)

        grads, (logprobs, value, metrics) = jax.grad(objective, has_aux=True)(adapter)
        return self._placement.constrain_adapter(grads), logprobs, value, metrics

    # --------------------------------------------------------------------------------------- AdamW
    def _optim_impl(self, params, grads, opt_states, hps):
        """AdamW on K adapters at once (tuples of K); each adapter's update reads only its own state."""
        self.compile_counts["optim_step"] += 1
        out = [adamw_step(p, g, s, hp) for p, g, s, hp in zip(params, grads, opt_states, hps, strict=True)]
        place = self._placement
        return (tuple(place.constrain_adapter(o[0]) for o in out),
                tuple(place.constrain_opt_state(o[1], o[0]) for o in out), tuple(o[2] for o in out))


def batch_arrays(batch: Batch) -> dict[str, Any]:
    """The arrays of a `Batch` the compiled steps read (segments only when packed)."""
    arrays = {"tokens": batch.tokens, "positions": batch.positions, "groups": batch.groups,
              "inputs": batch.inputs, "config": batch.config, "datum_ids": batch.datum_ids}
    if batch.segments is not None:
        arrays["segments"] = batch.segments
    return arrays
