"""The engine's compiled steps as pure functions, runnable unsharded or on a mesh: shared by the
8-device equality worker (`mesh_worker.py`) and the two-process test (`multihost_worker.py`).

Each step is what `framework.engine` compiles, written against `framework.sharding` the way
`docs/sharding.md` tells the engine to: inputs placed by `MeshRules`, the projections' outputs
pinned by `MeshRules.constraining_hook`, persistent state (gradient buffer, bank, AdamW state)
given explicit out shardings and donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora
from framework.optim import AdamHyperparams, adamw_step, init_opt_state
from framework.sampling import RowParams, generate
from framework.sharding import MeshRules
from models import ModelConfig, Transformer, token_logprobs
from models.kv_cache import KVCache, decode_step, prefill

MESHES: tuple[tuple[int, int], ...] = ((8, 1), (4, 2), (2, 4), (1, 8))
"""(fsdp, tp) meshes over 8 devices."""
PLAN: dict[str, tuple[tuple[int, int], ...]] = {"divisible": MESHES, "odd": ((2, 4), (1, 8))}
"""Meshes per checkpoint role: every dimension of `divisible` splits on every mesh; `odd` has heads,
kv heads and a vocabulary that some or all `tp` sizes do not divide (replicated there)."""
GENERATE = ("divisible", (2, 4))
"""The one case that also samples through `framework.sampling.generate` (the others: the KV cache)."""

SLOTS, RANK = 4, 4
TARGETS = ("q", "k", "o", "up", "down", "unembed")
"""One LoRA target per kind of kernel axes (v and gate split like k and up), to keep compiles short."""
ROWS, LENGTH = 8, 16
PROMPT, NEW_TOKENS = 8, 6


def random_bank(config: ModelConfig, seed: int = 0) -> lora.LoraBank:
    """A bank with non-zero A and B in every slot (so every slot changes the logits and gets gradients)."""
    rng = np.random.default_rng(seed)
    bank = jax.eval_shape(lambda: lora.empty_bank(config, SLOTS, RANK, targets=TARGETS))
    weights = {t: {k: rng.normal(0, 0.05, w.shape).astype(np.float32) for k, w in ab.items()}
               for t, ab in bank.weights.items()}
    return lora.LoraBank(weights, np.linspace(0.5, 2.0, SLOTS).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] f32
    slot_ids: np.ndarray  # [B] int32


def make_batch(config: ModelConfig, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, (ROWS, LENGTH + 1)).astype(np.int32)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, ROWS)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.float32)
    return Batch(tokens[:, :-1], tokens[:, 1:], mask, (np.arange(ROWS) % SLOTS).astype(np.int32))


class Steps:
    """The jitted steps for one model on one placement (`rules=None`: one device, no constraints)."""

    def __init__(self, graphdef: Any, config: ModelConfig, rules: MeshRules | None):
        self.graphdef, self.config, self.rules = graphdef, config, rules
        self._jits: dict[str, Any] = {}

    def hook(self, bank: lora.LoraBank, slot_ids: jax.Array):
        if self.rules is None:
            return lora.make_hook(bank, slot_ids)
        return self.rules.constraining_hook(lora.make_hook(bank, slot_ids, layout=self.rules.adapter_layout()))

    def model(self, base: nnx.State) -> Transformer:
        return nnx.merge(self.graphdef, base)

    # ------------------------------------------------------------------ forward / gradients
    def train_step(self, base, bank, grads, batch: Batch) -> tuple[Any, jax.Array, jax.Array]:
        """Cross-entropy gradients w.r.t. the bank weights, added into the `grads` buffer (donated), with
        the loss and the per-token logprobs. Compiled once (`self.train_hlo` holds its HLO text)."""

        def train(base, bank, grads, tokens, targets, mask, slot_ids):
            def loss(weights):
                hook = self.hook(lora.LoraBank(weights, bank.scales), slot_ids)
                lp = token_logprobs(self.model(base)(tokens, hook=hook), targets)
                return -(lp * mask).sum(), lp

            (value, lp), g = jax.value_and_grad(loss, has_aux=True)(bank.weights)
            return jax.tree.map(jnp.add, grads, g), value, lp

        args = (base, bank, grads, batch.tokens, batch.targets, batch.mask, batch.slot_ids)
        if "train" not in self._jits:
            out = None
            if self.rules is not None:
                out = (self.rules.adapter_shardings(grads, slots=True), self.rules.replicated(),
                       self.rules.batch_sharding(batch.tokens.shape))
            self._jits["train"] = jax.jit(train, donate_argnums=(2,), out_shardings=out).lower(*args).compile()
            self.train_hlo = self._jits["train"].as_text()
            self.train_memory = self._jits["train"].memory_analysis()
        return self._jits["train"](*args)

    def optim_step(self, bank_weights, grads, opt_state, slot: int, hp: AdamHyperparams):
        """AdamW on one slot of the bank, as the engine's `optim_step`: (weights, grads, opt_state)."""

        def optim(weights, grads, opt_state, slot, hp):
            params = jax.tree.map(lambda w: w[:, slot], weights)
            new, opt_state, _ = adamw_step(params, jax.tree.map(lambda g: g[:, slot], grads), opt_state, hp)
            weights = jax.tree.map(lambda w, p: w.at[:, slot].set(p), weights, new)
            return weights, jax.tree.map(lambda g: g.at[:, slot].set(0), grads), opt_state

        if "optim" not in self._jits:
            out = None
            if self.rules is not None:
                bank_s = self.rules.adapter_shardings(bank_weights, slots=True)
                one = jax.eval_shape(lambda ws: jax.tree.map(lambda w: w[:, 0], ws), bank_weights)
                out = (bank_s, bank_s, self.rules.opt_state_shardings(
                    init_opt_state, opt_state, self.rules.adapter_shardings(one, slots=False)))
            self._jits["optim"] = jax.jit(optim, donate_argnums=(0, 1, 2), out_shardings=out)
        return self._jits["optim"](bank_weights, grads, opt_state, np.int32(slot), hp)

    # --------------------------------------------------------------------------- sampling
    def greedy_generate(self, base, bank, tokens, lengths, slot_ids):
        """`framework.sampling.generate` at temperature 0 (its KV cache placed by propagation)."""

        def sample(base, bank, tokens, lengths, slot_ids):
            params = RowParams.create(jax.random.split(jax.random.key(0), tokens.shape[0]), temperature=0.0,
                                      max_tokens=NEW_TOKENS)
            out = generate(self.model(base), self.hook(bank, slot_ids), tokens, lengths, params,
                           max_new=NEW_TOKENS, capacity=tokens.shape[1] + NEW_TOKENS)
            return out.tokens, out.logprobs

        return jax.jit(sample)(base, bank, tokens, lengths, slot_ids)

    def cached_greedy(self, base, bank, tokens, lengths, slot_ids):
        """Greedy decoding with an explicitly sharded KV cache: prefill, then one jitted step per token
        with the cache donated and given its shardings in and out (the continuous-batching pattern)."""
        b, t = tokens.shape
        cache = jax.eval_shape(lambda: KVCache.empty(self.config, b, t + NEW_TOKENS, jnp.float32))
        cache_s = None if self.rules is None else self.rules.kv_cache_shardings(cache)
        cache = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), cache), cache_s)

        def greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return token, jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]

        def pre(base, bank, tokens, lengths, slot_ids, cache):
            logits, cache = prefill(self.model(base), tokens, lengths, cache, hook=self.hook(bank, slot_ids))
            return greedy(logits), cache

        def dec(base, bank, token, slot_ids, cache):
            logits, cache = decode_step(self.model(base), token, cache, hook=self.hook(bank, slot_ids))
            return greedy(logits), cache

        out = None if cache_s is None else (None, cache_s)
        pre = jax.jit(pre, donate_argnums=(5,), out_shardings=out)
        dec = jax.jit(dec, donate_argnums=(4,), out_shardings=out)
        (token, logprob), cache = pre(base, bank, tokens, lengths, slot_ids, cache)
        chosen, logprobs = [token], [logprob]
        for _ in range(NEW_TOKENS - 1):
            (token, logprob), cache = dec(base, bank, token, slot_ids, cache)
            chosen.append(token)
            logprobs.append(logprob)
        return np.stack(chosen, 1), np.stack(logprobs, 1), cache


def prompts(config: ModelConfig, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, (ROWS, PROMPT)).astype(np.int32)
    lengths = rng.integers(2, PROMPT + 1, ROWS).astype(np.int32)
    return tokens, lengths
