"""Multi-host: two processes on 127.0.0.1 (CPU, gloo), one global (fsdp=2, tp=2) mesh, one LoRA training
step equal to the single-process result; and how `framework.distributed` reads its settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import mesh_steps as ms
import numpy as np
import pytest
from flax import nnx

from framework.distributed import DistributedConfig, initialize_kwargs
from framework.optim import AdamHyperparams, init_opt_state
from models import load_checkpoint

TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tiny_checkpoint, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("multihost") / "result.npz"
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    address = f"127.0.0.1:{free_port()}"
    checkpoint = str(tiny_checkpoint("qwen3"))
    procs = [subprocess.Popen([sys.executable, str(tests / "multihost_worker.py"), str(out), checkpoint, str(i), "2",
                               address], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def single_process(tiny_checkpoint) -> dict[str, np.ndarray]:
    model = load_checkpoint(tiny_checkpoint("qwen3"))
    graphdef, base = nnx.split(model)
    steps = ms.Steps(graphdef, model.config, None)
    bank, batch = ms.random_bank(model.config), ms.make_batch(model.config)
    grads = jax.tree.map(np.zeros_like, bank.weights)
    grads, loss, logprobs = steps.train_step(base, bank, grads, batch)
    grads_host = jax.tree.map(np.asarray, grads)
    one = jax.tree.map(lambda w: w[:, 1], bank.weights)
    weights, _, opt_state = steps.optim_step(jax.tree.map(jnp.asarray, bank.weights), grads, init_opt_state(one), 1,
                                             AdamHyperparams.make(1e-2, weight_decay=0.1, grad_clip_norm=1.0))
    out = {"loss": loss, "logprobs": logprobs}
    for name, tree in (("grads", grads_host), ("weights", weights), ("mu", opt_state.inner_state[0].mu)):
        out.update({f"{name}/{t}/{k}": w for t, ab in tree.items() for k, w in ab.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def test_two_process_training_step_equals_one_process(two_processes, single_process):
    assert int(two_processes["processes"]) == 2 and int(two_processes["devices"]) == 4
    for key, ref in single_process.items():
        got = two_processes[key]
        assert got.shape == ref.shape, key
        scale = max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(got - ref).max()) <= TOL * scale, key
    assert np.abs(single_process["grads/q/b"]).max() > 0  # the comparison is not of zeros


def test_settings_from_config_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert initialize_kwargs(DistributedConfig(enabled=True), env) == {
        "initialization_timeout": 300, "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    config = DistributedConfig(enabled=True, coordinator_address="h:1", num_processes=2, process_id=0)
    assert initialize_kwargs(config, env)["coordinator_address"] == "h:1"
    assert initialize_kwargs(config, env)["process_id"] == 0
    assert initialize_kwargs(DistributedConfig(enabled=True), {}) == {"initialization_timeout": 300}  # auto-detect


@pytest.mark.parametrize(("config", "env", "message"), [
    (DistributedConfig(num_processes=2), {}, "num_processes and process_id go together"),
    (DistributedConfig(num_processes=2, process_id=2), {"JAX_COORDINATOR_ADDRESS": "h:1"}, r"process_id must be in"),
    (DistributedConfig(num_processes=2, process_id=1), {}, "needs coordinator_address"),
    (DistributedConfig(), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "is not an integer"),
])
def test_bad_settings_are_named(config, env, message):
    with pytest.raises(ValueError, match=message):
        initialize_kwargs(config, env)
