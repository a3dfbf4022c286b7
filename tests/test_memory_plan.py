"""The memory planner against what JAX and XLA actually allocate on CPU (within 25%), and its verdict.

Measured: the arguments and temporaries of a compiled LoRA training step (`memory_analysis()`) and
the values JAX keeps for the backward pass under each rematerialisation policy
(`jax.ad_checkpoint.print_saved_residuals`). The per-device figures on 8-device meshes are checked in
`test_sharding_mesh.py` (the worker compiles those steps anyway).
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import lora
from framework.memory_plan import MemoryPlanError, Workload, abstract_rules, plan_memory, residual_bytes
from framework.sharding import MeshConfig
from models import ModelConfig, Transformer, read_config, token_logprobs

SLOTS, RANK = 4, 8
CASES = [("llama_gqa", 4, 32), ("qwen3", 2, 256), ("qwen2_tied", 8, 16)]


def workload(b: int, t: int, remat: str = "none") -> Workload:
    return Workload(batch=b, seq_len=t, train_slots=SLOTS, sampler_slots=0, adapters=0, max_rank=RANK,
                    sample_batch=1, sample_len=1, remat=remat)


def _loss(graphdef, remat, weights, base, scales, tokens, targets, slot_ids):
    hook = lora.make_hook(lora.LoraBank(weights, scales), slot_ids)
    return -token_logprobs(nnx.merge(graphdef, base)(tokens, hook=hook, remat=remat), targets).sum()


@pytest.mark.parametrize(("name", "b", "t"), CASES)
def test_training_step_memory_within_25_percent(tiny_checkpoint, name, b, t):
    config, _ = read_config(tiny_checkpoint(name))
    graphdef, base = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    bank = jax.eval_shape(lambda: lora.empty_bank(config, SLOTS, RANK))
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def step(base, bank, grads, tokens, targets, slot_ids):
        g = jax.grad(lambda w: _loss(graphdef, "none", w, base, bank.scales, tokens, targets, slot_ids))(bank.weights)
        return jax.tree.map(jnp.add, grads, g)

    compiled = jax.jit(step, donate_argnums=(2,)).lower(base, bank, bank.weights, ints, ints,
                                                         jax.ShapeDtypeStruct((b,), jnp.int32)).compile()
    measured = compiled.memory_analysis()
    plan = plan_memory(config, workload=workload(b, t), mesh=(1, 1, 1)).components
    inputs = 2 * b * t * 4 + b * 4 + SLOTS * 4  # tokens, targets, slot ids, scales
    held = plan["params"] + plan["adapters"] + plan["gradients"] + inputs
    assert held == pytest.approx(measured.argument_size_in_bytes, rel=0.01)
    assert plan["fsdp_gather"] == 0 and plan["kv_cache"] > 0 and plan["optimizer"] == 0
    assert plan["activations"] == pytest.approx(measured.temp_size_in_bytes, rel=0.25), (
        plan["activations"], measured.temp_size_in_bytes)


def saved_bytes(fn, *args) -> int:
    """Bytes of the values JAX keeps between `fn`'s forward and backward (what `print_saved_residuals`
    lists, less the arguments and constants it merely refers to)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    total = 0
    for line in out.getvalue().splitlines():
        m = re.match(r"(bool|[a-z]+(\d+))\[([\d,]*)\] (.*)", line)
        if m is None or "from the argument" in m.group(4) or "from a constant" in m.group(4):
            continue
        size = int(np.prod([int(x) for x in m.group(3).split(",") if x]))
        total += size * (1 if m.group(1) == "bool" else int(m.group(2)) // 8)
    return total


@pytest.mark.parametrize(("name", "b", "t"), CASES[:2])
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_values_kept_for_backward_within_25_percent(tiny_checkpoint, name, b, t, remat):
    config, _ = read_config(tiny_checkpoint(name))
    graphdef, base = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    bank = lora.empty_bank(config, SLOTS, RANK)
    tokens, slot_ids = jnp.zeros((b, t), jnp.int32), jnp.arange(b, dtype=jnp.int32) % SLOTS

    def loss(weights):
        return _loss(graphdef, remat, weights, base, bank.scales, tokens, tokens, slot_ids)

    estimate = residual_bytes(config, abstract_rules(config, (1, 1, 1)), workload(b, t, remat))
    assert estimate == pytest.approx(saved_bytes(loss, bank.weights), rel=0.25)


LLAMA_8B = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)


def test_8b_on_one_16gib_device_is_refused_with_what_to_change():
    plan = plan_memory(LLAMA_8B, dtype="bfloat16", mesh=(1, 1, 1), capacity=16 * 2**30,
                       workload=Workload(batch=8, seq_len=2048))
    assert not plan.fits
    with pytest.raises(MemoryPlanError) as error:
        plan.check()
    message = str(error.value)
    assert "per device but" in message and "params" in message and "mesh.fsdp" in message
    assert "activations" in message and "remat" in message


def test_8b_on_eight_80gib_devices_fits_and_splits_by_eight():
    one = plan_memory(LLAMA_8B, dtype="bfloat16", mesh=(1, 1, 1), workload=Workload(batch=8, seq_len=2048))
    plan = plan_memory(LLAMA_8B, dtype="bfloat16", mesh=MeshConfig(), num_devices=8, capacity=80 * 2**30,
                       workload=Workload(batch=8, seq_len=2048, remat="dots"))
    plan.check()
    assert plan.mesh == {"data": 1, "fsdp": 8, "tp": 1}
    assert plan.components["params"] == pytest.approx(one.components["params"] / 8, rel=1e-3)  # all but norms
    assert one.components["params"] == pytest.approx(LLAMA_8B.num_params() * 2, rel=1e-6)
    full = plan_memory(LLAMA_8B, dtype="bfloat16", mesh=(1, 8, 1), workload=Workload(batch=8, seq_len=2048))
    assert plan.components["activations"] < full.components["activations"] / 2  # remat
    assert "fits" in plan.report() and "kv_cache" in plan.report()


def test_workload_fields_are_checked():
    with pytest.raises(ValueError, match=r"Workload\.remat must be one of"):
        Workload(remat="some")
    with pytest.raises(ValueError, match=r"Workload\.batch must be >= 1"):
        Workload(batch=0)
