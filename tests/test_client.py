"""The in-process client API end to end on one shared engine: training converges, futures pipeline,
losses by name, tenant isolation, no recompilation, sampling, custom losses, checkpoints, and bad
input refused before the engine.

One `ServiceClient` (one engine, 2-layer tied qwen2) serves the whole module. Compiles are the cost,
so requests keep to a few shapes: training batches of 3-4 datums (rows bucket 4) or 1 datum, all
sequences ≤ 32 tokens (the smallest length bucket), sampling 4 rows from prompts ≤ 32 tokens with
at most 16 new tokens. The sampler bank has as many slots as the training bank, so
`compute_logprobs` reuses the training forward's compiled program.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import jax
import numpy as np
import pytest
import torch

from framework import ServiceClient, types
from framework.engine import EngineConfig
from framework.optim import init_opt_state

BASE = "qwen2_tied"
VOCAB = 301
MAX_RANK = 8
CONTEXT = 64
LENGTHS = (20, 13, 7)  # the standard batch: rows bucket 4, length bucket 32
# 5e-3, not the ~2e-2 of larger models: with alpha/rank = 4 on this 2-layer model, Adam at 2e-2 oscillates (the
# 30-step overfit ends at 0.37-0.50 of the first loss depending on the seed); at 5e-3 it ends at 0.10-0.14.
LR = types.AdamParams(learning_rate=5e-3)
# AdamW with eps = 1: the update lr·g/(|g| + 1) is smooth in the gradient, so two runs whose gradients agree to
# fp32 rounding give weights that agree too (with eps ~ 0 the first step is lr·sign(g), and a gradient entry that
# is zero up to rounding can flip sign). Used wherever weights after a step are compared across different programs.
SMOOTH = types.AdamParams(learning_rate=1e-2, eps=1.0)
TOL = 1e-5


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint(BASE))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    config = EngineConfig(max_adapters=6, max_rank=MAX_RANK, sampler_slots=6, max_seq_len=CONTEXT)
    with ServiceClient(engine_config=config, home=tmp_path_factory.mktemp("home")) as service:
        yield service


@pytest.fixture(scope="module")
def engine(service, base_model):
    return service._runtime.get(base_model)[0]


@pytest.fixture(scope="module")
def scheduler(service, base_model):
    return service._runtime.get(base_model)[1]


class Tenants:
    """Creates training clients on the shared engine and frees their adapter slots afterwards."""

    def __init__(self, service: ServiceClient, base_model: str):
        self.service, self.base_model, self.clients = service, base_model, []

    def new(self, rank: int = MAX_RANK, seed: int = 0, **kwargs):
        return self.track(self.service.create_lora_training_client(self.base_model, rank=rank, seed=seed, **kwargs))

    def track(self, client):
        self.clients.append(client)
        return client

    def close(self) -> None:
        for c in self.clients:
            c._scheduler.call(lambda c=c: c._engine.remove_adapter(c.model_id)).result()


@pytest.fixture
def tenants(service, base_model):
    tenants = Tenants(service, base_model)
    yield tenants
    tenants.close()


@pytest.fixture(scope="module")
def trained(service, base_model):
    """A rank-8 client trained 5 steps on `batch(0)`: a non-trivial adapter at version 5. No test steps it."""
    tenants = Tenants(service, base_model)
    client = tenants.new(seed=100)
    for _ in range(5):
        client.forward_backward(batch(0), "cross_entropy")
        step = client.optim_step(LR)
    step.result()
    yield client
    tenants.close()


# ------------------------------------------------------------------------------------- helpers
def datum(rng: np.random.Generator, n: int, **inputs) -> types.Datum:
    """A random sequence of `n` input tokens predicting the next, weights 1 (plus any extra inputs)."""
    ids = rng.integers(3, VOCAB, n + 1)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(n, np.float32), **inputs})


def batch(seed: int, lengths=LENGTHS) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    return [datum(rng, n) for n in lengths]


def loss_of(out: types.ForwardBackwardOutput) -> float:
    return out.metrics["loss:sum"]


def logprobs_of(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def on_worker(client, fn):
    """Run `fn(engine, adapter)` on the scheduler's worker (the engine is not thread-safe) and return it."""
    engine = client._engine
    return client._scheduler.call(lambda: jax.device_get(fn(engine, engine.adapters[client.model_id]))).result()


def weights(client):
    return on_worker(client, lambda e, a: e.adapter_weights(a.adapter_id))


def full_state(client):
    """Weights, AdamW state (fresh if it never stepped), accumulated gradients (zeros if none) and step
    of the client's adapter (host copies)."""
    def read(e, a):
        state = e.training_state(a.adapter_id)
        grads = a.grads if a.grads is not None else jax.tree.map(np.zeros_like, state["weights"])
        return {"weights": state["weights"], "opt_state": state["opt_state"], "grads": grads, "step": a.step}

    return on_worker(client, read)


