"""The parts of the client API a server needs beyond the SDK's: loading a base model up front,
validating a request without queueing it, releasing a training client's adapter, and counters.

One small engine (tiny qwen3, 2 adapter slots) for the module; every request uses one shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from framework import ServiceClient, types
from framework.engine import EngineConfig

VOCAB = 301


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("qwen3"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    config = EngineConfig(max_adapters=2, max_rank=4, sampler_slots=2, max_seq_len=64)
    with ServiceClient(engine_config=config, home=tmp_path_factory.mktemp("home")) as service:
        yield service


def datum(n: int = 6, token: int = 5) -> types.Datum:
    tokens = (np.arange(n) * 7 + token) % VOCAB
    return types.Datum(model_input=types.ModelInput.from_ints(tokens.tolist()),
                       loss_fn_inputs={"target_tokens": np.roll(tokens, -1), "weights": np.ones(n, np.float32)})


def test_load_base_model_describes_it(service, base_model):
    model = service.load_base_model(base_model)
    assert model.model_name.endswith("qwen3") and model.max_context_length == 64
    assert model.trainable and model.sampleable
    info = service.model_info(base_model)
    assert info.arch == "qwen3" and info.tokenizer_id == base_model
    with pytest.raises(Exception, match=r"config\.json|not"):
        service.load_base_model(base_model + "-missing")


def test_check_forward_inputs_refuses_without_queueing(service, base_model):
    client = service.create_lora_training_client(base_model, rank=2, seed=0)
    try:
        before = service.metrics()
        client.check_forward_inputs([datum()], "cross_entropy")  # fine: no error, nothing queued
        bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, VOCAB + 3]),
                          loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]})
        with pytest.raises(ValueError, match=r"data\[0\].model_input\[2\] = 304 is outside the vocabulary"):
            client.check_forward_inputs([bad], "cross_entropy")
        with pytest.raises(ValueError, match="advantages"):
            client.check_forward_inputs([datum()], "importance_sampling")
        with pytest.raises(ValueError, match="unknown loss_fn 'stable_reinforce'"):
            client.check_forward_inputs([datum()], "stable_reinforce")
        after = service.metrics()
        key = next(iter(after))
        assert after[key]["batches_run"] == before[key]["batches_run"]
    finally:
        client.release().result()


def test_release_frees_the_adapter_and_keeps_snapshots(service, base_model):
    first = service.create_lora_training_client(base_model, rank=2, seed=1)
    second = service.create_lora_training_client(base_model, rank=2, seed=2)
    first.forward_backward([datum()], "cross_entropy")
    first.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = first.save_weights_and_get_sampling_client()
    key = str(next(iter(service.metrics())))
    adapters = service.metrics()[key]["adapters"]

    first.release().result()
    first.release()  # idempotent
    assert service.metrics()[key]["adapters"] == adapters - 1
    assert service.metrics()[key]["compiles/forward_backward"] >= 1
    with pytest.raises(ValueError, match="was released"):
        first.forward_backward([datum()], "cross_entropy")
    with pytest.raises(ValueError, match="was released"):
        first.optim_step(types.AdamParams())
    params = types.SamplingParams(max_tokens=3, seed=0, temperature=1.0)
    out = sampler.sample(types.ModelInput.from_ints([1, 5, 9]), 1, params).result()
    assert len(out.sequences[0].tokens) >= 1 and out.sequences[0].weights_version == 1

    second.release().result()
    assert service.metrics()[key]["adapters"] == adapters - 2
