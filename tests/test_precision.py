"""bf16 base model, fp32 everything that accumulates: a LoRA training step's dtypes, end to end, and
its numbers against the fp32 step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora
from framework.optim import AdamHyperparams, adamw_step, init_opt_state
from framework.precision import Precision
from models import load_checkpoint, token_logprobs


def _step(graphdef, state, bank, tokens, compute_dtype):
    """Logits, loss, bank gradients and one AdamW update of slot 1, all inside one jit."""

    def loss(weights):
        hook = lora.make_hook(lora.LoraBank(weights, bank.scales), jnp.arange(tokens.shape[0]) % 2 + 1,
                              compute_dtype=compute_dtype)
        model = nnx.merge(graphdef, state)
        hidden = model.hidden_states(tokens[:, :-1], hook=hook)
        logits = model.logits(hidden, hook=hook)
        lp = token_logprobs(logits, tokens[:, 1:])
        return -lp.sum(), (hidden, logits, lp)

    (value, (hidden, logits, lp)), grads = jax.value_and_grad(loss, has_aux=True)(bank.weights)
    one = jax.tree.map(lambda w: w[:, 1], bank.weights)
    new, opt_state, _ = adamw_step(one, jax.tree.map(lambda g: g[:, 1], grads), init_opt_state(one),
                                   AdamHyperparams.make(1e-3))
    return {"hidden": hidden, "logits": logits, "logprobs": lp, "loss": value, "grads": grads, "adapter": new,
            "opt_state": opt_state}


@pytest.fixture(scope="module")
def steps(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 301, (4, 17)), jnp.int32)
    out = {}
    for name, precision in (("fp32", Precision()), ("bf16", Precision(params="bfloat16"))):
        model = load_checkpoint(path, dtype=precision.params)
        graphdef, state = nnx.split(model)
        bank = lora.empty_bank(model.config, 3, 4, dtype=precision.adapters)
        same = np.random.default_rng(1)  # the same adapters for both precisions
        bank = lora.LoraBank(jax.tree.map(lambda w, r=same: jnp.asarray(r.normal(0, 0.1, w.shape), w.dtype),
                                          bank.weights),
                             jnp.asarray([0.0, 1.0, 2.0], jnp.float32))
        fn = jax.jit(functools.partial(_step, graphdef, compute_dtype=precision.compute))
        out[name] = (fn(state, bank, tokens), fn.lower(state, bank, tokens).as_text())
    return out


def test_bf16_model_keeps_logits_loss_gradients_and_adam_in_fp32(steps):
    out, _ = steps["bf16"]
    assert out["hidden"].dtype == jnp.bfloat16  # the residual stream is the model's dtype
    for key in ("logits", "logprobs", "loss"):
        assert out[key].dtype == jnp.float32, key
    for tree in ("grads", "adapter", "opt_state"):
        dtypes = {x.dtype for x in jax.tree.leaves(out[tree]) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (tree, dtypes)


def test_bf16_matmuls_run_in_bf16(steps):
    _, hlo = steps["bf16"]
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    bf16 = [d for d in dots if d.count("bf16") >= 2]
    f32_only = [d for d in dots if "bf16" not in d]
    assert len(bf16) > len(f32_only), f"{len(bf16)} bf16 matmuls, {len(f32_only)} fp32 ones"
    _, hlo32 = steps["fp32"]
    assert "bf16" not in hlo32


def test_bf16_step_is_close_to_fp32(steps):
    a, b = steps["bf16"][0], steps["fp32"][0]
    np.testing.assert_allclose(np.asarray(a["logprobs"]), np.asarray(b["logprobs"]), atol=0.1, rtol=0)
    ga = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a["grads"])])
    gb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b["grads"])])
    assert np.dot(ga, gb) / (np.linalg.norm(ga) * np.linalg.norm(gb)) > 0.99


def test_precision_by_backend():
    assert Precision.for_backend("cpu") == Precision()
    assert Precision.for_backend("gpu") == Precision(params="bfloat16", adapters="float32")
    assert Precision.from_dtype("auto", "tpu").params == "bfloat16"
    assert Precision.from_dtype("float16").adapters == "float32"
    with pytest.raises(ValueError, match=r"Precision\.params must be"):
        Precision(params="int8")