def assert_trees_equal(a, b, err_msg: str = "") -> None:
    """Same structure and bitwise-equal leaves."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b, err_msg
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=f"{err_msg} {jax.tree_util.keystr(path)}")


def assert_trees_close(a, b, atol: float, err_msg: str = "") -> None:
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                 jax.tree_util.tree_flatten_with_path(b)[0], strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=f"{err_msg} {jax.tree_util.keystr(path)}")


@contextlib.contextmanager
def held(scheduler):
    """Hold the scheduler's worker while requests queue up, so that they run as one batch on release."""
    gate = threading.Event()
    blocker = scheduler.call(lambda: gate.wait(60))
    while not blocker.running():
        time.sleep(0.001)
    try:
        yield
    finally:
        gate.set()


def nonzero_b(w) -> bool:
    return any(np.abs(ab["b"]).max() > 0 for ab in w.values())


def params(**kwargs) -> types.SamplingParams:
    """4-row sampling settings; `stop=[]` (no EOS) unless given, so lengths are deterministic."""
    return types.SamplingParams(**{"max_tokens": 12, "seed": 0, "stop": [], **kwargs})


PROMPT = types.ModelInput.from_ints(np.random.default_rng(7).integers(3, VOCAB, 10).tolist())


# ------------------------------------------------------------------------------------ training
def test_overfit_small_batch(tenants):
    """The issue's "done when": loss on 3 datums falls by more than half in 30 steps."""
    client = tenants.new(seed=0)
    data = batch(1)
    results = []
    for _ in range(30):
        results.append(client.forward_backward(data, "cross_entropy"))
        client.optim_step(LR)
    losses = [loss_of(r.result()) for r in results]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def test_pipelined_and_awaited_futures_equal_sequential(tenants):
    data = batch(2)
    sequential, pipelined, awaited = (tenants.new(seed=5) for _ in range(3))

    expected = []
    for _ in range(3):
        expected.append(loss_of(sequential.forward_backward(data, "cross_entropy").result()))
        sequential.optim_step(LR).result()

    futures = []  # everything submitted before anything is waited on
    for _ in range(3):
        futures.append(pipelined.forward_backward(data, "cross_entropy"))
        futures.append(pipelined.optim_step(LR))
    assert all(isinstance(f.result(), types.ForwardBackwardOutput) for f in futures[::2])
    assert all(isinstance(f.result(), types.OptimStepResponse) for f in futures[1::2])
    got = [loss_of(f.result()) for f in futures[::2]]

    async def run():
        losses = []
        for _ in range(3):
            future = await awaited.forward_backward_async(data, "cross_entropy")
            step = await awaited.optim_step_async(LR)
            losses.append(loss_of(await future))
            assert "grad_norm:mean" in (await step).metrics
        return losses

    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(asyncio.run(run()), expected, rtol=1e-6)
    assert expected[2] < expected[1] < expected[0], "each forward_backward must see the previous optim_step"
    assert_trees_equal(weights(pipelined), weights(sequential))


def test_gradients_accumulate_until_optim_step(tenants):
    """Two forward_backward calls then one optim_step = one forward_backward on the concatenated data."""
    data = batch(3, (20, 13, 7, 31))
    split, joined = tenants.new(seed=9), tenants.new(seed=9)
    before = weights(split)
    first = split.forward_backward(data[:3], "cross_entropy").result()
    second = split.forward_backward(data[3:], "cross_entropy").result()
    assert_trees_equal(weights(split), before, "forward_backward alone must not move the weights")
    both = joined.forward_backward(data, "cross_entropy").result()
    split.optim_step(SMOOTH).result()
    joined.optim_step(SMOOTH).result()
    np.testing.assert_allclose(loss_of(first) + loss_of(second), loss_of(both), rtol=1e-6)
    after = weights(split)
    assert_trees_close(after, weights(joined), atol=1e-6)
    assert nonzero_b(after)
    np.testing.assert_allclose(loss_of(split.forward(data, "cross_entropy").result()),
                               loss_of(joined.forward(data, "cross_entropy").result()), rtol=1e-6)


