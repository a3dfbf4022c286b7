"""The engine as a long-running multi-tenant server: any number of tenants (paging), bounded memory
(snapshot lifetimes), versions that never lie, a worker that cannot die, I/O off the worker,
continuous batching, shared prefixes, packed training rows and batched optim steps.

Tiny 2-layer tied qwen2 (vocab 301) throughout; sequences stay in the 32-token bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import time

import jax
import numpy as np
import pytest

from framework import ServiceClient, types
from framework.engine import Engine, EngineConfig, ForwardRequest, LogprobsRequest, OptimRequest, SampleJob
from framework.optim import AdamHyperparams
from framework.scheduler import Scheduler, SchedulerClosed

BASE = "qwen2_tied"
VOCAB = 301
LR = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint(BASE))


def datum(rng: np.random.Generator, n: int) -> types.Datum:
    ids = rng.integers(3, VOCAB, n + 1)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(n, np.float32)})


def batch(seed: int, lengths=(20, 13, 7)) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    return [datum(rng, n) for n in lengths]


def params(**kwargs) -> types.SamplingParams:
    return types.SamplingParams(**{"max_tokens": 12, "seed": 0, "stop": [], **kwargs})


PROMPT = types.ModelInput.from_ints(np.random.default_rng(7).integers(3, VOCAB, 10).tolist())


def weights_of(client) -> dict:
    return client._scheduler.call(lambda: jax.device_get(client._engine.adapter_weights(client.model_id))).result()


def assert_trees_equal(a, b, msg: str = "") -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=msg)


def train(client, steps: int, seed: int) -> list[float]:
    losses = []
    for s in range(steps):
        losses.append(client.forward_backward(batch(seed + s), "cross_entropy").result().metrics["loss:sum"])
        client.optim_step(LR).result()
    return losses


# --------------------------------------------------------------------------------- any number of tenants
def test_forty_tenants_on_default_settings_page_out_and_back_bit_for_bit(base_model, tmp_path):
    """40 training clients on an engine that keeps 8 on the device: all train, none sees a slot error,
    and the first two, paged out and back in between their steps, equal a solo replay bitwise."""
    with ServiceClient(home=tmp_path) as service:
        clients = [service.create_lora_training_client(base_model, rank=4, seed=i) for i in range(40)]
        engine = clients[0]._engine
        assert engine.config.max_adapters == 8
        losses = {c.model_id: [] for c in clients}
        for round_ in range(2):
            for i, c in enumerate(clients):  # each client's step runs alone: the replay runs the same programs
                losses[c.model_id].append(
                    c.forward_backward(batch(100 * i + round_), "cross_entropy").result().metrics["loss:sum"])
                c.optim_step(LR).result()
        metrics = engine.metrics()["adapters"]
        assert metrics["total"] == 40 and metrics["resident"] <= 8 and metrics["page_ins"] >= 40
        trained = [weights_of(c) for c in clients[:2]]
        for i, c in enumerate(clients[:2]):
            replay = service.create_lora_training_client(base_model, rank=4, seed=i)
            replay_losses = []
            for round_ in range(2):
                replay_losses.append(
                    replay.forward_backward(batch(100 * i + round_), "cross_entropy").result().metrics["loss:sum"])
                replay.optim_step(LR).result()
            assert replay_losses == losses[c.model_id]
            assert_trees_equal(weights_of(replay), trained[i], msg=f"tenant {i}")
        assert all(np.isfinite(v).all() for v in losses.values())
        # Releasing frees the adapter; the engine forgets it.
        clients[5].release().result()
        assert clients[5].model_id not in engine.adapters
        with pytest.raises(ValueError, match="released"):
            clients[5].forward_backward(batch(0), "cross_entropy")


def test_paging_moves_every_part_of_the_state(base_model):
    """Weights, AdamW moments, pending gradients and the step survive a page-out/page-in exactly;
    gradient and optimizer buffers exist only once an adapter needs them."""
    engine = Engine(base_model, EngineConfig(max_adapters=1, max_rank=8))
    rng = np.random.default_rng(0)
    from framework.validation import datums_to_arrays

    arrays, _ = datums_to_arrays([datum(rng, 12)], "cross_entropy", None, vocab_size=VOCAB, max_seq_len=64)
    a = engine.create_adapter(rank=4, seed=1)
    assert a.grads is None and a.opt_state is None
    engine.forward([ForwardRequest(a.adapter_id, arrays, "cross_entropy")], backward=True)
    engine.optim_step([OptimRequest(a.adapter_id, AdamHyperparams.make(1e-2))])
    assert a.grads is None and a.opt_state is not None and a.version == 1
    engine.forward([ForwardRequest(a.adapter_id, arrays, "cross_entropy")], backward=True)
    before = jax.device_get((a.weights, a.opt_state, a.grads))
    b = engine.create_adapter(rank=4, seed=2)  # pages `a` out
    assert not a.resident and b.resident
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves((a.weights, a.opt_state, a.grads)))
    engine.adapters.ensure_resident([a.adapter_id])
    assert a.resident and not b.resident
    after = jax.device_get((a.weights, a.opt_state, a.grads))
    assert_trees_equal(after, before)
    assert engine.adapters.page_in_seconds > 0


def test_a_failed_page_in_leaves_every_adapter_paged_out_whole(base_model, monkeypatch):
    """Adapters paged in together change nothing until every transfer has landed: one that fails (out of
    device memory, say) leaves them all on the host, intact, and a later page-in works."""
    engine = Engine(base_model, EngineConfig(max_adapters=1, max_rank=8))
    ids = [engine.create_adapter(rank=4, seed=s).adapter_id for s in range(3)]  # only the last is resident
    pool = engine.adapters
    before = [jax.device_get(pool.get(a).weights) for a in ids[:2]]
    real, calls = pool._to_device, []

    def second_fails(*state):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of device memory")
        return real(*state)

    monkeypatch.setattr(pool, "_to_device", second_fails)
    with pytest.raises(RuntimeError, match="out of device memory"):
        pool.ensure_resident(ids[:2])
    for adapter_id, expected in zip(ids[:2], before, strict=True):
        adapter = pool.get(adapter_id)
        assert not adapter.resident and all(isinstance(x, np.ndarray) for x in jax.tree.leaves(adapter.weights))
        assert_trees_equal(adapter.weights, expected)
    monkeypatch.undo()
    pool.ensure_resident(ids[:2])
    assert [pool.get(a).resident for a in ids] == [True, True, False]
    assert_trees_equal(jax.device_get([pool.get(a).weights for a in ids[:2]]), before)


def held_worker(scheduler: Scheduler) -> threading.Event:
    """Blocks the scheduler's worker until the returned event is set, so that what is queued meanwhile
    is batched as one queue."""
    gate = threading.Event()
    blocker = scheduler.call(lambda: gate.wait(30))
    while not blocker.running():
        time.sleep(0.001)
    return gate


def test_a_full_batch_fills_with_resident_adapters_first():
    """When more adapters wait than a batch holds, those on the device join first; the oldest request
    always runs, an adapter's requests keep their order, and a batch runs in queue order."""
    batches: list[list[str]] = []
    scheduler = Scheduler(max_batch_adapters=3, resident=lambda a: a in {"d", "e"})
    try:
        gate = held_worker(scheduler)
        run = recording_batches(batches)
        futures = [scheduler.submit(run, name, adapter_id=name[0], batch_key=("other",) if name == "d0" else ("k",))
                   for name in ("a1", "d0", "b1", "c1", "d1", "e1")]
        gate.set()
        [f.result(10) for f in futures]
        # a1 (oldest) with resident e1 and then b1; d1 waits behind d0 (another kind), then joins c1
        assert batches == [["a1", "b1", "e1"], ["d0"], ["c1", "d1"]]
    finally:
        scheduler.shutdown()


def test_a_request_passed_over_twice_joins_as_early_as_resident_ones():
    """Resident adapters never hold a request back for long: passed over twice, it counts as resident."""
    batches: list[list[str]] = []
    scheduler = Scheduler(max_batch_adapters=2, resident=lambda a: a in {"x", "y", "z"})
    try:
        gate = held_worker(scheduler)
        run = recording_batches(batches)
        futures = [scheduler.submit(run, name, adapter_id=name[0], batch_key=("k",))
                   for name in ("a1", "b1", "c1", "d1", "x1", "y1", "z1")]
        gate.set()
        [f.result(10) for f in futures]
        # x1 and y1 jump c1 and d1; then d1 (passed over twice) goes before the resident z1
        assert batches == [["a1", "x1"], ["b1", "y1"], ["c1", "d1"], ["z1"]]
    finally:
        scheduler.shutdown()


