"""The official `tinker` SDK (0.38), unchanged, against our server: the whole training and sampling
path, with results equal to the in-process client's on the same seed and data.

One server for the test session (`service_server`: the embedded tiny model); one in-process
`framework.ServiceClient` with the same engine settings as the reference. Requests keep to a few
shapes (1-2 datums of ≤ 32 tokens, 4-token prompts) so each side compiles little.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import time

import httpx
import numpy as np
import pytest
import tinker
from service_utils import EMBEDDED, share_compilation_cache
from tinker import types as sdk_types
from tinker.proto.request_conv import forward_backward_request_to_proto

from framework import ServiceClient, types
from framework.engine import EngineConfig

BASE = str(EMBEDDED)
RANK, SEED = 4, 7
ADAM = dict(learning_rate=2e-2, beta1=0.9, beta2=0.95, eps=1e-8)
TOL = dict(rtol=2e-5, atol=2e-5)
PROMPT = [1, 40, 41, 42]


def batch(n: int = 2, offset: int = 0) -> list[tuple[list[int], list[int], list[float]]]:
    rng = np.random.default_rng(offset)
    rows = []
    for i in range(n):
        tokens = rng.integers(3, 250, size=12 + 5 * i).tolist()
        rows.append((tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1)))
    return rows


def sdk_datums(rows):
    return [sdk_types.Datum(model_input=sdk_types.ModelInput.from_ints(x),
                            loss_fn_inputs={"target_tokens": np.asarray(y, np.int64),
                                            "weights": np.asarray(w, np.float32)}) for x, y, w in rows]


def our_datums(rows):
    return [types.Datum(model_input=types.ModelInput.from_ints(x),
                        loss_fn_inputs={"target_tokens": np.asarray(y, np.int64), "weights": np.asarray(w, np.float32)})
            for x, y, w in rows]


def logprobs(out) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy(), np.float32).ravel() for o in out.loss_fn_outputs]


@pytest.fixture(scope="module")
def key(service_server) -> str:
    return service_server.key("sdk-user")


@pytest.fixture(scope="module")
def sdk(service_server, key):
    client = tinker.ServiceClient(base_url=service_server.url, api_key=key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def rest(service_server, key):
    return tinker.RestClient(base_url=service_server.url, api_key=key)


@pytest.fixture(scope="module")
def local(tmp_path_factory, service_server):
    """The in-process reference: the server's engine settings (so the same programs, which it takes
    from the server's compilation cache rather than compiling them again)."""
    restore = share_compilation_cache(service_server.xla_cache)
    config = EngineConfig(max_adapters=20, max_rank=8, sampler_slots=8, max_seq_len=128, dtype="float32")
    with ServiceClient(engine_config=config, home=tmp_path_factory.mktemp("local")) as service:
        yield service
    restore()


@pytest.fixture(scope="module")
def trained(sdk, local):
    """The same 3 steps through the SDK and in-process; returns both clients and their per-step outputs."""
    remote = sdk.create_lora_training_client(base_model=BASE, rank=RANK, seed=SEED).result()
    mine = local.create_lora_training_client(BASE, rank=RANK, seed=SEED)
    remote_out, mine_out = [], []
    for step in range(3):
        rows = batch(2, offset=step)
        fb = remote.forward_backward(sdk_datums(rows), "cross_entropy")
        opt = remote.optim_step(sdk_types.AdamParams(**ADAM))
        remote_out.append((fb.result(), opt.result()))
        fb_local = mine.forward_backward(our_datums(rows), "cross_entropy")
        opt_local = mine.optim_step(types.AdamParams(**ADAM))
        mine_out.append((fb_local.result(), opt_local.result()))
    return remote, mine, remote_out, mine_out