def _np_loss(name: str, lp: np.ndarray, q: np.ndarray, adv: np.ndarray, beta: float = 0.0) -> float:
    """tinker's formulas (sums over tokens) in float64."""
    lp, q, adv = (x.astype(np.float64) for x in (lp, q, adv))
    ratio = np.exp(lp - q)
    return {"importance_sampling": -(ratio * adv).sum(),
            "ppo": -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv).sum(),
            "cispo": -(np.clip(ratio, 0.0, 4.0) * lp * adv).sum(),
            "dro": -(lp * adv - 0.5 * beta * (lp - q) ** 2).sum()}[name]


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"])
def test_each_loss_through_the_client(trained, loss_fn):
    """Loss values equal the documented formulas on the trainer's own logprobs; the sampler-vs-trainer gap
    is ~0 when the given sampler logprobs are the trainer's and equals an injected offset otherwise."""
    data = batch(4)
    lps = logprobs_of(trained.forward(data, "cross_entropy").result())
    if loss_fn == "cross_entropy":
        out = trained.forward_backward(data, "cross_entropy").result()
        np.testing.assert_allclose(loss_of(out), -sum(lp.sum() for lp in lps), rtol=1e-5)
        assert not any(k.startswith("sampler_logprob_gap") for k in out.metrics)
        return
    rng = np.random.default_rng(4)
    advantages = [rng.normal(size=len(lp)).astype(np.float32) for lp in lps]
    config = {"beta": 0.3} if loss_fn == "dro" else None
    for offset in (0.0, 0.25):
        sampler = [lp - offset for lp in lps]
        rl = [types.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"], "logprobs": q, "advantages": a})
            for d, q, a in zip(data, sampler, advantages, strict=True)]
        out = trained.forward_backward(rl, loss_fn, config).result()
        expected = sum(_np_loss(loss_fn, lp, q, a, 0.3) for lp, q, a in zip(lps, sampler, advantages, strict=True))
        np.testing.assert_allclose(loss_of(out), expected, rtol=1e-5, atol=1e-5, err_msg=f"offset {offset}")
        for got, lp in zip(logprobs_of(out), lps, strict=True):
            np.testing.assert_allclose(got, lp, atol=TOL)
        if loss_fn != "dro":
            assert out.metrics["sampler_logprob_gap:mean"] == pytest.approx(offset, abs=1e-4)
            assert out.metrics["sampler_logprob_gap:max"] == pytest.approx(offset, abs=1e-4)


def _custom_ce_jax(data, logprobs):
    terms = [-(lp * d.loss_fn_inputs["weights"].to_numpy()).sum() for d, lp in zip(data, logprobs, strict=True)]
    return sum(terms), {"first_datum": terms[0]}


def _custom_ce_torch(data, logprobs):
    """The same loss written for the tinker SDK (torch tensors in, torch scalar out): not JAX-traceable."""
    terms = [-(lp * torch.as_tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
             for d, lp in zip(data, logprobs, strict=True)]
    return sum(terms), {"first_datum": terms[0]}


@pytest.mark.parametrize("loss_fn", [_custom_ce_jax, _custom_ce_torch], ids=["jax", "torch"])
def test_forward_backward_custom_equals_cross_entropy(tenants, loss_fn):
    """A custom `-Σ weights·logp` gives cross_entropy's loss, logprobs and update, whether it runs inside
    the compiled step (JAX-traceable) or through the forward → vjp → weighted backward fallback (torch)."""
    data = batch(5)
    builtin, custom = tenants.new(seed=13), tenants.new(seed=13)
    expected = builtin.forward_backward(data, "cross_entropy").result()
    got = custom.forward_backward_custom(data, loss_fn).result()
    np.testing.assert_allclose(loss_of(got), loss_of(expected), rtol=1e-6)
    assert got.metrics["first_datum"] == pytest.approx(-logprobs_of(expected)[0].sum(), rel=1e-5)
    for g, e in zip(logprobs_of(got), logprobs_of(expected), strict=True):
        np.testing.assert_allclose(g, e, atol=TOL)
    builtin.optim_step(SMOOTH).result()
    custom.optim_step(SMOOTH).result()
    after = weights(custom)
    assert nonzero_b(after)
    assert_trees_close(after, weights(builtin), atol=1e-6)


# ------------------------------------------------------------------------------ multi-tenancy
def test_tenants_do_not_affect_each_other(tenants, engine, scheduler, monkeypatch):
    """Invariant 3: a tenant's loss, logprobs and gradients are the same alone or batched with others
    of different ranks and targets; one tenant's optim_step leaves the others' state bitwise unchanged."""
    clients = [tenants.new(rank=8, seed=1),
               tenants.new(rank=4, seed=2, train_mlp=False, train_unembed=False),
               tenants.new(rank=2, seed=3, train_attn=False)]
    for i, c in enumerate(clients):  # distinct non-zero weights everywhere, so a leak would show
        for _ in range(3):
            c.forward_backward(batch(10 + i), "cross_entropy")
            c.optim_step(LR)
    rng = np.random.default_rng(11)
    probes = [[datum(rng, n)] for n in (30, 9, 17)]

    def grads(c):
        return full_state(c)["grads"]

    alone = [c.forward_backward(p, "cross_entropy").result() for c, p in zip(clients, probes, strict=True)]
    grads_alone = [grads(c) for c in clients]
    assert all(nonzero_b(weights(c)) for c in clients)

    calls = []
    real_forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda requests, **kw: calls.append(
        [r.adapter_id for r in requests]) or real_forward(requests, **kw))
    with held(scheduler):
        futures = [c.forward_backward(p, "cross_entropy") for c, p in zip(clients, probes, strict=True)]
    together = [f.result() for f in futures]
    monkeypatch.undo()
    assert calls == [[c.model_id for c in clients]], f"the three requests did not share one batch: {calls}"

    for c, a, t, g in zip(clients, alone, together, grads_alone, strict=True):
        np.testing.assert_allclose(loss_of(t), loss_of(a), rtol=1e-7, atol=TOL)
        np.testing.assert_allclose(logprobs_of(t)[0], logprobs_of(a)[0], rtol=0, atol=TOL)
        # the buffer now holds alone + together = twice the alone gradient (within fp32 rounding of the sum)
        scale = max(np.abs(x).max() for x in jax.tree.leaves(g))
        assert_trees_close(grads(c), jax.tree.map(lambda x: 2 * x, g), atol=1e-6 * scale, err_msg=c.model_id)

    others = [full_state(c) for c in clients[1:]]
    first_before = weights(clients[0])
    clients[0].optim_step(LR).result()
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(weights(clients[0])),
                                                         jax.tree.leaves(first_before), strict=True))
    for c, before in zip(clients[1:], others, strict=True):
        assert_trees_equal(full_state(c), before, err_msg=f"{c.model_id} changed by another tenant's optim_step")


