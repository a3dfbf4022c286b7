"""The accelerator attention kernels compute what our CPU attention computes: `jax.nn`'s XLA
implementation and the TPU splash kernel (run by the Pallas interpreter) against
`causal_attention`, values and gradients, alone and inside the model; the choice by backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import fused_attention as fa
from models import load_checkpoint, token_logprobs
from models.transformer import causal_attention

SPLASH = functools.partial(fa.splash_attention, interpret=True)


def qkv(t: int, n: int = 4, kv: int = 2, h: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, t, kv, h)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize(("kernel", "t"), [(fa.xla_attention, 40), (SPLASH, 256), (SPLASH, 40)],
                         ids=["xla", "splash-2-blocks", "splash-fallback"])
def test_kernel_equals_reference_values_and_gradients(kernel, t):
    q, k, v = qkv(t)
    np.testing.assert_allclose(np.asarray(jax.jit(kernel)(q, k, v)), np.asarray(causal_attention(q, k, v)),
                               atol=1e-5, rtol=0)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    grad = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    for ours, ref in zip(grad(kernel), grad(causal_attention), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=0)


def test_cudnn_off_gpu_falls_back_to_reference():
    q, k, v = qkv(32)
    np.testing.assert_array_equal(np.asarray(fa.cudnn_attention(q, k, v)), np.asarray(causal_attention(q, k, v)))


def test_model_logprobs_equal_with_each_kernel(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("qwen3_tied_mha"))  # 6 heads of 12 (MHA), 2 layers
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 301, (2, 129)), jnp.int32)

    @functools.partial(jax.jit, static_argnames="attention")
    def logprobs(state, tokens, attention):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1], attention=attention)
        return token_logprobs(logits, tokens[:, 1:])

    ref = np.asarray(logprobs(state, tokens, None))
    for kernel in (fa.xla_attention, SPLASH):
        np.testing.assert_allclose(np.asarray(logprobs(state, tokens, kernel)), ref, atol=1e-5, rtol=0)


def test_choice_by_backend_and_names():
    assert fa.causal_attention_fn("auto", backend="cpu") is causal_attention
    assert fa.causal_attention_fn("auto", backend="gpu") is fa.cudnn_attention
    assert fa.causal_attention_fn("auto", backend="tpu") is fa.splash_attention
    assert fa.causal_attention_fn("xla") is fa.xla_attention
    assert fa.causal_attention_fn() is causal_attention  # this suite runs on CPU
    with pytest.raises(ValueError, match="attention must be one of"):
        fa.causal_attention_fn("flash")
