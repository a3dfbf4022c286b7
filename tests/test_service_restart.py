"""Restart recovery: `kill -9` the server mid-training, start it again on the same database and
checkpoint directory, and everything acknowledged is still there.

- training resumed from the last checkpoint (weights + optimizer state) gives the losses of an
  uninterrupted run, step for step;
- checkpoints are listed and loadable, sampler weights sample as before;
- the killed session's model comes back (restored from its last checkpoint on first use);
- a request that was in flight reports a clear failure instead of hanging.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from service_utils import EMBEDDED, Server
from tinker import types

BASE = str(EMBEDDED)
ADAM = types.AdamParams(learning_rate=2e-2, eps=1e-8)
PROMPT = types.ModelInput.from_ints([1, 40, 41, 42])


def data(step: int) -> list[types.Datum]:
    tokens = np.random.default_rng(100 + step).integers(3, 250, size=17)
    return [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                                        "weights": np.ones(16, np.float32)})]


def train(client, steps) -> list[float]:
    losses = []
    for step in steps:
        fb = client.forward_backward(data(step), "cross_entropy")
        client.optim_step(ADAM).result()
        losses.append(fb.result().metrics["loss:sum"])
    return losses


@pytest.fixture
def server(tmp_path, request):
    cache = getattr(request.config, "cache", None)
    xla = Path(cache.mkdir("service_xla_cache")) if cache is not None else None
    server = Server(tmp_path, [BASE], xla_cache=xla).start()
    yield server
    server.stop()


def test_kill_9_then_restart_resumes_exactly(server):
    key = server.key("restart-user")
    sdk = tinker.ServiceClient(base_url=server.url, api_key=key)
    rest = tinker.RestClient(base_url=server.url, api_key=key)

    uninterrupted = sdk.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    reference = train(uninterrupted, range(5))

    run = sdk.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    assert train(run, range(2)) == pytest.approx(reference[:2], rel=1e-6)
    saved = run.save_state("step2").result().path
    sampler_path = run.save_weights_for_sampler("step2").result().path
    before = run.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, seed=11)
    tokens_before = before.sample(PROMPT, 1, params).result().sequences[0].tokens
    train(run, [2])  # a step after the last checkpoint: lost with the server

    # a request held in flight: seq_id 5 of a fresh model waits for 1..4, which never come
    held_model = sdk.create_lora_training_client(base_model=BASE, rank=2, seed=0).result()
    held = httpx.post(f"{server.url}/api/v1/optim_step", headers={"X-API-Key": key}, timeout=30, json={
        "model_id": held_model.model_id, "seq_id": 5, "adam_params": {"learning_rate": 0.1}}).json()

    server.kill()  # SIGKILL: no shutdown code runs
    server.start()

    # the in-flight request failed, saying why
    failure = httpx.post(f"{server.url}/api/v1/retrieve_future", headers={"X-API-Key": key}, timeout=60,
                         json={"request_id": held["request_id"]}).json()
    assert failure["category"] == "server" and "restarted" in failure["error"]

    # every acknowledged checkpoint is listed and loadable
    listed = {c.tinker_path for c in rest.list_checkpoints(run.model_id).result().checkpoints}
    assert listed == {saved, sampler_path}
    fresh = tinker.ServiceClient(base_url=server.url, api_key=key)
    resumed = fresh.create_training_client_from_state_with_optimizer(saved).result()
    assert train(resumed, range(2, 5)) == pytest.approx(reference[2:], rel=1e-6, abs=1e-6)

    sampler = fresh.create_sampling_client(model_path=sampler_path).result()
    assert sampler.sample(PROMPT, 1, params).result().sequences[0].tokens == tokens_before

    # the killed session's model comes back from its last checkpoint on first use (its step after
    # the checkpoint was lost with the server); the old SDK client keeps working against it
    again = run.forward(data(2), "cross_entropy").result().metrics["loss:sum"]
    assert again == pytest.approx(reference[2], rel=1e-6)
    runs = {r.training_run_id for r in rest.list_training_runs(limit=50).result().training_runs}
    assert {uninterrupted.model_id, run.model_id, resumed.model_id} <= runs

    # an in-memory sampler did not survive: a clear error, not a hang
    with pytest.raises(tinker.BadRequestError, match="in-memory snapshot"):
        before.sample(PROMPT, 1, params).result()
    fresh.close("success").result()
    sdk.close("success").result()
