"""On 8 fake CPU devices, sharded results equal single-device ones, and the training step's HLO
gathers parameters only the way FSDP must.

`mesh_worker.py` runs once, in a subprocess (the 8 devices must be set before jax starts; this
process keeps one), over two checkpoints: `divisible` (a random model saved here, every dimension
divisible by every mesh axis) on the meshes (fsdp, tp) = (8,1), (4,2), (2,4), (1,8), and `odd`
(the tiny `qwen3_tied_mha`: 6 heads, a 301-token tied vocabulary) on (2,4) and (1,8), where its
heads and vocabulary stay replicated over `tp`. Each test below reads one fact of its JSON report;
the worker also reports the training step's per-device memory, which the memory planner must predict.
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
from jax.sharding import PartitionSpec as P
from mesh_steps import GENERATE, LENGTH, PLAN, RANK, ROWS, SLOTS, TARGETS

from framework.memory_plan import Workload, plan_memory
from models import ModelConfig, Transformer, read_config
from models.saving import save_checkpoint

TOL = 1e-5  # fp32: relative to max(1, the reference's largest magnitude)
CASES = [(role, mesh) for role, meshes in PLAN.items() for mesh in meshes]
IDS = [f"{role}-{f}x{t}" for role, (f, t) in CASES]
DIVISIBLE = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=16, num_kv_heads=8, head_dim=4, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mesh")
    divisible = save_checkpoint(Transformer(DIVISIBLE, rngs=nnx.Rngs(3)), root / "divisible")
    out = root / "report.json"
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(tests / "mesh_worker.py"), str(out), f"divisible={divisible}",
                           f"odd={tiny_checkpoint('qwen3_tied_mha')}"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "stderr": proc.stderr}


def _row(report: dict[str, Any], section: str, role: str, mesh: tuple[int, int]) -> dict[str, Any]:
    (row,) = [r for r in report[section] if r["model"] == role and tuple(r["mesh"]) == mesh]
    return row


@pytest.mark.parametrize(("role", "mesh"), CASES, ids=IDS)
def test_sharded_equals_single_device(report, role, mesh):
    row = _row(report, "cases", role, mesh)
    quantities = ["logprobs", "loss", "grads", "adam_weights", "adam_state", "cached_logprobs"]
    if (role, mesh) == GENERATE:
        quantities.append("generate_logprobs")
        assert row["generate_tokens"], "framework.sampling.generate chose other greedy tokens on the mesh"
    assert row["cached_tokens"], "KV-cache greedy decoding chose other tokens on the mesh"
    for key in quantities:
        diff, scale = row[key]
        assert scale > 0, f"{key}: the reference is all zero, the comparison proves nothing"
        assert diff <= TOL * max(1.0, scale), f"{key}: max |sharded - single| = {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize(("role", "mesh"), CASES, ids=IDS)
def test_loaded_straight_into_shards(report, role, mesh):
    row = _row(report, "placement", role, mesh)
    assert row["equal"], "a parameter loaded into shards differs from the unsharded load"
    assert row["blocks"], "a device holds more than its block of a parameter"
    specs = row["specs"]
    fsdp = mesh[0]
    if role == "divisible":  # every dimension splits: embed over fsdp, heads / mlp / vocab over tp
        expect = {"layers.0.attn.q_proj.kernel": ("fsdp", "tp"), "layers.1.attn.o_proj.kernel": ("tp", "fsdp"),
                  "layers.0.mlp.down_proj.kernel": ("tp", "fsdp"), "lm_head": ("tp", "fsdp")}
        for name, (a, b) in expect.items():
            a, b = (a if mesh[a == "tp"] > 1 else None), (b if mesh[b == "tp"] > 1 else None)
            assert specs[name] == str(P(a, b)), (name, specs[name])
    else:  # 6 heads and 301 tokens do not split over tp=4 or 8: replicated there, embed still over fsdp
        fs = "fsdp" if fsdp > 1 else None
        assert specs["layers.0.attn.q_proj.kernel"] == str(P(fs, None))
        assert specs["embed"] == str(P(None, fs))
        assert specs["layers.0.mlp.up_proj.kernel"] == str(P(fs, "tp"))  # 80 = 8 * 10


def test_kv_cache_is_split_by_rows_and_kv_heads(report):
    assert _row(report, "cases", "divisible", (2, 4))["cache_specs"] == [str(P("fsdp", "tp", None, None))]
    assert _row(report, "cases", "divisible", (1, 8))["cache_specs"] == [str(P(None, "tp", None, None))]
    assert _row(report, "cases", "odd", (1, 8))["cache_specs"] == [str(P(None, None, None, None))]


def test_xla_never_replicates_involuntarily(report):
    """XLA's partitioner found a direct way for every resharding in every step (an "involuntary full
    rematerialization" replicates a tensor on every device: what `MeshRules.adapter_layout` prevents for
    the adapter bank)."""
    lines = [line for line in report["stderr"].splitlines() if "Involuntary full rematerialization" in line]
    assert not lines, lines[0][:600]


@pytest.mark.parametrize(("role", "mesh"), CASES, ids=IDS)
def test_training_step_gathers_parameters_only_as_fsdp_needs(report, role, mesh):
    """In the compiled LoRA training step, every all-gather that moves a base parameter's data gathers
    exactly its `fsdp` split (the block a device holds keeps its `tp` split), at most twice per
    parameter (forward and backward); with no `fsdp` split (mesh 1x8) nothing is gathered at all; and
    no all-gather anywhere builds a parameter's `tp`-gathered (full) form."""
    row = _row(report, "hlo", role, mesh)
    params, gathers = row["params"], row["all_gathers"]
    moved = [g for g in gathers if g["param"] in params]
    for g in moved:
        info = params[g["param"]]
        assert info["fsdp"], f"{g['param']} ({info['spec']}) is all-gathered but has no fsdp split"
        assert g["shape"] == info["gathered"], (
            f"{g['param']} ({info['spec']}) gathered to {g['shape']}, FSDP needs {info['gathered']}")
    fsdp_split = [p for p, info in params.items() if info["fsdp"]]
    assert len(moved) <= 2 * len(fsdp_split), f"{len(moved)} parameter all-gathers for {len(fsdp_split)} parameters"
    if mesh[0] == 1:
        assert gathers == [], "a pure tensor-parallel step needs no all-gather"
    allowed = {tuple(info["gathered"]) for info in params.values()}
    full_tp = {tuple(info["shape"]) for info in params.values() if "tp" in info["spec"]} - allowed
    built = [g for g in gathers if tuple(g["shape"]) in full_tp]
    assert not built, f"all-gathers build tp-split parameters whole: {built}"
    if mesh[0] > 1:
        assert moved, "an FSDP step with no parameter all-gather: the HLO parser no longer sees them"


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_pallas_kernel_under_shard_map_equals_reference(report, kv_heads):
    """The splash kernel (interpreted) run per device by `MeshRules.shard_attention` on (2, 4): values
    and gradients equal `causal_attention`; heads split over tp only when the kv heads split too."""
    (row,) = [r for r in report["splash"] if r["kv_heads"] == kv_heads]
    for key in ("grads", "out"):
        diff, scale = row[key]
        assert diff <= TOL * max(1.0, scale), (key, diff, scale)
    assert row["spec"] == ["fsdp", None, "tp" if kv_heads == 4 else None, None]


@pytest.mark.parametrize(("role", "mesh"), CASES, ids=IDS)
def test_memory_plan_per_device_within_25_percent(report, tiny_checkpoint, role, mesh):
    """`framework.memory_plan` on each mesh against the compiled training step's per-device memory:
    the buffers it holds (parameters, bank, gradient buffer) and its temporaries (activations and the
    FSDP-gathered weights)."""
    config = DIVISIBLE if role == "divisible" else read_config(tiny_checkpoint("qwen3_tied_mha"))[0]
    work = Workload(batch=ROWS, seq_len=LENGTH, train_slots=SLOTS, sampler_slots=0, adapters=0, max_rank=RANK,
                    targets=TARGETS, sample_batch=1, sample_len=1)
    plan = plan_memory(config, mesh=(1, *mesh), workload=work).components
    row = _row(report, "memory", role, mesh)
    held = plan["params"] + plan["adapters"] + plan["gradients"]
    assert held == pytest.approx(row["arguments"], rel=0.02)
    assert plan["activations"] + plan["fsdp_gather"] == pytest.approx(row["temp"], rel=0.25)
