"""`framework.sampling` on the tiny Qwen3 checkpoint: greedy parity with the KV-cache reference,
sampled logprobs equal to a full forward (with and without LoRA), key determinism, independence
from the other rows of the batch, stop tokens and budgets, top-k/top-p, and stop strings.

Every generate call has the shape `[B, T] -> [B, N]`, so the whole module compiles `generate`
twice (base model; LoRA hook with top-k logprobs) and the full forward twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_checkpoints import build_tokenizer

import lora
from framework import sampling
from framework.sampling import RowParams, SampleOutput
from models import Transformer, load_checkpoint, token_logprobs
from models.kv_cache import greedy_generate

B, T, N = 4, 12, 16
CAPACITY = T + N
LENGTHS = np.array([12, 5, 9, 1], np.int32)
TOPK = 4
NUM_STOP = 2
TOL = 1e-4
SHARPEN = 20.0  # the random checkpoint's logits are nearly flat; this makes top-p and stops meaningful


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Transformer:
    model = load_checkpoint(tiny_checkpoint("qwen3"))  # untied, GQA, qk-norm
    model.lm_head.set_value(model.lm_head[...] * SHARPEN)
    return model


@pytest.fixture(scope="module")
def bank(model) -> lora.LoraBank:
    """Three slots: two random adapters (nonzero B on every target, ranks 8 and 4) and an empty one."""
    config = model.config
    rng = np.random.default_rng(100)
    bank = lora.empty_bank(config, num_slots=3, max_rank=8)
    for slot, rank in ((0, 8), (1, 4)):
        adapter = lora.init_adapter(config, rank=rank, seed=slot, targets=lora.ALL_TARGETS,
                                    bank_targets=lora.ALL_TARGETS, max_rank=8)
        for ab in adapter.values():  # numpy draws: jax.random would compile once per target shape
            b = np.zeros(ab["b"].shape, np.float32)
            b[..., :rank, :] = rng.normal(0.0, 0.5, b[..., :rank, :].shape)
            ab["b"] = jnp.asarray(b)
        bank = lora.write_slot(bank, slot, adapter, 16.0 / rank)
    return bank


SLOT_IDS = jnp.array([0, 1, 2, 1], jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _generate(graphdef, state, bank, slot_ids, tokens, lengths, params, topk):
    hook = None if bank is None else lora.make_hook(bank, slot_ids)
    return sampling.generate(nnx.merge(graphdef, state), hook, tokens, lengths, params, max_new=N,
                             capacity=CAPACITY, topk_logprobs=topk)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, bank, slot_ids, sequences):
    """What the trainer computes: `token_logprobs` of each next token; plus the full log-softmax."""
    hook = None if bank is None else lora.make_hook(bank, slot_ids)
    logits = nnx.merge(graphdef, state)(sequences, hook=hook)
    return token_logprobs(logits[:, :-1], sequences[:, 1:]), jax.nn.log_softmax(logits[:, :-1], axis=-1)


def generate(model, prompts, params, bank=None) -> SampleOutput:
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, bank, SLOT_IDS, jnp.asarray(prompts), jnp.asarray(LENGTHS), params,
                    0 if bank is None else TOPK)
    return jax.tree.map(np.asarray, out)


def forward_logprobs(model, prompts, out: SampleOutput, bank=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, from a full forward over prompt + sample, at the sampled positions: the trainer's
    logprobs of the sampled tokens `[n]` and the log-softmax `[n, V]`."""
    seqs = np.zeros((B, T + N), np.int32)
    for b, (length, n) in enumerate(zip(LENGTHS, out.num_tokens, strict=True)):
        seqs[b, :length] = prompts[b, :length]
        seqs[b, length : length + n] = out.tokens[b, :n]
    graphdef, state = nnx.split(model)
    picked, logp = jax.tree.map(np.asarray, _forward(graphdef, state, bank, SLOT_IDS, jnp.asarray(seqs)))
    rows = [slice(length - 1, length - 1 + n) for length, n in zip(LENGTHS, out.num_tokens, strict=True)]
    return [(picked[b, r], logp[b, r]) for b, r in enumerate(rows)]


def make_prompts(vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, vocab, size=(B, T)).astype(np.int32)
    for b, length in enumerate(LENGTHS):
        prompts[b, length:] = 0
    return prompts


def keys(seed: int = 0) -> jax.Array:
    return sampling.sample_keys(seed, B)


def row_params(keys: jax.Array, **kwargs) -> RowParams:
    """`RowParams` with a fixed stop-token width, so every call reuses one compiled `generate`."""
    return RowParams.create(keys, num_stop=NUM_STOP, **kwargs)


@pytest.fixture(scope="module")
def prompts(model) -> np.ndarray:
    return make_prompts(model.config.vocab_size)


