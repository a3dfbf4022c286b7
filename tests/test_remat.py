"""Rematerialisation (`models.remat`): the same gradients under every policy, fewer values kept
for the backward pass (measured: the forward's residual buffers in XLA's memory analysis)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora
from models import load_checkpoint, token_logprobs
from models.remat import REMAT_NAMES


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("llama_sharded"))  # 2 layers
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    bank = lora.empty_bank(model.config, 3, 4)
    bank = lora.LoraBank(jax.tree.map(lambda w: jnp.asarray(rng.normal(0, 0.05, w.shape), jnp.float32), bank.weights),
                         jnp.asarray([0.5, 1.0, 2.0], jnp.float32))
    tokens = jnp.asarray(rng.integers(3, 301, (4, 33)), jnp.int32)
    return graphdef, state, bank, tokens


def _loss(graphdef, state, scales, tokens, remat, weights):
    hook = lora.make_hook(lora.LoraBank(weights, scales), jnp.arange(tokens.shape[0]) % 3)
    logits = nnx.merge(graphdef, state)(tokens[:, :-1], hook=hook, remat=remat)
    return -token_logprobs(logits, tokens[:, 1:]).sum()


def test_every_policy_gives_the_same_gradients(setup):
    graphdef, state, bank, tokens = setup
    grads = {}
    for remat in REMAT_NAMES:
        fn = jax.jit(jax.grad(functools.partial(_loss, graphdef, state, bank.scales, tokens, remat)))
        grads[remat] = fn(bank.weights)
    for remat in REMAT_NAMES[1:]:
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_policies_keep_fewer_residuals(setup):
    graphdef, state, bank, tokens = setup

    def residual_bytes(remat: str) -> int:
        def forward(weights, state, scales, tokens):  # the vjp closure's leaves: what the backward keeps
            return jax.vjp(functools.partial(_loss, graphdef, state, scales, tokens, remat), weights)[1]

        compiled = jax.jit(forward).lower(bank.weights, state, bank.scales, tokens).compile()
        return compiled.memory_analysis().output_size_in_bytes

    sizes = {r: residual_bytes(r) for r in REMAT_NAMES}
    assert sizes["full"] < sizes["dots"] < sizes["none"], sizes
    assert sizes["full"] < sizes["none"] / 2, sizes


def test_bad_policy_and_cache_passes_are_refused(setup):
    graphdef, state, _, tokens = setup
    model = nnx.merge(graphdef, state)
    with pytest.raises(ValueError, match="remat must be one of none, full, dots"):
        model(tokens, remat="everything")
    attend = [lambda q, k, v: q] * model.config.num_layers
    with pytest.raises(ValueError, match="not with attend_fns"):
        model.hidden_states(tokens, attend_fns=attend, remat="full")