def test_rounds_beyond_the_device_slots_page_fewer_adapters(base_model):
    """Four tenants' forward_backward + optim_step rounds on 2 device slots: preferring resident adapters
    pages 3 adapters in per round instead of 4, with the same training."""
    from framework.validation import datums_to_arrays

    hp = AdamHyperparams.make(1e-2)
    rng = np.random.default_rng(3)
    arrays = [datums_to_arrays([datum(rng, 16)], "cross_entropy", None, vocab_size=VOCAB, max_seq_len=64)[0]
              for _ in range(4)]
    outcome = {}
    config = EngineConfig(max_adapters=2, max_rank=8)
    for prefer in (True, False):
        if prefer:  # the engine and scheduler a ServiceClient runs
            service = ServiceClient(engine_config=config)
            engine, scheduler = service._runtime.get(base_model)
        else:
            service, engine = None, Engine(base_model, config)
            scheduler = Scheduler(max_batch_adapters=2)
        ids = scheduler.call(lambda e=engine: [e.create_adapter(rank=4, seed=i).adapter_id for i in range(4)]
                             ).result(60)
        try:
            page_ins = []
            for _ in range(3):
                before = engine.adapters.page_ins
                gate = held_worker(scheduler)
                futures = []
                for i, a in enumerate(ids):
                    futures.append(scheduler.submit(lambda r, e=engine: e.forward(r, backward=True),
                                                    ForwardRequest(a, arrays[i], "cross_entropy"), adapter_id=a,
                                                    batch_key=("forward_backward", "cross_entropy")))
                    futures.append(scheduler.submit(engine.optim_step, OptimRequest(a, hp), adapter_id=a,
                                                    batch_key=("optim_step",)))
                gate.set()
                [f.result(60) for f in futures]
                page_ins.append(engine.adapters.page_ins - before)
            outcome[prefer] = (page_ins, scheduler.call(lambda e=engine, ids=ids: jax.device_get(
                [e.adapter_weights(a) for a in ids])).result(60))
        finally:
            if service is not None:
                service.close()
            else:
                scheduler.shutdown()
    assert outcome[True][0][1:] == [3, 3] and outcome[False][0][1:] == [4, 4]
    for x, y in zip(jax.tree.leaves(outcome[True][1]), jax.tree.leaves(outcome[False][1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_sixteen_threads_train_and_sample_like_their_solo_runs(base_model, tmp_path):
    """16 threads, each with its own adapter, loop train + publish + sample at once: every future
    resolves (no deadlock) and each tenant's losses and greedy samples equal its solo run."""
    def loop(service, seed, out):
        client = service.create_lora_training_client(base_model, rank=4, seed=seed)
        record = []
        for step in range(2):
            fb = client.forward_backward(batch(seed * 10 + step, (9, 5)), "cross_entropy")
            client.optim_step(LR)
            sampler = client.save_weights_and_get_sampling_client()
            sample = sampler.sample(PROMPT, 2, params(max_tokens=6, temperature=0.0)).result(120)
            record.append((fb.result(120).metrics["loss:sum"], [s.tokens for s in sample.sequences],
                           [s.logprobs for s in sample.sequences]))
        out[seed] = record

    config = EngineConfig(max_rank=8)
    with ServiceClient(engine_config=config, home=tmp_path / "together") as service:
        together: dict[int, list] = {}
        threads = [threading.Thread(target=loop, args=(service, seed, together)) for seed in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads), "deadlock: a tenant's loop never finished"
        assert len(together) == 16
    with ServiceClient(engine_config=config, home=tmp_path / "solo") as service:
        for seed in (0, 7, 15):
            solo: dict[int, list] = {}
            loop(service, seed, solo)
            for (loss, tokens, lps), (loss_t, tokens_t, lps_t) in zip(solo[seed], together[seed], strict=True):
                assert loss_t == pytest.approx(loss, rel=1e-5)
                assert tokens_t == tokens
                np.testing.assert_allclose(np.concatenate(lps_t), np.concatenate(lps), atol=1e-4)


# ------------------------------------------------------------------------------ versions and snapshots
def test_a_rolled_back_adapter_serves_the_rolled_back_weights(base_model, tmp_path):
    """Save at step 3, train to step 6, publish, load the step-3 state, publish again: the new sampler
    serves the step-3 weights, under a new version."""
    with ServiceClient(home=tmp_path) as service:
        client = service.create_lora_training_client(base_model, rank=4, seed=3)
        train(client, 3, seed=0)
        at_three = client.save_weights_and_get_sampling_client()
        path = client.save_state("three").result().path
        train(client, 3, seed=10)
        at_six = client.save_weights_and_get_sampling_client()
        client.load_state_with_optimizer(path).result()
        rolled_back = client.save_weights_and_get_sampling_client()
        assert (at_three.version, at_six.version) == (3, 6)
        assert rolled_back.version == 7  # a new version: a load is a write
        samples = {name: s.sample(PROMPT, 2, params(seed=4)).result()
                   for name, s in (("three", at_three), ("six", at_six), ("rolled_back", rolled_back))}
        tokens = {k: [q.tokens for q in v.sequences] for k, v in samples.items()}
        assert tokens["rolled_back"] == tokens["three"] != tokens["six"]
        for a, b in zip(samples["rolled_back"].sequences, samples["three"].sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
        assert {q.weights_version for q in samples["rolled_back"].sequences} == {7}
        again = client.save_weights_and_get_sampling_client()
        assert again.snapshot_id == rolled_back.snapshot_id  # no write since: the same snapshot


def test_snapshots_live_while_referenced_and_memory_stays_flat(base_model, tmp_path):
    """300 publish steps: every dropped SamplingClient frees its snapshot, so the snapshot count stays
    bounded and host memory flat; a queued request keeps its snapshot alive until it is done."""
    import psutil

    with ServiceClient(engine_config=EngineConfig(max_rank=8, sampler_slots=4), home=tmp_path) as service:
        client = service.create_lora_training_client(base_model, rank=8, seed=5)
        engine = client._engine
        data = batch(1)
        rss = []
        for step in range(300):
            client.forward_backward(data, "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            sampler = client.save_weights_and_get_sampling_client()
            if step % 50 == 0:
                sampler.sample(PROMPT, 1, params(max_tokens=2)).result()
            del sampler
            if step in (50, 299):
                gc.collect()
                rss.append(psutil.Process().memory_info().rss)
            assert len(engine.snapshots) <= 2  # base + at most the one just dropped
        assert rss[1] - rss[0] < 20 * 2**20, f"host memory grew {(rss[1] - rss[0]) / 2**20:.1f} MB"
        metrics = engine.metrics()
        assert metrics["snapshots"]["count"] == 1  # only the base model is left

        # A request in the queue holds its snapshot even after the client is dropped.
        sampler = client.save_weights_and_get_sampling_client()
        snapshot_id = sampler.snapshot_id
        gate = threading.Event()
        client._scheduler.call(lambda: gate.wait(30))
        future = sampler.sample(PROMPT, 2, params(max_tokens=4))
        del sampler
        gc.collect()
        assert snapshot_id in engine.snapshots
        gate.set()
        assert len(future.result().sequences) == 2
        client._scheduler.call(lambda: None).result()
        client._scheduler.call(engine.collect).result()
        assert snapshot_id not in engine.snapshots


# ------------------------------------------------------------------------------ the worker cannot die
def test_failures_reach_their_futures_and_the_worker_keeps_serving(base_model, tmp_path, monkeypatch):
    with ServiceClient(home=tmp_path) as service:
        good, bad = (service.create_lora_training_client(base_model, rank=4, seed=s) for s in (1, 2))
        engine, scheduler = good._engine, good._scheduler
        expected = good.forward(batch(0), "cross_entropy").result().metrics["loss:sum"]

        # 1. A batch that fails is retried request by request: only the request that fails alone fails.
        real = engine.forward

        def failing(requests, **kw):
            if any(r.adapter_id == bad.model_id for r in requests):
                raise RuntimeError("injected: this tenant's request breaks the step")
            return real(requests, **kw)

        monkeypatch.setattr(engine, "forward", failing)
        gate = held_worker(scheduler)
        f_bad, f_good = bad.forward(batch(0), "cross_entropy"), good.forward(batch(0), "cross_entropy")
        gate.set()
        with pytest.raises(RuntimeError, match="injected"):
            f_bad.result(30)
        assert f_good.result(30).metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
        monkeypatch.undo()

        # 2. A failure in the result hand-out itself still reaches the future.
        future = scheduler.submit(lambda payloads: None, "x")  # returns no list: the hand-out fails
        with pytest.raises(TypeError):
            future.result(30)
        assert good.forward(batch(0), "cross_entropy").result(30).metrics["loss:sum"] == pytest.approx(expected,
                                                                                                       rel=1e-6)

        # 3. A decode step that fails after its donated KV pool was consumed: the requests in the pool fail,
        # the pool is rebuilt, and the next request samples as before.
        sampler = good.save_weights_and_get_sampling_client()
        reference = sampler.sample(PROMPT, 2, params(seed=9)).result(60)
        decoder = engine.decoder
        real_chunk = decoder._chunk

        def broken_chunk(*args, **kwargs):
            for leaf in jax.tree.leaves((args[5], args[6])):  # the donated cache and logits are gone
                leaf.delete()
            raise RuntimeError("injected: the device failed mid-decode")

        monkeypatch.setattr(decoder, "_chunk", broken_chunk)
        with pytest.raises(RuntimeError, match="mid-decode"):
            sampler.sample(PROMPT, 2, params(seed=9)).result(60)
        monkeypatch.setattr(decoder, "_chunk", real_chunk)
        again = sampler.sample(PROMPT, 2, params(seed=9)).result(60)
        assert [s.tokens for s in again.sequences] == [s.tokens for s in reference.sequences]
        assert scheduler._thread.is_alive()


def test_cancel_and_shutdown_resolve_every_future(base_model, tmp_path):
    service = ServiceClient(home=tmp_path)
    client = service.create_lora_training_client(base_model, rank=4, seed=1)
    sampler = client.save_weights_and_get_sampling_client()
    scheduler = client._scheduler
    gate = threading.Event()
    scheduler.call(lambda: gate.wait(30))
    queued = [client.forward_backward(batch(i), "cross_entropy") for i in range(3)]
    cancelled = client.forward(batch(9), "cross_entropy")
    assert cancelled.cancel()
    samples = [sampler.sample(PROMPT, 2, params(seed=i)) for i in range(2)]
    shutdown = threading.Thread(target=service.close)
    shutdown.start()
    time.sleep(0.2)
    gate.set()
    shutdown.join(60)
    assert not shutdown.is_alive()
    assert cancelled.cancelled()
    for f in [*queued, *samples]:
        assert f.done()
        with pytest.raises(SchedulerClosed):
            f.result(0)
    with pytest.raises(SchedulerClosed):
        client.forward(batch(0), "cross_entropy")


def test_checkpoint_writes_do_not_block_other_tenants(base_model, tmp_path, monkeypatch):
    """A save's disk write runs on the I/O pool: while it is stuck, another tenant keeps training; the
    write sees the state as of the save's place in its adapter's queue."""
    from framework import checkpoints

    with ServiceClient(home=tmp_path) as service:
        saver, other = (service.create_lora_training_client(base_model, rank=4, seed=s) for s in (1, 2))
        real_save = checkpoints.save_training_state
        writing, release = threading.Event(), threading.Event()

        def slow_save(*args, **kwargs):
            writing.set()
            release.wait(60)
            return real_save(*args, **kwargs)

        monkeypatch.setattr(checkpoints, "save_training_state", slow_save)
        train(saver, 1, seed=0)
        saved = saver.save_state("slow")
        train(saver, 1, seed=1)  # after the save: must not leak into it
        assert writing.wait(30)
        losses = train(other, 2, seed=5)  # completes while the write is stuck
        assert not saved.done() and all(np.isfinite(losses))
        release.set()
        path = saved.result(60).path
        state = checkpoints.load_training_state(path, weights_like=saver._engine.zero_adapter(),
                                                opt_state_like=saver._engine.training_state(saver.model_id)[
                                                    "opt_state"])
        assert state[2] == 1  # the step the save was queued at


# ---------------------------------------------------------------------------------- continuous batching
# The decode pool's and prefill's shape floors an accelerator gets by default (padded rows and prompts).
SHAPE_FLOORS = pytest.mark.parametrize("floors", [{}, {"min_decode_rows": 8, "min_prefill_tokens": 128}],
                                       ids=["no_floors", "accelerator_floors"])


@SHAPE_FLOORS
def test_continuous_batching_equals_sampling_alone(base_model, floors):
    """Requests with different budgets, seeds, settings and snapshots share decode steps and get the
    same tokens and logprobs as each sampled alone; a short request finishes while a long one runs."""
    config = EngineConfig(max_rank=8, decode_chunk=4, **floors)
    engine = Engine(base_model, config)
    assert engine.decoder._min_rows == floors.get("min_decode_rows", 1)  # no floor by default on CPU
    adapters = [engine.create_adapter(rank=4, seed=s) for s in (1, 2)]
    for a in adapters:  # distinct non-zero weights
        w = jax.tree.map(lambda x, s=a.seed: x + 0.05 * np.random.default_rng(s).normal(size=x.shape).astype(
            np.float32), jax.device_get(a.weights))
        engine.set_adapter_state(a.adapter_id, w, None, 0)
    snaps = [engine.publish(a.adapter_id).snapshot_id for a in adapters] + ["base"]
    rng = np.random.default_rng(3)
    jobs = [SampleJob(snapshot_id=snaps[i % 3], prompt=rng.integers(3, VOCAB, 5 + 3 * i).astype(np.int32),
                      num_samples=1 + i % 3, max_tokens=4 + 9 * i, temperature=[0.0, 1.0, 0.7][i % 3],
                      top_p=[1.0, 0.9, 1.0][i % 3], top_k=[-1, -1, 20][i % 3], seed=i, stop_tokens=(7,))
            for i in range(6)]
    alone = [engine.sample([job])[0] for job in jobs]

    futures = [engine.submit_sample(job) for job in jobs[::2]]
    done_order = []
    for f in futures:
        f.add_done_callback(lambda f: done_order.append(f))
    engine.step_sampling()  # the first three start
    futures += [engine.submit_sample(job) for job in jobs[1::2]]  # join at the next step boundary
    for f in futures[3:]:
        f.add_done_callback(lambda f: done_order.append(f))
    while not all(f.done() for f in futures):
        engine.step_sampling()
    together = dict(zip([*range(0, 6, 2), *range(1, 6, 2)], [f.result() for f in futures], strict=True))
    for i, expected in enumerate(alone):
        got = together[i]
        assert [s.tokens for s in got.sequences] == [s.tokens for s in expected.sequences], f"request {i}"
        assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in expected.sequences]
        for a, b in zip(got.sequences, expected.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    # the shortest request (budget 4) finished before the longest (budget 49) that started with it
    assert done_order.index(futures[0]) < done_order.index(futures[2])
    stats = engine.metrics()["sampling"]
    assert stats["active_rows"] == 0 and stats["waiting"] == 0 and 0 < stats["batch_fill"] <= 1


@SHAPE_FLOORS
def test_prompts_prefill_once_and_the_prefix_cache_equals_recomputing(base_model, floors):
    """num_samples rows share one prefill; a later request extending an earlier sequence (the next
    turn, or compute_logprobs of a sample) computes only its new tokens, with the same results as an
    engine without the cache (and without shape floors)."""
    cached = Engine(base_model, EngineConfig(max_rank=8, **floors))
    plain = Engine(base_model, EngineConfig(max_rank=8, prefix_cache_mb=0))
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, VOCAB, 24).astype(np.int32)

    def job(tokens, seed, n=4):
        return SampleJob(snapshot_id="base", prompt=tokens, num_samples=n, max_tokens=10, temperature=1.0,
                         top_p=1.0, top_k=-1, seed=seed)

    first = [e.sample([job(prompt, 1)])[0] for e in (cached, plain)]
    assert cached.metrics()["sampling"]["prefill_tokens"] == len(prompt)  # once, not 4 times
    turn = np.concatenate([prompt, np.asarray(first[0].sequences[2].tokens, np.int32),
                           rng.integers(3, VOCAB, 6).astype(np.int32)])
    second = [e.sample([job(turn, 2)])[0] for e in (cached, plain)]
    assert second[0].cached_prompt_tokens == len(prompt) + 10 and second[1].cached_prompt_tokens == 0
    for got, expected in (first, second):
        assert [s.tokens for s in got.sequences] == [s.tokens for s in expected.sequences]
        for a, b in zip(got.sequences, expected.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    assert cached.metrics()["prefix_cache"]["hits"] >= 1


def test_accelerator_floors_prefill_any_few_short_prompts_with_one_program(base_model):
    """With the accelerator's floors, 1 to 16 short prompts admitted together prefill in one program
    (prompts and capacity padded to powers of four), with the tokens of an engine without floors."""
    from framework.engine.shapes import coarse_bucket

    assert [coarse_bucket(n) for n in (1, 2, 4, 5, 16, 17, 100, 256, 300)] == [1, 4, 4, 16, 16, 64, 256, 256, 1024]
    floored = Engine(base_model, EngineConfig(max_rank=8, min_decode_rows=8, min_prefill_tokens=128))
    plain = Engine(base_model, EngineConfig(max_rank=8))
    rng = np.random.default_rng(11)
    for count in (1, 3, 9, 16):
        jobs = [SampleJob(snapshot_id="base", prompt=rng.integers(3, VOCAB, 6 + k % 9).astype(np.int32),
                          num_samples=1, max_tokens=3, temperature=1.0, top_p=1.0, top_k=-1, seed=k)
                for k in range(count)]
        got, expected = floored.sample(jobs), plain.sample(jobs)
        for a, b in zip(got, expected, strict=True):
            assert a.sequences[0].tokens == b.sequences[0].tokens
            np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=2e-5)
    assert floored.compile_counts["prefill"] == 1 and plain.compile_counts["prefill"] > 1


def test_compute_logprobs_computes_only_what_the_prefix_cache_does_not_know(base_model):
    """compute_logprobs after sampling feeds the prompt but not the sampled tokens (their logprobs came
    with them); after that, the same sequence costs nothing and an extension only its new tokens. The
    logprobs equal an engine's without the cache."""
    cached = Engine(base_model, EngineConfig(max_rank=8))
    plain = Engine(base_model, EngineConfig(max_rank=8, prefix_cache_mb=0))
    adapter = cached.create_adapter(rank=4, seed=3)
    weights = jax.tree.map(lambda w: np.random.default_rng(0).normal(0, 0.05, w.shape).astype(w.dtype),
                           jax.device_get(adapter.weights))
    cached.set_adapter_state(adapter.adapter_id, weights, None, 0)
    plain.create_adapter(rank=4, seed=3, adapter_id=adapter.adapter_id)
    plain.set_adapter_state(adapter.adapter_id, weights, None, 0)
    sids = [e.publish(adapter.adapter_id).snapshot_id for e in (cached, plain)]
    rng = np.random.default_rng(6)
    prompt = rng.integers(3, VOCAB, 24).astype(np.int32)
    job = SampleJob(snapshot_id=sids[0], prompt=prompt, num_samples=2, max_tokens=10, temperature=1.0, top_p=1.0,
                    top_k=-1, seed=4)
    sampled = cached.sample([job])[0].sequences[1]
    sequence = np.concatenate([prompt, np.asarray(sampled.tokens, np.int32)])
    extended = np.concatenate([sequence, rng.integers(3, VOCAB, 6).astype(np.int32)])

    def computed() -> int:
        return cached.metrics()["logprobs"]["computed_tokens"]

    for tokens, fed in ((sequence, len(prompt)), (sequence, 0), (extended, 7)):
        before = computed()
        got = cached.logprobs([LogprobsRequest(sids[0], tokens)])[0]
        expected = plain.logprobs([LogprobsRequest(sids[1], tokens)])[0]
        assert computed() - before == fed
        np.testing.assert_allclose(got, expected, atol=2e-5)
        np.testing.assert_allclose(got[len(prompt): len(sequence)], sampled.logprobs, atol=2e-5)
    # the next turn (its new tokens only) and a sequence the cache has never seen, in one call
    turn = np.concatenate([extended, rng.integers(3, VOCAB, 5).astype(np.int32)])
    fresh = rng.integers(3, VOCAB, 30).astype(np.int32)
    got = cached.logprobs([LogprobsRequest(sids[0], turn), LogprobsRequest(sids[0], fresh)])
    expected = plain.logprobs([LogprobsRequest(sids[1], turn), LogprobsRequest(sids[1], fresh)])
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # a two-turn rollout nobody scored: its two prompts' new tokens are fed, its two completions are not
    prompt = rng.integers(3, VOCAB, 30).astype(np.int32)
    first = cached.sample([dataclasses.replace(job, prompt=prompt[:24], num_samples=1)])[0].sequences[0]
    prompt2 = np.concatenate([prompt[:24], np.asarray(first.tokens, np.int32), prompt[24:]])
    second = cached.sample([dataclasses.replace(job, prompt=prompt2, num_samples=1)])[0].sequences[0]
    rollout = np.concatenate([prompt2, np.asarray(second.tokens, np.int32)])
    before = computed()
    got = cached.logprobs([LogprobsRequest(sids[0], rollout)])[0]
    assert computed() - before == 24 + 7
    np.testing.assert_allclose(got, plain.logprobs([LogprobsRequest(sids[1], rollout)])[0], atol=2e-5)
    # the official SDK's compute_logprobs (a one-token sample asking for prompt logprobs) of one context with
    # two completions: the first runs the training forward, and what it computes teaches the context's cached
    # keys/values, so the second computes only its completion
    context = rng.integers(3, VOCAB, 30).astype(np.int32)
    for k, completion in enumerate(rng.integers(3, VOCAB, (2, 6)).astype(np.int32)):
        tokens = np.concatenate([context, completion])
        before = computed()
        got, expected = (e.sample([dataclasses.replace(job, snapshot_id=sid, prompt=tokens, num_samples=1, max_tokens=1,
                                                       prompt_logprobs=True)])[0].prompt_logprobs
                         for e, sid in ((cached, sids[0]), (plain, sids[1])))
        assert computed() - before == (len(tokens) if k == 0 else len(completion) + 1)
        np.testing.assert_allclose(got, expected, atol=2e-5)
    # sequences the cache knows nothing of under a snapshot (samples scored under a reference model) take
    # the training forward: the same logprobs as the engine without the cache, bit for bit
    samples = [np.concatenate([prompt, np.asarray(row.tokens, np.int32)])
               for row in cached.sample([dataclasses.replace(job, num_samples=4)])[0].sequences]
    before = computed()
    got = cached.logprobs([LogprobsRequest("base", t) for t in samples])
    assert computed() - before == sum(len(t) for t in samples)
    for a, b in zip(got, plain.logprobs([LogprobsRequest("base", t) for t in samples]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain.compile_counts["score"] == 0


def test_a_one_token_sample_for_prompt_logprobs_takes_one_forward_pass(base_model):
    """The official SDK's compute_logprobs (one token, prompt logprobs) of prompts the cache knows nothing
    of: one training forward serves it, without prefill or decode. The prompt logprobs are the training
    forward's exactly; the sampled token and its logprob are the decode loop's (sampling the same one
    token without prompt logprobs); and the prompt goes to the prefix cache, so another completion of
    the same context computes only its own tokens."""
    engine = Engine(base_model, EngineConfig(max_rank=8))
    adapter = engine.create_adapter(rank=4, seed=3)
    weights = jax.tree.map(lambda w: np.random.default_rng(1).normal(0, 0.05, w.shape).astype(w.dtype),
                           jax.device_get(adapter.weights))
    engine.set_adapter_state(adapter.adapter_id, weights, None, 0)
    sid = engine.publish(adapter.adapter_id).snapshot_id
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, VOCAB, n).astype(np.int32) for n in (20, 33, 9)]
    jobs = [SampleJob(snapshot_id=snapshot, prompt=p, num_samples=n, max_tokens=1, temperature=t, top_p=1.0,
                      top_k=-1, seed=s, stop_tokens=(int(p[0]),), prompt_logprobs=True)
            for (snapshot, p, n, t, s) in ((sid, prompts[0], 1, 1.0, 0), (sid, prompts[1], 3, 1.0, 5),
                                           ("base", prompts[2], 2, 0.0, 7))]
    got = [engine.sample([job])[0] for job in jobs]  # one at a time: the same shapes as `logprobs` below
    assert engine.metrics()["sampling"]["one_pass_requests"] == 3
    assert engine.compile_counts["prefill"] == 0 and engine.compile_counts["decode"] == 0
    plain = Engine(base_model, EngineConfig(max_rank=8, prefix_cache_mb=0))
    plain.create_adapter(rank=4, seed=3, adapter_id=adapter.adapter_id)
    plain.set_adapter_state(adapter.adapter_id, weights, None, 0)
    plain_sid = plain.publish(adapter.adapter_id).snapshot_id
    plain_jobs = [dataclasses.replace(job, snapshot_id=plain_sid if job.snapshot_id == sid else "base") for job in jobs]
    batched = plain.sample(plain_jobs)  # together, in one forward (no prefix cache: nothing known)
    assert plain.metrics()["sampling"]["one_pass_requests"] == 3
    for job, result, together in zip(plain_jobs, got, batched, strict=True):
        scored = plain.logprobs([LogprobsRequest(job.snapshot_id, job.prompt)])[0]
        np.testing.assert_array_equal(result.prompt_logprobs, scored)
        np.testing.assert_allclose(together.prompt_logprobs, scored, atol=2e-5)
        assert [s.tokens for s in together.sequences] == [s.tokens for s in result.sequences]
        (alone,) = plain.sample([dataclasses.replace(job, prompt_logprobs=False)])
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
        assert [s.stop_reason for s in result.sequences] == [s.stop_reason for s in alone.sequences]
        for a, b in zip(result.sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    # Prompts the cache knows part of take one pass too, through the prefix scorer: another completion of
    # the second prompt computes only its own tokens; the first prompt again (all its logprobs known)
    # feeds its last token alone. Neither prefills nor decodes.
    twin = Engine(base_model, EngineConfig(max_rank=8))  # the same history, then `logprobs`
    twin.create_adapter(rank=4, seed=3, adapter_id=adapter.adapter_id)
    twin.set_adapter_state(adapter.adapter_id, weights, None, 0)
    twin_sid = twin.publish(adapter.adapter_id).snapshot_id
    for job in jobs[:2]:
        twin.sample([dataclasses.replace(job, snapshot_id=twin_sid)])
    completion = rng.integers(3, VOCAB, 5).astype(np.int32)
    again = [dataclasses.replace(jobs[1], prompt=np.concatenate([prompts[1], completion])), jobs[0]]
    before = engine.metrics()["logprobs"]["computed_tokens"]
    warm = [engine.sample([job])[0] for job in again]  # each alone: the same shapes as `twin.logprobs`
    assert engine.metrics()["logprobs"]["computed_tokens"] - before == len(completion) + 1 + 1
    assert engine.metrics()["sampling"]["one_pass_requests"] == 5
    assert engine.compile_counts["prefill"] == 0 and engine.compile_counts["decode"] == 0
    assert [r.cached_prompt_tokens for r in warm] == [len(prompts[1]), len(prompts[0]) - 1]
    np.testing.assert_array_equal(warm[1].prompt_logprobs, got[0].prompt_logprobs)
    assert [s.tokens for s in warm[1].sequences] == [s.tokens for s in got[0].sequences]
    np.testing.assert_array_equal(warm[0].prompt_logprobs,
                                  twin.logprobs([LogprobsRequest(twin_sid, again[0].prompt)])[0])
    for job, result in zip(again, warm, strict=True):
        plain_job = dataclasses.replace(job, snapshot_id=plain_sid)
        np.testing.assert_allclose(result.prompt_logprobs,
                                   plain.logprobs([LogprobsRequest(plain_sid, job.prompt)])[0], atol=2e-5)
        (alone,) = plain.sample([dataclasses.replace(plain_job, prompt_logprobs=False)])
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
        for a, b in zip(result.sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_one_pass_requests_sharing_a_context_compute_it_once_and_fall_back_on_failure(base_model):
    """Two completions of one context asked at once: the first takes the one forward pass, the second
    waits a step and extends its cached context (in one pass too). A one-pass forward that fails hands
    its requests to the decode loop, which serves them."""
    engine = Engine(base_model, EngineConfig(max_rank=8))
    rng = np.random.default_rng(10)
    context = rng.integers(3, VOCAB, 30).astype(np.int32)
    jobs = [SampleJob(snapshot_id="base", prompt=np.concatenate([context, rng.integers(3, VOCAB, 6).astype(np.int32)]),
                      num_samples=1, max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, seed=0, prompt_logprobs=True)
            for _ in range(2)]
    got = engine.sample(jobs)
    assert engine.metrics()["sampling"]["one_pass_requests"] == 2
    assert engine.compile_counts["prefill"] == 0
    assert engine.metrics()["logprobs"]["computed_tokens"] == len(jobs[0].prompt) + 6 + 1
    assert got[1].cached_prompt_tokens == len(context)
    expected = [engine.logprobs([LogprobsRequest("base", j.prompt)])[0] for j in jobs]  # from the cache now
    for result, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(result.prompt_logprobs, want, atol=2e-5)

    def failing(jobs):
        raise RuntimeError("injected one-pass failure")

    engine.decoder._one_pass._forward = failing
    fresh = dataclasses.replace(jobs[0], prompt=rng.integers(3, VOCAB, 20).astype(np.int32))
    (result,) = engine.sample([fresh])
    assert engine.metrics()["sampling"]["one_pass_requests"] == 2  # served by the decode loop
    np.testing.assert_allclose(result.prompt_logprobs,
                               Engine(base_model, EngineConfig(max_rank=8, prefix_cache_mb=0)).logprobs(
                                   [LogprobsRequest("base", fresh.prompt)])[0], atol=2e-5)
    assert len(result.sequences[0].tokens) == 1


def test_one_pass_mixes_cached_and_new_prompts_and_learns_what_it_computes(base_model):
    """One round holding a prompt the cache knows part of and a new one, several samples each: both take
    one pass, and tokens and logprobs are the decode loop's. A prompt the cache holds without its
    logprobs (sampled before) takes the training forward once and teaches the cache, so asking again
    feeds one token. A failing scorer hands its requests to the decode loop."""
    engine = Engine(base_model, EngineConfig(max_rank=8))
    plain = Engine(base_model, EngineConfig(max_rank=8, prefix_cache_mb=0))
    rng = np.random.default_rng(12)

    def computed() -> int:
        return engine.metrics()["logprobs"]["computed_tokens"]

    def one_pass() -> int:
        return engine.metrics()["sampling"]["one_pass_requests"]

    context = rng.integers(3, VOCAB, 24).astype(np.int32)
    job = SampleJob(snapshot_id="base", prompt=context, num_samples=1, max_tokens=1, temperature=1.0, top_p=1.0,
                    top_k=-1, seed=0, prompt_logprobs=True)
    engine.sample([job])  # the context and its logprobs go to the cache
    jobs = [dataclasses.replace(job, prompt=np.concatenate([context, rng.integers(3, VOCAB, 6).astype(np.int32)]),
                                num_samples=3, seed=1),
            dataclasses.replace(job, prompt=rng.integers(3, VOCAB, 17).astype(np.int32), num_samples=2, seed=2)]
    before = computed()
    got = engine.sample(jobs)
    assert computed() - before == 6 + 1 + 17 and one_pass() == 3
    assert engine.compile_counts["prefill"] == 0 and engine.compile_counts["decode"] == 0
    for j, result in zip(jobs, got, strict=True):
        np.testing.assert_allclose(result.prompt_logprobs, plain.logprobs([LogprobsRequest("base", j.prompt)])[0],
                                   atol=2e-5)
        (alone,) = plain.sample([dataclasses.replace(j, prompt_logprobs=False)])
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
        for a, b in zip(result.sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    # sampled before: the cache holds its keys/values but none of its logprobs
    prompt = rng.integers(3, VOCAB, 30).astype(np.int32)
    engine.sample([dataclasses.replace(job, prompt=prompt, max_tokens=4, prompt_logprobs=False)])
    before = computed()
    first = engine.sample([dataclasses.replace(job, prompt=prompt)])[0]
    assert computed() - before == len(prompt)
    second = engine.sample([dataclasses.replace(job, prompt=prompt)])[0]
    assert computed() - before == len(prompt) + 1 and one_pass() == 5
    np.testing.assert_array_equal(second.prompt_logprobs, first.prompt_logprobs)
    assert second.sequences[0].tokens == first.sequences[0].tokens
    np.testing.assert_allclose(second.sequences[0].logprobs, first.sequences[0].logprobs, atol=2e-5)

    def failing(jobs):
        raise RuntimeError("injected scorer failure")

    engine.decoder._one_pass._score = failing
    extended = dataclasses.replace(job, prompt=np.concatenate([context, rng.integers(3, VOCAB, 5).astype(np.int32)]))
    (result,) = engine.sample([extended])
    assert one_pass() == 5 and len(result.sequences[0].tokens) == 1  # served by the decode loop
    np.testing.assert_allclose(result.prompt_logprobs,
                               plain.logprobs([LogprobsRequest("base", extended.prompt)])[0], atol=2e-5)


# ---------------------------------------------------------------------------------- packed training
def assert_same_training(outs: list, states: list) -> None:
    """Two layouts' forward results (losses, logprobs) and adapter states (gradients, weights) agree."""
    for a, b in zip(outs[0], outs[1], strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_packed_rows_and_batched_optim_steps_equal_the_plain_ones(base_model):
    """Short sequences of several adapters packed into shared rows give the same logprobs, losses,
    gradients and (after one batched optim step) weights as one row per sequence."""
    packed = Engine(base_model, EngineConfig(max_rank=8, pack=True))
    plain = Engine(base_model, EngineConfig(max_rank=8, pack=False))
    from framework.validation import datums_to_arrays

    rng = np.random.default_rng(8)
    requests = []
    for i, lengths in enumerate([(5, 9, 3, 12), (7, 6), (30,)]):
        arrays, _ = datums_to_arrays([datum(rng, n) for n in lengths], "cross_entropy", None, vocab_size=VOCAB,
                                     max_seq_len=64)
        requests.append((f"t{i}", arrays))
    outs, states = [], []
    for engine in (packed, plain):
        for name, _ in requests:
            engine.create_adapter(rank=4, seed=7, adapter_id=name)
        outs.append(engine.forward([ForwardRequest(n, a, "cross_entropy") for n, a in requests], backward=True))
        states.append([jax.device_get(engine.adapters[n].grads) for n, _ in requests])
        engine.optim_step([OptimRequest(n, AdamHyperparams.make(1e-2, eps=1.0)) for n, _ in requests])
        states[-1].append([jax.device_get(engine.adapters[n].weights) for n, _ in requests])
    assert packed.metrics()["training"]["packed_batches"] == 1 and plain.metrics()["training"]["packed_batches"] == 0
    assert packed.metrics()["training"]["padding_fraction"] < plain.metrics()["training"]["padding_fraction"]
    assert_same_training(outs, states)
    assert packed.compile_counts["optim_step"] == 1  # the three adapters' steps in one call


MIXED_LENGTHS = [(3,), (4,), (2, 3), (5,), (30,)]
"""Five adapters' datums: one adapter per row takes 5 rows (8 with padding); rows holding several
adapters take 2 (30 | 3 + 4 + 2 + 3 + 5), cheaper even at 8 adapters' LoRA FLOPs per token."""


def mixed_requests(seed: int = 8) -> list[tuple[str, object]]:
    from framework.validation import datums_to_arrays

    rng = np.random.default_rng(seed)
    return [(f"t{i}", datums_to_arrays([datum(rng, n) for n in lengths], "cross_entropy", None, vocab_size=VOCAB,
                                       max_seq_len=64)[0]) for i, lengths in enumerate(MIXED_LENGTHS)]


def test_rows_mixing_adapters_equal_one_adapter_per_row(base_model):
    """Short sequences of several adapters sharing rows (each token keeping its own adapter's LoRA) give
    the same logprobs, losses and gradients as one adapter per row (here: one sequence per row, as
    packing each adapter's own would save no rows)."""
    from framework.engine.packing import layout

    requests = mixed_requests()
    flat = [(g, d) for g, (_, arrays) in enumerate(requests) for d in arrays]
    lay = functools.partial(layout, [g for g, _ in flat], [d for _, d in flat], [{}] * len(flat),
                            ("target_tokens", "weights"), min_bucket=32, pack=True)
    batch = lay(mix_cost=0.25)  # 2 rows at 1 + 8 * 0.25 vs 8 rows at 1.25
    assert batch.mixed and batch.tokens.shape == (2, 32) and batch.groups.shape == (2, 32)
    for (g, _), (r, s, n) in zip(flat, batch.placement, strict=True):
        assert (batch.groups[r, s: s + n] == g).all()
    assert not lay(mix_cost=1.0).mixed and not lay(mix_cost=None).mixed  # 2 * (1 + 8) > 8 * 2
    outs, grads = [], []
    engines = [Engine(base_model, EngineConfig(max_rank=8, pack=True)),
               Engine(base_model, EngineConfig(max_rank=8, pack=True, pack_across_adapters=False))]
    for engine in engines:
        for name, _ in requests:
            engine.create_adapter(rank=4, seed=int(name[1:]), adapter_id=name)
        outs.append(engine.forward([ForwardRequest(n, a, "cross_entropy") for n, a in requests], backward=True))
        grads.append([jax.device_get(engine.adapters[n].grads) for n, _ in requests])
    assert [e.metrics()["training"]["mixed_batches"] for e in engines] == [1, 0]
    assert [e.metrics()["training"]["packed_batches"] for e in engines] == [1, 0]
    assert engines[0].metrics()["training"]["unmixed_reruns"] == 0
    padding = [e.metrics()["training"]["padding_fraction"] for e in engines]
    assert padding[0] < padding[1]
    assert_same_training(outs, grads)


def test_a_diverged_adapter_never_leaks_into_the_rows_it_shares(base_model):
    """An adapter whose weights went non-finite, batched with others into mixed rows: the batch runs again
    with one adapter per row, so the others' losses and gradients are those of a healthy batch."""
    from framework.engine.packing import layout

    requests = mixed_requests()
    mixed = Engine(base_model, EngineConfig(max_rank=8))
    healthy = Engine(base_model, EngineConfig(max_rank=8, pack=False))
    for engine in (mixed, healthy):
        for name, _ in requests:
            engine.create_adapter(rank=4, seed=int(name[1:]), adapter_id=name)
    flat = [(g, d) for g, (_, arrays) in enumerate(requests) for d in arrays]
    placement = layout([g for g, _ in flat], [d for _, d in flat], [{}] * len(flat), ("target_tokens", "weights"),
                       min_bucket=32, pack=True, mix_cost=mixed._lora_cost).placement
    assert placement[1][0] == placement[3][0]  # t1's datum and t2's second share a row
    broken = mixed.adapters["t2"]
    broken.weights = jax.tree.map(lambda w: w * np.float32(np.inf), broken.weights)
    got = mixed.forward([ForwardRequest(n, a, "cross_entropy") for n, a in requests], backward=True)
    want = healthy.forward([ForwardRequest(n, a, "cross_entropy") for n, a in requests], backward=True)
    assert mixed.metrics()["training"]["unmixed_reruns"] == 1
    assert not np.isfinite(got[2].loss)
    # t2 at these weights is remembered: its next batch is laid out unmixed at once (no second rerun)
    mixed.forward([ForwardRequest(n, a, "cross_entropy") for n, a in requests], backward=False)
    assert mixed.metrics()["training"]["unmixed_reruns"] == 1
    assert mixed.metrics()["training"]["mixed_batches"] == 0  # (a rerun counts as the unmixed batch it ran)
    for i, (name, _) in enumerate(requests):
        if name == "t2":
            continue
        assert got[i].loss == pytest.approx(want[i].loss, rel=1e-6)
        for x, y in zip(jax.tree.leaves(jax.device_get(mixed.adapters[name].grads)),
                        jax.tree.leaves(jax.device_get(healthy.adapters[name].grads)), strict=True):
            assert np.isfinite(x).all()
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_metrics_report_the_engine_state(base_model, tmp_path):
    with ServiceClient(home=tmp_path) as service:
        client = service.create_lora_training_client(base_model, rank=4, seed=1)
        train(client, 1, seed=0)
        client.save_weights_and_get_sampling_client().sample(PROMPT, 2, params()).result()
        (metrics,) = service.engine_metrics().values()
    assert metrics["compiles"]["forward_backward"] >= 1 and metrics["compiles"]["decode"] >= 1
    assert metrics["adapters"]["total"] == 1 and metrics["snapshots"]["count"] >= 1
    assert metrics["sampling"]["tokens"] == 24 and metrics["training"]["tokens"] == 40
    assert 0 <= metrics["training"]["padding_fraction"] < 1 and metrics["sampling"]["tokens_per_s"] > 0



# ---------------------------------------------------------------------------------- review regressions
def test_requests_waiting_for_a_sampler_slot_are_served_in_turn(base_model):
    """More snapshots sampling at once than sampler slots: requests wait for a slot, none fails or hangs."""
    engine = Engine(base_model, EngineConfig(max_rank=8, sampler_slots=1, decode_chunk=2))
    snaps = []
    for seed in (1, 2):
        a = engine.create_adapter(rank=4, seed=seed)
        snaps.append(engine.publish(a.adapter_id).snapshot_id)
    rng = np.random.default_rng(0)
    jobs = [SampleJob(snapshot_id=snaps[i % 2], prompt=rng.integers(3, VOCAB, 6).astype(np.int32), num_samples=2,
                      max_tokens=6, temperature=1.0, top_p=1.0, top_k=-1, seed=i) for i in range(4)]
    futures = [engine.submit_sample(job) for job in jobs]
    for _ in range(200):
        if all(f.done() for f in futures):
            break
        engine.step_sampling()
    assert all(f.done() for f in futures)
    assert [len(f.result().sequences) for f in futures] == [2, 2, 2, 2]
    assert engine.decoder.waiting == 0 and not engine.decoder.has_work()


def test_a_failed_admission_fails_its_requests_and_releases_their_snapshots(base_model, monkeypatch):
    engine = Engine(base_model, EngineConfig(max_rank=8))
    snapshot = engine.publish(engine.create_adapter(rank=4, seed=1).adapter_id)
    job = SampleJob(snapshot_id=snapshot.snapshot_id, prompt=np.arange(3, 9, dtype=np.int32), num_samples=2,
                    max_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, seed=0)
    real = engine.decoder._ensure_pool
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("injected: no room for the pool")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.decoder, "_ensure_pool", failing)
    future = engine.submit_sample(job)
    engine.step_sampling()
    with pytest.raises(MemoryError, match="injected"):
        future.result(0)
    assert not engine.decoder.has_work()
    assert engine.snapshots.get(snapshot.snapshot_id).refs == 1  # the request's reference was released
    assert len(engine.sample([job])[0].sequences) == 2  # and the engine serves the next request


def test_a_failed_batch_of_optim_steps_steps_no_adapter_twice(base_model, monkeypatch):
    """A, B, A in one batch: the second compiled call fails once; the scheduler retries each alone and
    every adapter ends with exactly the steps it was asked for."""
    engine = Engine(base_model, EngineConfig(max_rank=8))
    a, b = (engine.create_adapter(rank=4, seed=s).adapter_id for s in (1, 2))
    real = engine._steps.optim
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: the device failed")
        return real(*args)

    monkeypatch.setattr(engine._steps, "optim", flaky)
    scheduler = Scheduler()
    try:
        gate = held_worker(scheduler)
        hp = AdamHyperparams.make(1e-2)
        futures = [scheduler.submit(engine.optim_step, OptimRequest(i, hp), batch_key=("optim",)) for i in (a, b, a)]
        gate.set()
        assert [f.result(60).version for f in futures] == [1, 1, 2]
        assert (engine.adapters[a].step, engine.adapters[b].step) == (2, 1)
        assert (engine.adapters[a].version, engine.adapters[b].version) == (2, 1)
    finally:
        scheduler.shutdown()


def test_top_k_widths_may_differ_between_requests_sharing_steps(base_model):
    engine = Engine(base_model, EngineConfig(max_rank=8, decode_chunk=2))
    rng = np.random.default_rng(1)

    def job(k: int, max_tokens: int) -> SampleJob:
        return SampleJob(snapshot_id="base", prompt=rng.integers(3, VOCAB, 5).astype(np.int32), num_samples=1,
                         max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=-1, seed=k, topk_sample=k)

    first = engine.submit_sample(job(2, 8))
    engine.step_sampling()
    wider, none = engine.submit_sample(job(10, 6)), engine.submit_sample(job(0, 6))  # join mid-decode
    while not all(f.done() for f in (first, wider, none)):
        engine.step_sampling()
    assert first.result().sequences[0].topk.ids.shape == (8, 2)
    assert wider.result().sequences[0].topk.ids.shape == (6, 10)
    assert none.result().sequences[0].topk is None


def test_a_release_from_a_finalizer_never_blocks(base_model):
    """A garbage collector may run a SamplingClient's finalizer on a thread that holds the registry's
    lock: the release must not wait for that lock."""
    engine = Engine(base_model, EngineConfig(max_rank=8))
    snapshot = engine.publish(engine.create_adapter(rank=4, seed=1).adapter_id)
    registry = engine.snapshots
    done = threading.Event()

    def release_under_the_lock() -> None:
        with registry._lock:
            registry.release(snapshot.snapshot_id)  # what a finalizer would do mid-operation
        done.set()

    threading.Thread(target=release_under_the_lock, daemon=True).start()
    assert done.wait(10), "release blocked on the registry's own lock"
    assert snapshot.snapshot_id not in registry


def test_a_checkpoint_read_does_not_hold_up_other_tenants(base_model, tmp_path, monkeypatch):
    """A load reads on the I/O pool; while the read is stuck, another tenant's requests run, and the
    loading tenant's later requests wait for the load."""
    from framework import checkpoints

    with ServiceClient(home=tmp_path) as service:
        loader, other = (service.create_lora_training_client(base_model, rank=4, seed=s) for s in (1, 2))
        train(loader, 1, seed=0)
        path = loader.save_state("one").result().path
        loss_at_one = loader.forward(batch(3), "cross_entropy").result().metrics["loss:sum"]
        train(loader, 2, seed=1)
        real = checkpoints.load_training_state
        reading, release = threading.Event(), threading.Event()

        def slow(*args, **kwargs):
            reading.set()
            release.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(checkpoints, "load_training_state", slow)
        loaded = loader.load_state_with_optimizer(path)
        after_load = loader.forward(batch(3), "cross_entropy")
        assert reading.wait(30)
        assert np.isfinite(train(other, 1, seed=5)).all()  # runs while the read is stuck
        assert not loaded.done() and not after_load.done()
        release.set()
        loaded.result(60)
        assert after_load.result(60).metrics["loss:sum"] == pytest.approx(loss_at_one, rel=1e-6)


def test_remat_and_attention_kernel_settings_keep_the_gradients(base_model):
    """EngineConfig.remat recomputes layers in the backward pass and EngineConfig.attention picks the
    kernel of unpacked rows (here XLA's fused `dot_product_attention`): same losses and gradients."""
    from framework.validation import datums_to_arrays

    rng = np.random.default_rng(3)
    unpacked, _ = datums_to_arrays([datum(rng, 30), datum(rng, 17)], "cross_entropy", None, vocab_size=VOCAB,
                                   max_seq_len=64)
    results = {}
    for name, config in {"default": EngineConfig(max_rank=8, pack=False),
                         "remat_xla": EngineConfig(max_rank=8, pack=False, remat="full", attention="xla")}.items():
        engine = Engine(base_model, config)
        a = engine.create_adapter(rank=8, seed=1)
        (out,) = engine.forward([ForwardRequest(a.adapter_id, unpacked, "cross_entropy")], backward=True)
        results[name] = (out.loss, jax.device_get(a.grads))
        assert engine._steps._remat == config.remat
    assert results["default"][0] == pytest.approx(results["remat_xla"][0], rel=1e-5)
    for g, h in zip(jax.tree.leaves(results["default"][1]), jax.tree.leaves(results["remat_xla"][1]), strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-6)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(results["default"][1]))


def recording_batches(batches: list[list[int]]):
    """A scheduler batch function that echoes its payloads and records each batch it ran."""
    def run(payloads):
        batches.append(list(payloads))
        return list(payloads)

    return run


def test_an_idle_worker_waits_for_the_end_of_a_burst():
    """Requests that keep arriving within the batch window of each other share one batch, even when
    the burst lasts longer than one window; a request after a quiet window starts a new batch."""
    batches: list[list[int]] = []
    run = recording_batches(batches)
    scheduler = Scheduler(batch_window_s=0.1)
    try:
        for i in range(7):  # the tenants are known to the scheduler (as creating their adapters makes them)
            scheduler.call(lambda: None, adapter_id=f"a{i}").result(10)
        time.sleep(0.05)  # the worker is idle
        futures = []
        for i in range(6):  # 6 arrivals 30 ms apart: 150 ms, longer than a window, no gap as long as one
            futures.append(scheduler.submit(run, i, adapter_id=f"a{i}", batch_key="k"))
            time.sleep(0.03)
        assert [f.result(10) for f in futures] == list(range(6))
        time.sleep(0.3)
        assert scheduler.submit(run, 6, adapter_id="a6", batch_key="k").result(10) == 6
        assert batches == [[0, 1, 2, 3, 4, 5], [6]]
    finally:
        scheduler.shutdown()


def test_a_lone_tenant_never_waits_for_a_burst():
    """The batch window is paid only when another adapter is active and there is room in the batch: a
    lone tenant's requests (and a request that fills a batch alone) start at once."""
    run = recording_batches([])
    scheduler = Scheduler(batch_window_s=0.05, max_batch_tokens=100)
    try:
        for i in range(3):
            assert scheduler.submit(run, i, adapter_id="a", batch_key="k", tokens=10).result(10) == i
        assert scheduler.stats()["burst_waits"] == 0
        scheduler.call(lambda: None, adapter_id="b").result(10)  # a second tenant appears
        assert scheduler.submit(run, 3, adapter_id="a", batch_key="k", tokens=100).result(10) == 3  # fills a batch
        assert scheduler.stats()["burst_waits"] == 0
        time.sleep(0.05)  # the worker is idle
        assert scheduler.submit(run, 4, adapter_id="a", batch_key="k", tokens=10).result(10) == 4
        assert scheduler.stats()["burst_waits"] == 1
        scheduler.forget("b")  # released: a lone tenant again
        time.sleep(0.05)
        assert scheduler.submit(run, 5, adapter_id="a", batch_key="k", tokens=10).result(10) == 5
        assert scheduler.stats()["burst_waits"] == 1
    finally:
        scheduler.shutdown()


def test_a_burst_waits_only_for_tenants_that_submit_its_kind_of_request(monkeypatch):
    """A tenant active with other requests (another loss, say) never holds up a batch it cannot join; a
    new tenant, that has shown nothing yet, does, but only while it is new."""
    from framework import scheduler as scheduler_module

    run = recording_batches([])
    scheduler = Scheduler(batch_window_s=0.05)
    try:
        assert scheduler.submit(run, 0, adapter_id="b", batch_key="other").result(10) == 0
        time.sleep(0.05)  # the worker is idle
        assert scheduler.submit(run, 1, adapter_id="a", batch_key="k").result(10) == 1
        assert scheduler.stats()["burst_waits"] == 0
        scheduler.call(lambda: None, adapter_id="c").result(10)  # a new tenant
        time.sleep(0.05)
        assert scheduler.submit(run, 2, adapter_id="a", batch_key="k").result(10) == 2
        assert scheduler.stats()["burst_waits"] == 1
        monkeypatch.setattr(scheduler_module, "ACTIVE_TENANT_S", 0.1)
        time.sleep(0.15)  # c is no longer new, whatever it does next that batches with nothing
        scheduler.call(lambda: None, adapter_id="c").result(10)
        time.sleep(0.05)
        assert scheduler.submit(run, 3, adapter_id="a", batch_key="k").result(10) == 3
        assert scheduler.stats()["burst_waits"] == 1
    finally:
        scheduler.shutdown()


def test_a_burst_ends_once_every_active_tenant_has_a_request_queued():
    """With a window far longer than the test may take, the two active tenants' requests still run at
    once, together: once both are queued there is nobody left to wait for."""
    batches: list[list[int]] = []
    run = recording_batches(batches)
    scheduler = Scheduler(batch_window_s=120.0)
    try:
        for adapter in ("a", "b"):
            scheduler.call(lambda: None, adapter_id=adapter).result(10)
        time.sleep(0.05)  # the worker is idle
        first = scheduler.submit(run, 0, adapter_id="a", batch_key="k")  # wakes it: it waits for b ...
        time.sleep(0.05)
        second = scheduler.submit(run, 1, adapter_id="b", batch_key="k")  # ... who comes
        assert (first.result(60), second.result(60)) == (0, 1)
        assert batches == [[0, 1]] and scheduler.stats()["burst_waits"] == 1
    finally:
        scheduler.shutdown()


def test_a_priority_call_overtakes_other_adapters_but_never_its_own():
    order: list[str] = []
    scheduler = Scheduler()
    try:
        gate = held_worker(scheduler)
        queued = [scheduler.call(lambda n=n: order.append(n), adapter_id=a)
                  for n, a in (("x1", "x"), ("y1", "y"), ("x2", "x"))]
        queued.append(scheduler.call(lambda: order.append("z-publish"), adapter_id="z", priority=True))
        queued.append(scheduler.call(lambda: order.append("y-publish"), adapter_id="y", priority=True))
        gate.set()
        [f.result(10) for f in queued]
        # z has nothing queued: first; y's publish waits for y1 only, not for x2
        assert order == ["z-publish", "x1", "y1", "y-publish", "x2"]
    finally:
        scheduler.shutdown()


def test_try_now_runs_beside_other_adapters_but_never_beside_its_own():
    scheduler = Scheduler()
    try:
        gate = threading.Event()
        blocker = scheduler.call(lambda: gate.wait(30), adapter_id="x")
        while not blocker.running():
            time.sleep(0.001)
        queued = scheduler.call(lambda: "y1", adapter_id="y")
        assert scheduler.try_now(lambda: "z-now", adapter_id="z") == (True, "z-now")  # beside x's request
        assert scheduler.try_now(lambda: "x-now", adapter_id="x") == (False, None)  # x is running
        assert scheduler.try_now(lambda: "y-now", adapter_id="y") == (False, None)  # y has a queued request
        gate.set()
        assert (blocker.result(10), queued.result(10)) == (True, "y1")
        while scheduler.try_now(lambda: "x-now", adapter_id="x") != (True, "x-now"):  # once the batch is done
            time.sleep(0.001)
    finally:
        scheduler.shutdown()


def test_publishing_runs_beside_other_tenants_work(base_model):
    """A tenant with nothing queued publishes at once, while the worker is busy with another tenant, and
    samples the weights it trained; a paged-out tenant publishes through the worker (which pages it in)."""
    config = EngineConfig(max_adapters=1)
    with ServiceClient(engine_config=config) as service:
        first = service.create_lora_training_client(base_model, rank=4, seed=1)
        train(first, 1, seed=0)
        second = service.create_lora_training_client(base_model, rank=4, seed=2)  # pages `first` out
        train(second, 1, seed=5)
        expected = weights_of(second)
        gate = threading.Event()
        blocker = second._scheduler.call(lambda: gate.wait(60))  # the worker is busy with someone else
        while not blocker.running():
            time.sleep(0.001)
        try:
            published = second.save_weights_and_get_sampling_client()  # would hang here if it queued
            assert published.version == 1
            snapshot = second._engine.snapshots.get(published.snapshot_id)
            assert_trees_equal(jax.device_get(snapshot.weights), expected)
            assert not blocker.done()
            late = threading.Thread(target=lambda: results.append(first.save_weights_and_get_sampling_client()))
            results: list = []
            late.start()  # paged out: it waits for the worker
            late.join(0.5)
            assert late.is_alive()
        finally:
            gate.set()
        late.join(60)
        assert results[0].version == 1
        assert_trees_equal(jax.device_get(first._engine.snapshots.get(results[0].snapshot_id).weights),
                           weights_of(first))
        assert published.sample(PROMPT, 1, params()).result().sequences[0].weights_version == 1


def test_long_rows_bucket_to_three_quarter_steps():
    """Rows past 256 tokens take the smaller of the next power of two and its three quarters: less than a
    third padding (not up to half), still multiples of 128; short rows keep powers of two (and the minimum)."""
    from framework.engine.packing import layout
    from framework.engine.requests import DatumArrays
    from framework.engine.shapes import length_bucket

    assert [length_bucket(n, 32) for n in (1, 33, 200, 257, 384, 385, 513, 769, 1025)] == \
        [32, 64, 256, 384, 384, 512, 768, 1024, 1536]
    for n in range(1, 5000, 7):
        t = length_bucket(n, 32)
        assert t >= n
        if t > 256:
            assert t % 128 == 0 and (t - n) / t < 1 / 3, (n, t)
    ids = np.arange(281, dtype=np.int32) % VOCAB
    datums = [DatumArrays(ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(280, np.float32)})] * 2
    batch = layout([0, 1], datums, [{}, {}], ("target_tokens", "weights"), min_bucket=32, pack=True)
    assert batch.tokens.shape == (2, 384)