def test_training_equals_in_process(trained):
    remote, _, remote_out, mine_out = trained
    info = remote.get_info()
    assert info.model_id.endswith(":train:0") and info.lora_rank == RANK and info.model_data.model_name == BASE
    assert info.model_data.tokenizer_id == BASE and info.model_data.arch == "qwen3"
    losses = [fb.metrics["loss:sum"] for fb, _ in remote_out]
    assert losses[-1] < losses[0]
    for (fb, opt), (fb_l, opt_l) in zip(remote_out, mine_out, strict=True):
        assert set(fb.metrics) == {"loss:sum"}
        np.testing.assert_allclose(fb.metrics["loss:sum"], fb_l.metrics["loss:sum"], **TOL)
        for a, b in zip(logprobs(fb), logprobs(fb_l), strict=True):
            np.testing.assert_allclose(a, b, **TOL)
        assert opt.metrics.keys() == opt_l.metrics.keys()
        for k in opt.metrics:
            np.testing.assert_allclose(opt.metrics[k], opt_l.metrics[k], rtol=1e-4)


def test_forward_only_matches_and_does_not_train(trained):
    remote, mine, _, _ = trained
    rows = batch(1, offset=10)
    first = remote.forward(sdk_datums(rows), "cross_entropy").result()
    again = remote.forward(sdk_datums(rows), "cross_entropy").result()
    local = mine.forward(our_datums(rows), "cross_entropy").result()
    np.testing.assert_array_equal(logprobs(first)[0], logprobs(again)[0])
    np.testing.assert_allclose(logprobs(first)[0], logprobs(local)[0], **TOL)


def test_sampling_equals_in_process(trained, sdk):
    remote, mine, _, _ = trained
    sampler = remote.save_weights_and_get_sampling_client().result()
    local_sampler = mine.save_weights_and_get_sampling_client()
    params = dict(max_tokens=6, seed=123, temperature=1.0)
    out = sampler.sample(sdk_types.ModelInput.from_ints(PROMPT), 3, sdk_types.SamplingParams(**params)).result()
    ref = local_sampler.sample(types.ModelInput.from_ints(PROMPT), 3, types.SamplingParams(**params)).result()
    assert [s.tokens for s in out.sequences] == [s.tokens for s in ref.sequences]
    assert len({tuple(s.tokens) for s in out.sequences}) > 1  # the draws of one request differ
    for s, r in zip(out.sequences, ref.sequences, strict=True):
        np.testing.assert_allclose(s.logprobs, r.logprobs, **TOL)
        assert s.stop_reason == r.stop_reason
    assert len({s.sequence_id for s in out.sequences}) == 3
    # prompt logprobs (compute_logprobs) equal the in-process ones; the first entry is None
    lp = sampler.compute_logprobs(sdk_types.ModelInput.from_ints(PROMPT)).result()
    ref_lp = local_sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
    assert lp[0] is None and ref_lp[0] is None
    np.testing.assert_allclose(lp[1:], ref_lp[1:], **TOL)
    # string stop sequences and top-k logprobs
    stopped = sampler.sample(sdk_types.ModelInput.from_ints(PROMPT), 1, sdk_types.SamplingParams(
        max_tokens=8, seed=5, stop=["\n\nUser:"]), topk_sample_logprobs=3).result()
    seq = stopped.sequences[0]
    assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens)
    assert all(len(row) == 3 for row in seq.topk_logprobs)


