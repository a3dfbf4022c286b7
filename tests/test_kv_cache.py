"""KV-cache decoding equals repeated full forwards: the same greedy tokens and the same logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import load_checkpoint
from models.kv_cache import KVCache, greedy_generate, prefill

NEW_TOKENS = 10


@pytest.mark.parametrize("name", ["qwen3", "llama3_rope_scaling", "qwen2"])
def test_greedy_cache_matches_full_forward(tiny_checkpoint, name):
    model = load_checkpoint(tiny_checkpoint(name))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (3, 12)), jnp.int32)
    lengths = np.array([12, 5, 9])
    new, step_logits = greedy_generate(model, tokens, jnp.asarray(lengths, jnp.int32), NEW_TOKENS)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
    # Reference: every step, one full forward over all rows (right-padded to a fixed shape).
    sequences = np.zeros((3, 12 + NEW_TOKENS), np.int32)
    sequences[:, :12] = np.asarray(tokens)
    for s in range(NEW_TOKENS):
        full = np.asarray(forward(state, jnp.asarray(sequences)))[np.arange(3), lengths + s - 1]
        np.testing.assert_allclose(np.asarray(step_logits[:, s]), full, atol=1e-4, rtol=0)
        assert np.asarray(new[:, s]).tolist() == np.argmax(full, axis=-1).tolist(), s
        sequences[np.arange(3), lengths + s] = np.argmax(full, axis=-1)

def test_prefill_all_logits_match_forward_and_capacity_is_checked(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("llama_gqa"))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16)), jnp.int32)
    cache = KVCache.empty(model.config, 2, 24, model.dtype)
    logits, filled = prefill(model, tokens, jnp.asarray([16, 7], jnp.int32), cache, all_logits=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5, rtol=0)
    assert np.asarray(filled.lengths).tolist() == [16, 7]
    with pytest.raises(ValueError, match="exceeds the KV cache capacity"):
        prefill(model, tokens, jnp.asarray([16, 7], jnp.int32), KVCache.empty(model.config, 2, 8, model.dtype))