def test_no_recompilation_when_adapters_and_lengths_change(tenants, service, engine, scheduler):
    """Invariant 5: after one pass over each shape, new adapters (other ranks and targets), removed
    adapters, restored checkpoints, sampler weights from files and other lengths within the buckets
    compile nothing: neither a new trace (`compile_counts`) nor a new executable (the jit caches).
    (Each workload's first batch packs into 2 rows of 32 tokens, its prompts prefill in 16 tokens and
    decode in a pool of 32 positions: the same buckets with other lengths.)"""
    jitted = {"forward": engine._steps.forward, "forward_backward": engine._steps.forward_backward,
              "optim_step": engine._steps.optim, "decode": engine.decoder._chunk, "prefill": engine.decoder._prefill,
              "admit": engine.decoder._admit}

    def workload(clients, lengths, prompt_len, seed, sampler=None):
        rng = np.random.default_rng(seed)
        first = clients[0]
        first.forward_backward([datum(rng, n) for n in lengths], "cross_entropy").result()
        first.optim_step(LR).result()
        first.forward([datum(rng, n) for n in lengths], "cross_entropy").result()
        first.forward_backward([datum(rng, lengths[0])], "cross_entropy").result()
        with held(scheduler):
            mixed = [c.forward_backward([datum(rng, n)], "cross_entropy")
                     for c, n in zip(clients, lengths, strict=False)]
        [f.result() for f in mixed]
        sampler = sampler or first.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(rng.integers(3, VOCAB, prompt_len).tolist())
        sampler.sample(prompt, 4, params(max_tokens=16 - seed % 5, seed=seed)).result()
        sampler.compute_logprobs(prompt).result()

    warm = [tenants.new(rank=8, seed=1), tenants.new(rank=8, seed=2), tenants.new(rank=8, seed=3)]
    workload(warm, (20, 13, 7), 12, seed=0)
    state_path = warm[0].save_state("warm").result().path
    sampler_path = warm[0].save_weights_for_sampler("warm").result().path
    counts = dict(engine.compile_counts)
    sizes = {k: f._cache_size() for k, f in jitted.items()}

    for c in warm[1:]:
        c._scheduler.call(lambda c=c: c._engine.remove_adapter(c.model_id)).result()
    tenants.clients = warm[:1]
    fresh = [tenants.new(rank=3, seed=4, train_mlp=False), tenants.new(rank=5, seed=5, train_attn=False)]
    restored = tenants.track(service.create_training_client_from_state_with_optimizer(state_path))
    warm[0].load_state(state_path).result()
    workload([fresh[0], restored, fresh[1]], (29, 3, 18, 11), 9, seed=1)
    workload([fresh[1], warm[0], restored], (17, 29, 1), 3, seed=2,
             sampler=service.create_sampling_client(model_path=sampler_path))

    assert dict(engine.compile_counts) == counts
    assert {k: f._cache_size() for k, f in jitted.items()} == sizes


# ------------------------------------------------------------------------------------ sampling
def test_same_seed_same_samples_and_draws_differ(trained):
    sampler = trained.save_weights_and_get_sampling_client()
    first = sampler.sample(PROMPT, 4, params(seed=1)).result()
    again = sampler.sample(PROMPT, 4, params(seed=1)).result()
    other = sampler.sample(PROMPT, 4, params(seed=2)).result()
    tokens = [s.tokens for s in first.sequences]
    assert tokens == [s.tokens for s in again.sequences]
    assert [s.logprobs for s in first.sequences] == [s.logprobs for s in again.sequences]
    assert len({tuple(t) for t in tokens}) == 4, "the num_samples draws must differ from each other"
    assert tokens != [s.tokens for s in other.sequences]
    awaited = asyncio.run(sampler.sample_async(PROMPT, 4, params(seed=1)))
    assert [s.tokens for s in awaited.sequences] == tokens
    assert all(len(s.tokens) == 12 and s.stop_reason == "length" for s in first.sequences)