def test_checkpoints_save_load_and_list(trained, sdk, rest, local, tmp_path):
    remote, mine, _, _ = trained
    saved = remote.save_state("after3").result().path
    assert saved == f"tinker://{remote.model_id}/weights/after3"
    local_saved = mine.save_state("after3").result().path
    sampler_path = remote.save_weights_for_sampler("s3").result().path
    assert sampler_path == f"tinker://{remote.model_id}/sampler_weights/s3"

    # sampling from saved sampler weights equals sampling from the live snapshot
    from_path = sdk.create_sampling_client(model_path=sampler_path).result()
    snapshot = remote.save_weights_and_get_sampling_client().result()
    params = sdk_types.SamplingParams(max_tokens=5, seed=9)
    a = from_path.sample(sdk_types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0].tokens
    b = snapshot.sample(sdk_types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0].tokens
    assert a == b

    # loading the state with its optimizer continues exactly like the in-process client does
    resumed = sdk.create_training_client_from_state_with_optimizer(saved).result()
    local_resumed = local.create_training_client_from_state_with_optimizer(local_saved)
    assert resumed.model_id != remote.model_id and resumed.get_info().lora_rank == RANK
    for step in range(2):
        rows = batch(2, offset=20 + step)
        fb = resumed.forward_backward(sdk_datums(rows), "cross_entropy")
        resumed.optim_step(sdk_types.AdamParams(**ADAM)).result()
        fb_l = local_resumed.forward_backward(our_datums(rows), "cross_entropy")
        local_resumed.optim_step(types.AdamParams(**ADAM)).result()
        np.testing.assert_allclose(fb.result().metrics["loss:sum"], fb_l.result().metrics["loss:sum"], **TOL)

    # weights only: the optimizer starts fresh, so the first update differs from the resumed one
    fresh = sdk.create_training_client_from_state(saved).result()
    rows = batch(1, offset=30)
    before = fresh.forward(sdk_datums(rows), "cross_entropy").result()
    ref = remote.forward(sdk_datums(rows), "cross_entropy").result()
    np.testing.assert_allclose(logprobs(before)[0], logprobs(ref)[0], **TOL)

    listed = rest.list_checkpoints(remote.model_id).result().checkpoints
    assert {c.checkpoint_id for c in listed} == {"weights/after3", "sampler_weights/s3"}
    assert all(c.size_bytes and c.size_bytes > 0 for c in listed)
    run = rest.get_training_run_by_tinker_path(saved).result()
    assert run.training_run_id == remote.model_id and run.model_owner == "sdk-user"
    assert run.last_checkpoint.tinker_path == saved and run.last_sampler_checkpoint.tinker_path == sampler_path
    info = rest.get_weights_info_by_tinker_path(saved).result()
    assert info.base_model == BASE and info.lora_rank == RANK and info.train_mlp
    mine_all = rest.list_user_checkpoints().result()
    assert {saved, sampler_path} <= {c.tinker_path for c in mine_all.checkpoints}
    runs = rest.list_training_runs().result()
    assert remote.model_id in {r.training_run_id for r in runs.training_runs}

    # overwrite is refused unless asked for; delete removes the record
    with pytest.raises(Exception, match="already exists"):
        remote.save_state("after3").result()
    remote.save_state("after3", overwrite=True).result()
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    assert {c.checkpoint_id for c in rest.list_checkpoints(remote.model_id).result().checkpoints} == {
        "weights/after3"}


def test_ordering_by_seq_id(service_server, key, sdk):
    """Requests that arrive out of order run in seq_id order; an exact retry gets the same future."""
    client = sdk.create_lora_training_client(base_model=BASE, rank=2, seed=1).result()
    rows = batch(1, offset=40)
    proto = forward_backward_request_to_proto(sdk_types.ForwardBackwardRequest(
        forward_backward_input=sdk_types.ForwardBackwardInput(data=sdk_datums(rows), loss_fn="cross_entropy"),
        model_id=client.model_id, seq_id=1)).SerializeToString()
    headers = {"X-API-Key": key}
    optim = {"model_id": client.model_id, "seq_id": 2, "type": "optim_step",
             "adam_params": {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                             "weight_decay": 0.0, "grad_clip_norm": 0.0}}
    with httpx.Client(base_url=service_server.url, headers=headers, timeout=60) as http:
        first = http.post("/api/v1/optim_step", json=optim).json()  # seq 2 before seq 1
        retry = http.post("/api/v1/optim_step", json=optim).json()
        assert retry["request_id"] == first["request_id"]
        fb = http.post("/api/v1/forward_backward", content=proto,
                       headers={"Content-Type": "application/x-protobuf"}).json()
        result = http.post("/api/v1/retrieve_future", json={"request_id": first["request_id"]}).json()
        assert result["metrics"]["grad_norm:mean"] > 0  # the gradient of seq 1 was there
        out = http.post("/api/v1/retrieve_future", json={"request_id": fb["request_id"]},
                        headers={"Accept": "application/x-protobuf"})
        assert out.headers["content-type"] == "application/x-protobuf"
        stale = http.post("/api/v1/optim_step", json={**optim, "seq_id": 1, "adam_params": {}})
        assert stale.status_code == 400 and "seq_id" in stale.json()["detail"]