@pytest.fixture(scope="module")
def greedy(model, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Reference greedy tokens `[B, N]` and their logprobs from `models.kv_cache.greedy_generate`."""
    tokens, logits = greedy_generate(model, jnp.asarray(prompts), jnp.asarray(LENGTHS), N, CAPACITY)
    tokens = np.asarray(tokens)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return tokens, np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def test_greedy_matches_kv_cache_reference(model, prompts, greedy):
    out = generate(model, prompts, row_params(keys(), temperature=0.0, max_tokens=N))
    np.testing.assert_array_equal(out.tokens, greedy[0])
    np.testing.assert_allclose(out.logprobs, greedy[1], atol=TOL)
    np.testing.assert_array_equal(out.num_tokens, [N] * B)
    assert not out.hit_stop_token.any()


SETTINGS = {
    "plain": dict(temperature=1.0),  # no row truncates: the sort is skipped
    "mixed": dict(temperature=np.array([1.0, 0.7, 0.7, 0.7], np.float32),
                  top_p=np.array([1.0, 0.9, 1.0, 0.9], np.float32), top_k=np.array([-1, -1, 20, 20], np.int32)),
}


@pytest.mark.parametrize("adapter", ["base", "lora"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_sampled_logprobs_equal_forward_logprobs(model, bank, prompts, adapter, setting):
    """The train/sample consistency invariant: reported logprobs are the trainer's logprobs."""
    bank = bank if adapter == "lora" else None
    kwargs = SETTINGS[setting]
    params = row_params(keys(1), max_tokens=N, **kwargs)
    out = generate(model, prompts, params, bank)
    np.testing.assert_array_equal(out.num_tokens, [N] * B)
    reference = forward_logprobs(model, prompts, out, bank)
    temperature = np.broadcast_to(kwargs["temperature"], B)
    top_k = np.broadcast_to(kwargs.get("top_k", -1), B)
    top_p = np.broadcast_to(kwargs.get("top_p", 1.0), B)
    for b in range(B):
        picked, logp = reference[b]
        np.testing.assert_allclose(out.logprobs[b], picked, atol=TOL, err_msg=f"row {b}")
        # Every sampled token lies inside the row's top-k and nucleus (of the tempered distribution).
        own = np.take_along_axis(logp, out.tokens[b, :, None], axis=-1)  # not `picked`: rounding makes false ranks
        rank = (logp > own).sum(-1)
        if top_k[b] > 0:
            assert (rank < top_k[b]).all(), (b, rank)
        tempered = np.sort(logp / temperature[b], axis=-1)[:, ::-1]
        if top_k[b] > 0:
            tempered = tempered[:, : top_k[b]]
        probs = np.exp(tempered - np.logaddexp.reduce(tempered, axis=-1, keepdims=True))
        mass_before = np.take_along_axis(np.cumsum(probs, -1) - probs, rank[:, None], axis=-1)[:, 0]
        assert (mass_before < top_p[b] + 1e-5).all(), (b, mass_before)
        if bank is not None:
            want_logp, want_ids = jax.lax.top_k(jnp.asarray(logp), TOPK)
            np.testing.assert_array_equal(out.topk_ids[b], want_ids)
            np.testing.assert_allclose(out.topk_logprobs[b], want_logp, atol=TOL)
    assert len({tuple(row) for row in out.tokens}) == B
    if bank is not None:  # the adapters change what is sampled
        base = generate(model, prompts, params)
        assert (base.tokens != out.tokens).any()


def test_same_key_same_tokens_different_keys_differ(model, prompts):
    same_prompt = np.repeat(prompts[:1], B, axis=0)  # LENGTHS[0] == T: the whole row is prompt
    lengths_all = np.full(B, T, np.int32)
    graphdef, state = nnx.split(model)

    def run(k):
        params = row_params(k, temperature=1.0, max_tokens=N)
        return np.asarray(_generate(graphdef, state, None, SLOT_IDS, jnp.asarray(same_prompt),
                                    jnp.asarray(lengths_all), params, 0).tokens)

    first, again, other_seed = run(keys(7)), run(keys(7)), run(keys(8))
    np.testing.assert_array_equal(first, again)
    assert len({tuple(row) for row in first}) == B, "the samples of one request must differ"
    assert (first != other_seed).any()


def test_sample_keys():
    k = sampling.sample_keys(7, 3)
    for i in range(3):
        np.testing.assert_array_equal(jax.random.key_data(k[i]),
                                      jax.random.key_data(jax.random.fold_in(jax.random.key(7), i)))
    # The high 32 bits of a seed count (jax.random.key drops them with x64 off).
    assert not np.array_equal(jax.random.key_data(sampling.sample_keys(5, 1)),
                              jax.random.key_data(sampling.sample_keys(2**40 + 5, 1)))


def test_rows_do_not_depend_on_their_neighbours(model, prompts):
    """Row X gives bitwise the same tokens and logprobs whatever rows share its batch, and wherever it sits."""
    others = make_prompts(model.config.vocab_size, seed=3)
    graphdef, state = nnx.split(model)

    def run(index: int, seed: int, temperature: list[float], top_k: list[int], max_tokens: list[int]):
        """Row `index` is X (prompt 0, seed 42, temperature 1, full budget); the others vary."""
        batch, lengths = others.copy(), LENGTHS.copy()
        batch[index], lengths[index] = prompts[0], LENGTHS[0]
        ks = keys(seed)
        ks = jnp.concatenate([ks[:index], sampling.sample_keys(42, 1), ks[index + 1 :]])
        temperature[index], top_k[index], max_tokens[index] = 1.0, -1, N
        params = row_params(ks, temperature=np.array(temperature, np.float32),
                                  top_k=np.array(top_k, np.int32), max_tokens=np.array(max_tokens, np.int32))
        out = _generate(graphdef, state, None, SLOT_IDS, jnp.asarray(batch), jnp.asarray(lengths), params, 0)
        return jax.tree.map(lambda a: np.asarray(a)[index], out)

    alone = run(0, 0, [0.0] * B, [-1] * B, [0] * B)  # the neighbours emit nothing
    crowded = run(0, 1, [1.0, 0.0, 0.5, 2.0], [-1, -1, 3, -1], [N, 3, N, N])  # one truncates: the sort runs
    moved = run(2, 2, [0.7, 1.0, 1.0, 1.0], [5, -1, -1, 1], [N, N, N, 2])
    for other in (crowded, moved):
        np.testing.assert_array_equal(other.tokens, alone.tokens)
        np.testing.assert_array_equal(other.logprobs, alone.logprobs)
    assert alone.num_tokens == N


def test_stop_tokens_and_budgets(model, prompts, greedy):
    tokens, logprobs = greedy
    stop0 = int(tokens[0, 3])
    stop2 = int(tokens[2, 6])
    absent = next(t for t in range(3, 300) if t not in tokens[2])
    params = row_params(
        keys(), temperature=0.0, max_tokens=np.array([N, 5, 100, 0], np.int32),
        stop_tokens=[[stop0], [], [absent, stop2], [int(tokens[3, 0])]],
    )
    out = generate(model, prompts, params)
    want_n = [list(tokens[0]).index(stop0) + 1, 5, list(tokens[2]).index(stop2) + 1, 0]
    np.testing.assert_array_equal(out.num_tokens, want_n)
    np.testing.assert_array_equal(out.hit_stop_token, [True, False, True, False])
    for b, n in enumerate(want_n):
        np.testing.assert_array_equal(out.tokens[b, :n], tokens[b, :n])
        np.testing.assert_allclose(out.logprobs[b, :n], logprobs[b, :n], atol=TOL)
        assert (out.tokens[b, n:] == 0).all() and (out.logprobs[b, n:] == 0).all()
    assert out.tokens[0, want_n[0] - 1] == stop0  # the stop token is part of the output


def test_top_k_one_and_tiny_top_p_are_greedy(model, prompts, greedy):
    params = row_params(keys(3), temperature=np.array([1.0, 1.5, 1.0, 1.5], np.float32),
                              top_k=np.array([1, 1, -1, -1], np.int32),
                              top_p=np.array([1.0, 1.0, 1e-6, 1e-6], np.float32), max_tokens=N)
    out = generate(model, prompts, params)
    np.testing.assert_array_equal(out.tokens, greedy[0])


def test_filter_logits_keeps_top_k_then_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)  # ranks: 1, 0, 3, 2
    logits = jnp.log(jnp.asarray(np.tile(probs, (7, 1))))
    top_k = jnp.array([-1, -1, -1, 2, 3, 9, -1], jnp.int32)
    top_p = jnp.array([1.0, 0.45, 0.79, 1.0, 0.6, 1.0, 0.81], jnp.float32)
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k, top_p)))
    want = [[1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 1],
            [0, 1, 0, 1],  # top-3 renormalised is .53/.32/.16: .53 < .6 keeps the second, .84 stops
            [1, 1, 1, 1], [1, 1, 0, 1]]
    np.testing.assert_array_equal(kept, np.array(want, bool))