def test_stop_tokens_stop_strings_and_max_tokens(trained):
    sampler = trained.save_weights_and_get_sampling_client()
    free = [s.tokens for s in sampler.sample(PROMPT, 4, params(max_tokens=16, seed=3)).result().sequences]

    short = sampler.sample(PROMPT, 4, params(max_tokens=5, seed=3)).result()
    assert [s.tokens for s in short.sequences] == [t[:5] for t in free]
    assert all(s.stop_reason == "length" for s in short.sequences)

    stop = free[0][4]
    stopped = sampler.sample(PROMPT, 4, params(max_tokens=16, seed=3, stop=[stop])).result()
    for s, t in zip(stopped.sequences, free, strict=True):
        if stop in t:
            assert (s.tokens, s.stop_reason) == (t[: t.index(stop) + 1], "stop")
        else:
            assert (s.tokens, s.stop_reason) == (t, "length")
    assert stopped.sequences[0].stop_reason == "stop"

    tokenizer = trained.get_tokenizer()
    pieces = [tokenizer.decode([t]) for t in free[0]]
    text = next(p for p in pieces[3:] if p.strip() and p.isascii())
    by_string = sampler.sample(PROMPT, 4, params(max_tokens=16, seed=3, stop=[text])).result()
    for s, t in zip(by_string.sequences, free, strict=True):
        cut = next((n for n in range(1, len(t) + 1) if text in tokenizer.decode(t[:n])), None)
        expected = (t, "length") if cut is None else (t[:cut], "stop")
        assert (s.tokens, s.stop_reason) == expected
    assert by_string.sequences[0].stop_reason == "stop"


def test_samples_carry_the_weights_version(tenants):
    client = tenants.new(seed=21)
    data = batch(6)
    versions = []
    for step in range(3):
        sampler = client.save_weights_and_get_sampling_client()
        result = sampler.sample(PROMPT, 4, params(seed=step)).result()
        versions.append({s.weights_version for s in result.sequences})
        assert sampler.version == step
        client.forward_backward(data, "cross_entropy")
        client.optim_step(LR).result()
    assert versions == [{0}, {1}, {2}]


def test_sampled_logprobs_equal_compute_logprobs_and_forward(trained):
    """Invariant 4a on a trained (non-trivial) adapter."""
    assert nonzero_b(weights(trained))
    sampler = trained.save_weights_and_get_sampling_client()
    result = sampler.sample(PROMPT, 4, params(max_tokens=16, seed=4)).result()
    prompt = PROMPT.to_ints()
    data = []
    for s in result.sequences:
        full = prompt + s.tokens
        computed = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
        assert computed[0] is None
        np.testing.assert_allclose(computed[len(prompt):], s.logprobs, atol=1e-4)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                                loss_fn_inputs={"target_tokens": full[1:], "weights": np.zeros(len(full) - 1)}))
    forward = logprobs_of(trained.forward(data, "cross_entropy").result())
    for s, lp in zip(result.sequences, forward, strict=True):
        np.testing.assert_allclose(lp[len(prompt) - 1:], s.logprobs, atol=1e-4)