def test_refusals_name_the_problem(service_server, key, sdk, trained):
    remote = trained[0]
    with pytest.raises(Exception, match=r"stable_reinforce.*not implemented.*cross_entropy"):
        remote.forward_backward(sdk_datums(batch(1)), "stable_reinforce").result()
    with pytest.raises(tinker.BadRequestError, match=r"base_model.*not served"):
        sdk.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="max_rank"):
        sdk.create_lora_training_client(base_model=BASE, rank=64).result()
    old = service_server.post("/api/v1/client/config", key, json={"sdk_version": "0.37.2"})
    assert old.status_code == 400
    assert "0.37.2" in old.json()["detail"] and "0.38" in old.json()["detail"]
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=service_server.url, api_key="tml-not-a-key").create_lora_training_client(
            base_model=BASE, rank=2).result()


def test_futures_long_poll_batch_and_cancel(service_server, key, trained):
    remote = trained[0]
    sampler = remote.save_weights_and_get_sampling_client().result()
    sid = sampler._sampling_session_id
    body = {"sampling_session_id": sid, "seq_id": 5, "num_samples": 2, "type": "sample",
            "prompt": {"chunks": [{"tokens": PROMPT, "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 3, "seed": 1}}
    with httpx.Client(base_url=service_server.url, headers={"X-API-Key": key}, timeout=60) as http:
        queued = http.post("/api/v1/asample", json=body).json()
        assert len(queued["sample_sequence_ids"]) == 2
        polled = http.post("/api/v1/retrieve_futures", json={
            "target": {"type": "sampling_session", "sampling_session_id": sid}, "prev_cursor": 0, "timeout": 20})
        completions = polled.json()["completions"]
        assert any(c["request_id"] == queued["request_id"] and c["state"] == "finished" for c in completions)
        acked = http.post("/api/v1/retrieve_futures", json={
            "target": {"type": "sampling_session", "sampling_session_id": sid},
            "prev_cursor": polled.json()["cursor"], "timeout": 0}).json()
        assert acked["completions"] == []
        as_json = http.post("/api/v1/retrieve_future", json={"request_id": queued["request_id"]}).json()
        assert len(as_json["sequences"]) == 2
        cancel = http.post("/api/v1/cancel_future", json={"request_id": queued["request_id"]}).json()
        assert cancel["cancelled"] is False and cancel["status"] == "done"


def test_metrics_and_auth(service_server, key, trained):
    text = service_server.get("/api/v1/metrics").text
    assert 'tinker_http_requests_total{method="POST",route="/api/v1/forward_backward",status="200"}' in text
    assert "tinker_future_seconds_bucket" in text and "tinker_engine_compiles_forward_backward" in text
    assert service_server.post("/api/v1/get_info", json={"model_id": trained[0].model_id}).status_code == 401
    other = service_server.key("someone-else")
    stranger = service_server.post("/api/v1/get_info", other, json={"model_id": trained[0].model_id})
    assert stranger.status_code == 404


def test_concurrent_pipelined_requests_resolve(trained):
    """Many futures in flight at once from one client (the cookbook's pattern) all resolve."""
    remote = trained[0]
    sampler = remote.save_weights_and_get_sampling_client().result()
    params = sdk_types.SamplingParams(max_tokens=3, seed=3)
    futures = [sampler.sample(sdk_types.ModelInput.from_ints(PROMPT), 1, params) for _ in range(12)]
    results = [f.result() for f in concurrent.futures.as_completed([f.future() for f in futures])]
    assert len(results) == 12 and all(len(r.sequences) == 1 for r in results)
    assert len({tuple(r.sequences[0].tokens) for r in results}) == 1  # same seed, same sample


def test_published_checkpoints_are_readable_by_others_only(service_server, trained, rest):
    """Another key sees none of this user's checkpoints until one is published; then it may read and
    load that one (not delete it), and unpublishing hides it again."""
    remote = trained[0]
    path = remote.save_state("shared").result().path
    other_key = service_server.key("reader")
    other_rest = tinker.RestClient(base_url=service_server.url, api_key=other_key)
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_weights_info_by_tinker_path(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    assert other_rest.get_weights_info_by_tinker_path(path).result().lora_rank == RANK
    assert other_rest.get_training_run_by_tinker_path(path, access_scope="accessible").result().model_owner == \
        "sdk-user"
    other = tinker.ServiceClient(base_url=service_server.url, api_key=other_key)
    copy = other.create_training_client_from_state(path).result()
    rows = batch(1, offset=50)
    mine = remote.forward(sdk_datums(rows), "cross_entropy").result()
    theirs = copy.forward(sdk_datums(rows), "cross_entropy").result()
    np.testing.assert_allclose(logprobs(theirs)[0], logprobs(mine)[0], **TOL)
    with pytest.raises(tinker.NotFoundError):
        other_rest.delete_checkpoint_from_tinker_path(path).result()
    assert path in {c.tinker_path for c in rest.list_checkpoints(remote.model_id).result().checkpoints}
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_weights_info_by_tinker_path(path).result()
    other.close("success").result()


def test_a_silent_session_expires(service_server):
    """A session whose heartbeats stopped (its client died) is finished by the server's housekeeping:
    its adapter is freed, later requests on its model are refused, its heartbeat gets 410, and its
    checkpoints stay. (Raw HTTP: an SDK client would keep heartbeating.)"""
    from service import store as st

    key = service_server.key("silent")
    with httpx.Client(base_url=service_server.url, headers={"X-API-Key": key}, timeout=60) as http:
        def result(response: httpx.Response) -> dict:
            return http.post("/api/v1/retrieve_future", json={"request_id": response.json()["request_id"]}).json()

        session_id = http.post("/api/v1/create_session", json={"sdk_version": "0.38.0", "tags": []}).json()[
            "session_id"]
        model_id = result(http.post("/api/v1/create_model", json={
            "session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}))["model_id"]
        saved = result(http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "kept", "seq_id": 1}))[
            "path"]
        store = st.Store(service_server.db_url)
        store.update(st.SessionRow, session_id, last_heartbeat_at=st.utcnow() - datetime.timedelta(days=1))
        deadline = time.monotonic() + 120  # housekeeping runs every second: this only bounds a hang
        while store.get(st.ModelRow, model_id).released_at is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the session is marked finished first, then its models are released
        assert store.get(st.SessionRow, session_id).finish_reason == "expired"
        assert store.get(st.ModelRow, model_id).released_at is not None
        store.close()
        assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410
        refused = result(http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2}))
        assert "released" in refused["error"]
        info = http.post("/api/v1/weights_info", json={"tinker_path": saved}).json()
        assert info["lora_rank"] == 2


def test_in_memory_samplers_are_bounded_per_model(service_server, sdk):
    """An RL loop publishes a sampler every step and never says when it drops the old one: the server
    keeps each model's 8 most recent in-memory samplers (`--snapshots-per-model`), frees the older
    snapshots, and answers a request to a freed one with a 400 that says why."""
    def snapshots() -> float:
        text = service_server.get("/api/v1/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("tinker_engine_snapshots{"))
        return float(line.rsplit(" ", 1)[1])

    trainer = sdk.create_lora_training_client(base_model=BASE, rank=RANK, seed=3).result()
    before = snapshots()
    samplers = []
    for _ in range(11):
        trainer.forward_backward(sdk_datums(batch(1)), "cross_entropy")
        trainer.optim_step(sdk_types.AdamParams(**ADAM)).result()
        samplers.append(trainer.save_weights_and_get_sampling_client().result())
    params = sdk_types.SamplingParams(max_tokens=2, seed=0)
    newest = samplers[-1].sample(sdk_types.ModelInput.from_ints(PROMPT), 1, params).result()
    assert len(newest.sequences) == 1
    assert snapshots() - before <= 8
    with pytest.raises(tinker.BadRequestError, match="newer ones"):
        samplers[0].sample(sdk_types.ModelInput.from_ints(PROMPT), 1, params).result()
