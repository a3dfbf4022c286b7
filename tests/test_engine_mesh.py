"""The engine runs unchanged on a device mesh: on 8 fake CPU devices its training, forward, paging and
sampling results equal the single-device engine's, a repeat compiles nothing, and its state lives
where the sharding rules put it.

`engine_mesh_worker.py` runs once, in a subprocess (8 devices must be set before jax starts), over a
random checkpoint whose every dimension divides every mesh axis. The pure steps' equality on every
(fsdp, tp) mesh is `test_sharding_mesh.py`'s; this file checks the engine's wiring of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flax import nnx

from models import ModelConfig, Transformer
from models.saving import save_checkpoint

MESHES = ("default", "fsdp2_tp4", "data2_fsdp2_tp2")  # engine_mesh_worker.MESHES (importing it would set
# the worker's 8-device XLA_FLAGS in this process)
TOL = 1e-5  # fp32, relative to max(1, the reference's largest magnitude)
DIVISIBLE = ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=4, head_dim=8, qk_norm=True, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("engine_mesh")
    checkpoint = save_checkpoint(Transformer(DIVISIBLE, rngs=nnx.Rngs(7)), root / "model")
    out = root / "report.json"
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(tests / "engine_mesh_worker.py"), str(out), str(checkpoint)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert tuple(report["meshes"]) == MESHES
    return report


@pytest.mark.parametrize("mesh", MESHES)
def test_engine_on_a_mesh_equals_one_device(report, mesh):
    row = report["meshes"][mesh]
    assert set(row["diffs"]) >= {"fb0_logprobs", "fb0_loss", "mixed0_logprobs", "grads0", "weights0", "fb1_loss",
                                 "grads1", "weights1", "forward_logprobs", "sample_logprobs", "scored_logprobs"}
    assert row["mixed_batches"] == report["reference"]["mixed_batches"] == 2  # a row of both adapters, each round
    assert row["one_pass_requests"] == 1 and "one_pass_logprobs" in row["diffs"]
    for key, (diff, scale) in row["diffs"].items():
        assert scale > 0, f"{key}: the reference is all zero, the comparison proves nothing"
        assert diff <= TOL * max(1.0, scale), f"{key}: max |mesh - one device| = {diff:.3g} (scale {scale:.3g})"
    assert row["sample_tokens_equal"], "greedy sampling chose other tokens on the mesh"


@pytest.mark.parametrize("mesh", MESHES)
def test_engine_on_a_mesh_compiles_nothing_new_for_a_repeat(report, mesh):
    assert report["reference"]["recompiles"] == {}
    assert report["meshes"][mesh]["recompiles"] == {}


@pytest.mark.parametrize("mesh", MESHES)
def test_paging_on_a_mesh_restores_the_adapter_exactly(report, mesh):
    row = report["meshes"][mesh]
    assert row["paged_out"], "the workload did not page the adapter out"
    assert row["paged_forward_diff"] == 0.0


def test_the_default_engine_uses_every_device(report):
    placement = report["meshes"]["default"]["placement"]
    assert placement["mesh"] == {"data": 1, "fsdp": 8, "tp": 1}
    assert placement["describe"] == "8 cpu devices: data=1 fsdp=8 tp=1"
    for key in ("adapter_devices", "base_devices", "bank_devices"):
        assert placement[key] == 8, key
    assert placement["adapter_q_a"] == [None, "fsdp", None]  # [L, d_in, R]: d_in over fsdp
    assert report["reference"]["placement"]["mesh"] == {"data": 1, "fsdp": 1, "tp": 1}


def test_explicit_meshes_split_adapters_over_tp_and_fsdp(report):
    placement = report["meshes"]["fsdp2_tp4"]["placement"]
    assert placement["mesh"] == {"data": 1, "fsdp": 2, "tp": 4}
    assert placement["adapter_q_a"] == [None, "fsdp", None]
    assert report["meshes"]["data2_fsdp2_tp2"]["placement"]["mesh"] == {"data": 2, "fsdp": 2, "tp": 2}