def test_topk_logprobs_of_samples_and_prompt(trained):
    """Top-k lists are the model's most likely tokens with their logprobs (checked token by token with
    `compute_logprobs`), and asking for them changes nothing else in the sample."""
    sampler = trained.save_weights_and_get_sampling_client()
    k, kp = 5, 3
    plain = sampler.sample(PROMPT, 2, params(seed=9)).result()
    result = sampler.sample(PROMPT, 2, params(seed=9), include_prompt_logprobs=True, topk_prompt_logprobs=kp,
                            topk_sample_logprobs=k).result()
    assert plain.topk_prompt_logprobs is None and all(s.topk_logprobs is None for s in plain.sequences)
    assert [s.tokens for s in result.sequences] == [s.tokens for s in plain.sequences]
    for s, p in zip(result.sequences, plain.sequences, strict=True):
        np.testing.assert_allclose(s.logprobs, p.logprobs, atol=1e-6)  # two compiled programs

    prompt = PROMPT.to_ints()
    checks = []  # (context, candidate token, its top-k logprob)

    def check_topk(entry, token, logprob, context, width):
        ids = [i for i, _ in entry]
        lps = [lp for _, lp in entry]
        assert len(entry) == width and len(set(ids)) == width and lps == sorted(lps, reverse=True)
        if token in ids:  # the token's own logprob is its entry; if absent, it is below all of them
            assert lps[ids.index(token)] == pytest.approx(logprob, abs=1e-4)
        else:
            assert logprob <= lps[-1] + 1e-4
        checks.extend((context, i, lp) for i, lp in entry)

    for s in result.sequences:
        assert len(s.topk_logprobs) == len(s.tokens)
        for t, (entry, token, lp) in enumerate(zip(s.topk_logprobs, s.tokens, s.logprobs, strict=True)):
            check_topk(entry, token, lp, prompt + s.tokens[:t], k)
    assert result.topk_prompt_logprobs[0] is None and len(result.topk_prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        check_topk(result.topk_prompt_logprobs[t], prompt[t], result.prompt_logprobs[t], prompt[:t], kp)
    checks = checks[:: max(1, len(checks) // 40)]  # a spread of ~40 entries, each scored independently
    futures = [sampler.compute_logprobs(types.ModelInput.from_ints([*ctx, i])) for ctx, i, _ in checks]
    for (_, _, lp), f in zip(checks, futures, strict=True):
        assert f.result()[-1] == pytest.approx(lp, abs=1e-4)


def test_a_diverged_adapter_cannot_reach_the_sampler(tenants, engine):
    """A decode step multiplies every snapshot in the batch, so NaN weights would reach other tenants'
    rows: publishing non-finite weights is refused with an error that says what happened."""
    other = tenants.new(seed=40)
    sampler = other.save_weights_and_get_sampling_client()
    before = sampler.sample(PROMPT, 2, params(seed=3)).result()
    client = tenants.new(seed=41)
    data = batch(3)
    for _ in range(4):  # an absurd learning rate: the weights overflow, then turn NaN
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e38)).result()
    assert not all(np.isfinite(w).all() for w in jax.tree.leaves(weights(client)))
    with pytest.raises(ValueError, match=r"adapter .* at step 4 has non-finite weights \(NaN or inf\); training "
                                         r"diverged"):
        client.save_weights_and_get_sampling_client()
    bad = jax.tree.map(lambda w: np.full(w.shape, np.nan, np.float32), weights(other))
    with pytest.raises(ValueError, match=r"sampler weights 'corrupt' has non-finite weights"):
        engine.add_snapshot("corrupt", bad, 1.0, 0)
    assert "corrupt" not in engine.snapshots
    after = sampler.sample(PROMPT, 2, params(seed=3)).result()
    assert [s.tokens for s in after.sequences] == [s.tokens for s in before.sequences]


def test_sampler_keeps_its_snapshot_after_optim_step(tenants):
    client = tenants.new(seed=22)
    data = batch(7)
    for _ in range(2):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(LR)
    old = client.save_weights_and_get_sampling_client()
    before = old.sample(PROMPT, 4, params(seed=5)).result()
    sequence = types.ModelInput.from_ints(PROMPT.to_ints() + before.sequences[0].tokens)
    logprobs_before = old.compute_logprobs(sequence).result()

    client.forward_backward(data, "cross_entropy")
    client.optim_step(LR).result()
    after = old.sample(PROMPT, 4, params(seed=5)).result()
    assert [(s.tokens, s.logprobs, s.weights_version) for s in after.sequences] == [
        (s.tokens, s.logprobs, 2) for s in before.sequences]
    assert old.compute_logprobs(sequence).result() == logprobs_before

    new = client.save_weights_and_get_sampling_client()
    assert new.version == 3
    assert new.compute_logprobs(sequence).result()[1:] != logprobs_before[1:]


# ---------------------------------------------------------------------------------- checkpoints
def test_save_state_and_resume(tenants, service):
    data = batch(8)
    original = tenants.new(seed=31, rank=6, train_unembed=False)
    for _ in range(3):
        original.forward_backward(data, "cross_entropy")
        original.optim_step(LR)
    path = original.save_state("three").result().path
    saved = full_state(original)

    resumed = tenants.track(service.create_training_client_from_state_with_optimizer(path))
    fresh = tenants.track(service.create_training_client_from_state(path))
    reloaded = tenants.new(seed=99, rank=6, train_unembed=False)
    reloaded.load_state(path).result()
    assert resumed.get_info().lora_rank == 6
    state = full_state(resumed)
    assert_trees_equal(state["weights"], saved["weights"])
    assert_trees_equal(state["opt_state"], saved["opt_state"])
    assert state["step"] == 3
    for client in (fresh, reloaded):  # weights restored, optimizer fresh
        state = full_state(client)
        assert_trees_equal(state["weights"], saved["weights"])
        assert_trees_equal(state["opt_state"], jax.device_get(init_opt_state(saved["weights"])))

    clients = (original, resumed, fresh, reloaded)
    losses = [loss_of(c.forward_backward(data, "cross_entropy").result()) for c in clients]
    assert losses == [losses[0]] * 4
    for c in clients:
        c.optim_step(LR).result()
    after = [weights(c) for c in clients]
    assert_trees_close(after[1], after[0], atol=1e-6)
    assert_trees_close(after[3], after[2], atol=1e-6)
    assert not np.allclose(after[2]["q"]["b"], after[0]["q"]["b"], atol=1e-6), "a fresh optimizer steps differently"

    with pytest.raises(FileExistsError, match="already exists"):
        original.save_state("three")
    original.save_state("three", overwrite=True).result()


def test_sampler_weights_file_samples_like_the_snapshot(trained, service):
    path = trained.save_weights_for_sampler("sampler").result().path
    from_file = service.create_sampling_client(model_path=path)
    in_memory = trained.save_weights_and_get_sampling_client()
    assert from_file.version == in_memory.version == 5
    a = from_file.sample(PROMPT, 4, params(max_tokens=16, seed=6)).result()
    b = in_memory.sample(PROMPT, 4, params(max_tokens=16, seed=6)).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    for x, y in zip(a.sequences, b.sequences, strict=True):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
        assert x.weights_version == 5


# ---------------------------------------------------------------------------------- bad input
def _datum(tokens, **inputs) -> types.Datum:
    n = len(tokens)
    defaults = {"target_tokens": [5] * n, "weights": [1.0] * n}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={**defaults, **inputs})


