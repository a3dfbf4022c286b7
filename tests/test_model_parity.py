"""Our Flax model against the transformers PyTorch model on the same tiny random checkpoints.

Every test uses one right-padded batch shape `[3, 40]`, so each model compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import SPECS, load_torch_model

from models import Transformer, load_checkpoint, token_logprobs

SPEC_NAMES = [s.name for s in SPECS]
LENGTHS = (37, 12, 25)
PADDED_LEN = 40
PAD_ID = 0
TOL = 1e-4


@nnx.jit
def forward(model: Transformer, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits `[B, T, V]` and log p(tokens[t + 1] | tokens[:t + 1]) `[B, T - 1]`: one compile per model."""
    logits = model(tokens)
    return logits, token_logprobs(logits[:, :-1], tokens[:, 1:])


def padded_batch(vocab_size: int, seed: int = 0) -> np.ndarray:
    """`[3, 40]` int32 random ids, rows of `LENGTHS` right-padded with `PAD_ID`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(len(LENGTHS), PADDED_LEN)).astype(np.int32)
    for row, length in enumerate(LENGTHS):
        tokens[row, length:] = PAD_ID
    return tokens


@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    cache: dict[str, Transformer] = {}

    def get(name: str) -> Transformer:
        if name not in cache:
            cache[name] = load_checkpoint(tiny_checkpoint(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def fp32_outputs(fp32_model):
    """`fp32_outputs(name) -> (tokens, logits, logprobs)` as numpy, for the standard padded batch."""
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(name: str):
        if name not in cache:
            model = fp32_model(name)
            tokens = padded_batch(model.config.vocab_size)
            logits, logprobs = forward(model, jnp.asarray(tokens))
            assert logits.dtype == jnp.float32 and logprobs.dtype == jnp.float32
            cache[name] = (tokens, np.asarray(logits), np.asarray(logprobs))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    """`reference_logits(name, tokens)`: transformers fp32 logits per row, each row run unpadded."""
    models = {}

    def get(name: str, tokens: np.ndarray) -> list[np.ndarray]:
        if name not in models:
            models[name] = load_torch_model(tiny_checkpoint(name))
        out = []
        with torch.no_grad():
            for row, length in enumerate(LENGTHS):
                ids = torch.from_numpy(tokens[row : row + 1, :length].astype(np.int64))
                out.append(models[name](ids).logits[0].float().numpy())
        return out

    return get


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_logits_match_transformers(name, fp32_model, fp32_outputs, reference_logits):
    tokens, logits, _ = fp32_outputs(name)
    assert logits.dtype == np.float32
    assert logits.shape == (len(LENGTHS), PADDED_LEN, fp32_model(name).config.vocab_size)
    for row, (length, ref) in enumerate(zip(LENGTHS, reference_logits(name, tokens), strict=True)):
        assert np.std(ref) > 0.05, "reference logits are near-constant: the comparison would be vacuous"
        err = _max_abs(logits[row, :length], ref)
        assert err <= TOL, f"{name} row {row} (length {length}): max abs logit error {err:.3g} > {TOL}"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_token_logprobs_match_transformers(name, fp32_outputs, reference_logits):
    tokens, _, ours = fp32_outputs(name)  # ours[:, t] = log p(tokens[t + 1] | tokens[:t + 1])
    assert ours.shape == (len(LENGTHS), PADDED_LEN - 1)
    assert ours.dtype == np.float32
    for row, (length, ref_logits) in enumerate(zip(LENGTHS, reference_logits(name, tokens), strict=True)):
        ref_lp = torch.log_softmax(torch.from_numpy(ref_logits[:-1]), dim=-1)
        targets = torch.from_numpy(tokens[row, 1:length].astype(np.int64))
        ref = ref_lp.gather(-1, targets[:, None])[:, 0].numpy()
        err = _max_abs(ours[row, : length - 1], ref)
        assert err <= TOL, f"{name} row {row} (length {length}): max abs logprob error {err:.3g} > {TOL}"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_padding_does_not_affect_valid_positions(name, fp32_model, fp32_outputs):
    model = fp32_model(name)
    tokens, a, _ = fp32_outputs(name)
    other = tokens.copy()
    rng = np.random.default_rng(1)
    for row, length in enumerate(LENGTHS):
        other[row, length:] = rng.integers(3, model.config.vocab_size, size=PADDED_LEN - length)
    assert (other != tokens).any()
    b = np.asarray(forward(model, jnp.asarray(other))[0])
    for row, length in enumerate(LENGTHS):
        err = _max_abs(a[row, :length], b[row, :length])
        assert err <= 1e-6, f"{name} row {row}: pad tokens changed valid logits by {err:.3g}"
    # The pad positions themselves did see the new tokens (the check above is not vacuous).
    assert _max_abs(a[0, LENGTHS[0] :], b[0, LENGTHS[0] :]) > 1e-3


# One bf16 compile per spec is the slowest part of the suite: these four cover tied/untied, MHA/GQA,
# llama3 rope scaling, q/k/v bias, q/k norm and a free head_dim.
BF16_SPECS = ["llama_mha_tied", "llama3_rope_scaling", "qwen2", "qwen3_tied_mha"]


@pytest.mark.parametrize("name", BF16_SPECS)
def test_bf16_load_gives_fp32_logits_close_to_fp32(name, tiny_checkpoint, fp32_outputs):
    bf16 = load_checkpoint(tiny_checkpoint(name), dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert params and all(p.dtype == jnp.bfloat16 for p in params)

    tokens, high, _ = fp32_outputs(name)
    low = forward(bf16, jnp.asarray(tokens))[0]
    assert low.dtype == jnp.float32
    low = np.asarray(low)
    valid = np.zeros(tokens.shape, bool)
    for row, length in enumerate(LENGTHS):
        valid[row, :length] = True
    low, high = low[valid], high[valid]
    assert np.all(np.isfinite(low))
    # bf16 keeps ~3 significant digits: on logits of std ~0.15 and |max| ~1, both transformers' bf16 model
    # and ours land ~5e-3 max abs and ~0.7% relative error from fp32 (4x margin below); a mis-mapped or
    # mis-cast weight or an overflow shows as 1e-1 or more. (Subtler bf16 numerics, e.g. a norm computed
    # in bf16, are within bf16 noise at this model size and are not what this test can see.)
    err = _max_abs(low, high)
    rel = float(np.linalg.norm(low - high) / np.linalg.norm(high))
    agree = float(np.mean(low.argmax(-1) == high.argmax(-1)))
    assert err < 0.02, f"{name}: bf16 vs fp32 max abs logit error {err:.3g}"
    assert rel < 0.03, f"{name}: bf16 vs fp32 relative logit error {rel:.3g}"
    assert agree >= 0.95, f"{name}: bf16 and fp32 argmax agree on only {agree:.1%} of positions"
    assert err > 0, "bf16 logits are bitwise equal to fp32 ones: the bf16 path did not run"


def test_token_logprobs_is_log_softmax_gather():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 30 + 1000.0  # large offset: needs a stable logsumexp
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    ref = torch.log_softmax(torch.from_numpy(logits.astype(np.float64)), dim=-1)
    ref = ref.gather(-1, torch.from_numpy(targets.astype(np.int64))[..., None])[..., 0].numpy()
    assert got.shape == (2, 5)
    assert np.all(np.isfinite(got)) and np.all(got <= 0)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-5)