def _kept_reference(logits: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """NumPy transcription of top-k then nucleus on one row (float64), ties with the last kept token kept.

    Also returns which tokens sit on the nucleus boundary within float32 rounding (their preceding
    mass is within 1e-5 of top_p): there float32 and float64 may rightly disagree."""
    order = np.argsort(-logits, kind="stable")
    ranked = logits[order].astype(np.float64)
    k = len(ranked) if top_k <= 0 else top_k
    probs = np.exp(ranked[:k] - np.logaddexp.reduce(ranked[:k]))
    before = np.cumsum(probs) - probs
    n = k if top_p >= 1.0 else max(1, int(np.sum(before < top_p)))
    borderline = np.zeros(len(logits), bool)
    if top_p < 1.0:
        borderline[order[:k]] = np.abs(before - top_p) < 1e-5
    return logits >= ranked[n - 1], borderline


@pytest.mark.parametrize("sharpness", [0.3, 1.0, 3.0, 12.0])  # 0.3: the nucleus spills past the candidates;
# 1.0: the candidates hold ~70% of the probability, so top-p 0.5 is decided on them against the whole vocabulary
def test_filter_logits_on_candidates_equals_a_full_sort(sharpness):
    v = 3 * sampling.CANDIDATES + 11
    rng = np.random.default_rng(int(sharpness * 10))
    settings = [(-1, 1.0), (-1, 0.9), (-1, 0.5), (1, 1.0), (5, 0.7), (sampling.CANDIDATES, 0.95),
                (sampling.CANDIDATES + 1, 1.0), (150, 0.8), (-1, 0.999)]
    logits = (rng.normal(size=(len(settings), v)) * sharpness).astype(np.float32)
    top_k = np.array([k for k, _ in settings], np.int32)
    top_p = np.array([p for _, p in settings], np.float32)
    filter_ = jax.jit(sampling.filter_logits)
    for rows in [[i] for i in range(len(settings))] + [list(range(len(settings)))]:  # alone, and all together
        kept = np.isfinite(np.asarray(filter_(jnp.asarray(logits[rows]), jnp.asarray(top_k[rows]),
                                              jnp.asarray(top_p[rows]))))
        for out, i in zip(kept, rows, strict=True):
            want, borderline = _kept_reference(logits[i], int(top_k[i]), float(top_p[i]))
            assert borderline.sum() < 0.01 * v  # the comparison still covers almost every token
            np.testing.assert_array_equal(out[~borderline], want[~borderline],
                                          err_msg=f"row {i}: top_k={top_k[i]} top_p={top_p[i]}")


def test_choose_tokens_follows_the_tempered_truncated_distribution():
    n = 4000
    logits = jnp.log(jnp.asarray(np.tile([0.15, 0.5, 0.05, 0.3], (n, 1)), jnp.float32))
    for temperature, top_k, want in ((1.0, -1, [0.15, 0.5, 0.05, 0.3]),
                                     (0.5, -1, np.array([0.15, 0.5, 0.05, 0.3]) ** 2 / 0.365),
                                     (1.0, 2, [0.0, 0.625, 0.0, 0.375])):
        params = row_params(sampling.sample_keys(0, n), temperature=temperature, top_k=top_k, max_tokens=1)
        drawn = np.asarray(jax.jit(sampling.choose_tokens)(logits, params, jnp.int32(0)))
        freq = np.bincount(drawn, minlength=4) / n
        np.testing.assert_allclose(freq, want, atol=0.03)


def test_truncate_at_stop_strings():
    tok = build_tokenizer()
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. The answer is 42.")
    pieces = [tok.decode([i]) for i in ids]
    text = tok.decode(ids)
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(2, len(ids) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and text.find(pieces[i][-2:] + pieces[i + 1][:2]) == len("".join(pieces[:i + 1])) - 2)
    spanning = pieces[i][-2:] + pieces[i + 1][:2]
    assert sampling.truncate_at_stop_strings(ids, [spanning], decode) == (i + 2, True)
    assert len(calls) <= 2 + int(np.ceil(np.log2(len(ids))))  # bisection, not a decode per token
    assert sampling.truncate_at_stop_strings(ids, ["answer"], decode) == (
        next(n for n in range(len(ids) + 1) if "answer" in tok.decode(ids[:n])), True)
    # The earliest completed stop string wins, whatever the order of the list.
    assert sampling.truncate_at_stop_strings(ids, ["42", "fox"], decode) == (
        next(n for n in range(len(ids) + 1) if "fox" in tok.decode(ids[:n])), True)
    assert sampling.truncate_at_stop_strings(ids, [pieces[0]], decode) == (1, True)
    assert sampling.truncate_at_stop_strings(ids, ["zebra"], decode) == (len(ids), False)
    assert sampling.truncate_at_stop_strings(ids, [], decode) == (len(ids), False)
    assert sampling.truncate_at_stop_strings([], ["x"], decode) == (0, False)


def test_generate_refuses_a_small_cache(model, prompts):
    params = row_params(keys(), max_tokens=N)
    with pytest.raises(ValueError, match="capacity"):
        sampling.generate(model, None, jnp.asarray(prompts), jnp.asarray(LENGTHS), params, max_new=N,
                          capacity=T + N - 1)