def _rl(n=4, **inputs) -> types.Datum:
    base = {"target_tokens": [5] * n, "logprobs": [-1.0] * n, "advantages": [1.0] * n}
    return types.Datum(model_input=types.ModelInput.from_ints([7] * n), loss_fn_inputs={**base, **inputs})


def _sample(prompt, num_samples=4, **kwargs):
    return lambda c, s, b: c.save_weights_and_get_sampling_client().sample(
        types.ModelInput.from_ints(prompt), num_samples, types.SamplingParams(**kwargs))


BAD_INPUT = {
    "model_input_token_above_vocab": (lambda c, s, b: c.forward_backward([_datum([5, VOCAB, 7])], "cross_entropy"),
                                      r"data\[0\]\.model_input\[1\] = 301 is outside the vocabulary \[0, 301\)"),
    "target_token_above_vocab": (
        lambda c, s, b: c.forward_backward([_datum([5, 6, 7], target_tokens=[5, 6, 400])], "cross_entropy"),
        r"data\[0\]\.loss_fn_inputs\['target_tokens'\]\[2\] = 400 is outside the vocabulary"),
    "negative_token": (lambda c, s, b: c.forward_backward([_datum([5, -1, 7])], "cross_entropy"),
                       r"non-negative token ids, got -1 at index 1"),
    "negative_target_token": (
        lambda c, s, b: c.forward_backward([_datum([5, 6], target_tokens=[-3, 5])], "cross_entropy"),
        r"loss_fn_inputs\['target_tokens'\] must be non-negative token ids, got -3"),
    "empty_data": (lambda c, s, b: c.forward_backward([], "cross_entropy"), r"data is empty"),
    "empty_data_custom": (lambda c, s, b: c.forward_backward_custom([], lambda d, lp: (lp[0].sum(), {})),
                          r"data is empty"),
    "empty_model_input": (lambda c, s, b: c.forward_backward(
        [types.Datum(model_input=types.ModelInput.empty(), loss_fn_inputs={})], "cross_entropy"),
        r"model_input must be at least one token"),
    "target_tokens_length": (lambda c, s, b: c.forward_backward([_datum([5, 6, 7, 8], target_tokens=[5, 6, 7])],
                                                                "cross_entropy"),
                             r"loss_fn_inputs\['target_tokens'\] has shape \[3\]; .* model_input.length 4"),
    "weights_length": (lambda c, s, b: c.forward_backward([_datum([5, 6, 7, 8], weights=[1.0] * 5)], "cross_entropy"),
                       r"loss_fn_inputs\['weights'\] has shape \[5\]; .* model_input.length 4"),
    "advantages_length": (lambda c, s, b: c.forward_backward([_rl(advantages=[1.0] * 3)], "importance_sampling"),
                          r"loss_fn_inputs\['advantages'\] has shape \[3\]; .* model_input.length 4"),
    "non_finite_weights": (lambda c, s, b: c.forward_backward([_datum([5, 6], weights=[1.0, np.nan])],
                                                              "cross_entropy"),
                           r"loss_fn_inputs\['weights'\] must be finite"),
    "unknown_loss": (lambda c, s, b: c.forward_backward([_datum([5, 6])], "mse"), r"unknown loss_fn 'mse'"),
    "missing_advantages": (lambda c, s, b: c.forward_backward(
        [_datum([5, 6], logprobs=[-1.0, -1.0])], "importance_sampling"),
        r"loss_fn 'importance_sampling' needs loss_fn_inputs \['advantages'\]"),
    "dro_without_beta": (lambda c, s, b: c.forward_backward([_rl()], "dro"), r"needs loss_fn_config\['beta'\]"),
    "ppo_clip_inverted": (lambda c, s, b: c.forward_backward(
        [_rl()], "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 0.5}),
        r"clip_high_threshold'\] \(0.5\) must be >= clip_low_threshold \(0.9\)"),
    "sequence_above_context": (lambda c, s, b: c.forward_backward([_datum([5] * (CONTEXT + 1))], "cross_entropy"),
                               rf"data\[0\]\.model_input has {CONTEXT + 1} tokens; the maximum is {CONTEXT}"),
    "nan_learning_rate": (lambda c, s, b: c.optim_step(types.AdamParams(learning_rate=float("nan"))),
                          r"learning_rate must be a finite number >= 0.0, got nan"),
    "negative_learning_rate": (lambda c, s, b: c.optim_step(types.AdamParams(learning_rate=-1e-3)),
                               r"learning_rate must be a finite number >= 0.0, got -0.001"),
    "rank_zero": (lambda c, s, b: s.create_lora_training_client(b, rank=0), r"rank must be >= 1, got 0"),
    "rank_above_max": (lambda c, s, b: s.create_lora_training_client(b, rank=MAX_RANK + 1),
                       rf"rank {MAX_RANK + 1} is above this engine's max_rank {MAX_RANK}"),
    "unknown_base_model": (lambda c, s, b: s.create_lora_training_client(b + "-does-not-exist", rank=4),
                           r"checkpoint directory '.*-does-not-exist' does not exist"),
    "temperature_negative": (_sample([5, 6], temperature=-0.5), r"temperature must be .*>= 0.0, got -0.5"),
    "top_p_above_one": (_sample([5, 6], top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    "top_k_zero": (_sample([5, 6], top_k=0), r"top_k must be -1 \(no limit\) or >= 1, got 0"),
    "max_tokens_zero": (_sample([5, 6], max_tokens=0), r"max_tokens must be >= 1 \(or None\), got 0"),
    "num_samples_zero": (_sample([5, 6], num_samples=0, max_tokens=4), r"num_samples must be a positive integer"),
    "prompt_token_above_vocab": (_sample([5, VOCAB + 3], max_tokens=4),
                                 r"prompt\[1\] = 304 is outside the vocabulary"),
    "topk_sample_negative": (lambda c, s, b: c.save_weights_and_get_sampling_client().sample(
        PROMPT, 1, params(), topk_sample_logprobs=-1), r"topk_sample_logprobs must be an integer in \[0, 64\], got -1"),
    "topk_prompt_too_large": (lambda c, s, b: c.save_weights_and_get_sampling_client().sample(
        PROMPT, 1, params(), topk_prompt_logprobs=65), r"topk_prompt_logprobs must be an integer in \[0, 64\], got 65"),
    "stop_token_above_vocab": (_sample([5, 6], max_tokens=4, stop=[VOCAB]),
                               r"sampling_params.stop token 301 is outside the vocabulary"),
    "prompt_too_long_for_context": (_sample([5] * (CONTEXT - 3), max_tokens=10),
                                    rf"max_tokens=10: the prompt has {CONTEXT - 3} tokens and the context is "
                                    rf"{CONTEXT}, so at most 3 can be sampled"),
    "logprobs_prompt_above_context": (
        lambda c, s, b: c.save_weights_and_get_sampling_client().compute_logprobs(
            types.ModelInput.from_ints([5] * (CONTEXT + 1))),
        rf"prompt has {CONTEXT + 1} tokens; the maximum is {CONTEXT}"),
    "checkpoint_name_with_slash": (lambda c, s, b: c.save_state("a/b"), r"checkpoint name 'a/b' must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_and_changes_nothing(trained, service, base_model, engine, case):
    """Invariant 6: refused in the caller's thread with an error naming the field and the value; the
    client's weights, optimizer state and gradients are bitwise unchanged, no adapter is created, and
    the client still works."""
    call, message = BAD_INPUT[case]
    data = batch(0)
    loss_before = loss_of(trained.forward(data, "cross_entropy").result())
    state_before = full_state(trained)
    adapters_before = set(engine.adapters)
    with pytest.raises(ValueError, match=message):
        call(trained, service, base_model)
    assert set(engine.adapters) == adapters_before
    assert_trees_equal(full_state(trained), state_before)
    assert loss_of(trained.forward(data, "cross_entropy").result()) == loss_before


def test_unsupported_architecture_is_refused_as_bad_input(service, checkpoint_copy):
    """A checkpoint of an architecture we do not implement is refused like any other bad input: a ValueError
    naming its model_type, raised before an engine exists, so a second try fails the same way."""
    directory = checkpoint_copy(BASE)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    served = service.get_server_capabilities().supported_models
    for _ in range(2):
        with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported model_types: "):
            service.create_lora_training_client(str(directory), rank=4)
    assert service.get_server_capabilities().supported_models == served


def test_engine_config_refuses_one_token_training_buckets():
    """A one-token bucket would send training batches down the LoRA path that mixes all slots per row."""
    with pytest.raises(ValueError, match=r"min_seq_bucket must be >= 2, got 1"):
        EngineConfig(min_seq_bucket=1)
