"""The sharding tables and rules on one device: every parameter named, the rules' arithmetic, mesh
configs, and loading through `shardings` (the 8-device equality checks: `test_sharding_mesh.py`)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from hf_checkpoints import SPECS
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora
from framework.optim import init_opt_state
from framework.sharding import MESH_AXES, MeshConfig, MeshRules, make_mesh
from models import Transformer, axes, load_checkpoint, read_config
from models.kv_cache import KVCache


def abstract_state(config):
    return nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def rules_on(data: int, fsdp: int, tp: int, config=None) -> MeshRules:
    """Rules over an abstract mesh of that shape (specs need no devices)."""
    mesh = AbstractMesh((data, fsdp, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return MeshRules.for_model(mesh, config) if config else MeshRules(mesh)


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_param_axes_name_every_parameter_once(tiny_checkpoint, name):
    config, _ = read_config(tiny_checkpoint(name))
    state = abstract_state(config)
    axes.check_param_axes(config, state)
    flat = dict(nnx.to_flat_state(state))
    table = axes.param_axes(config)
    assert table[("layers", 0, "mlp", "down_proj", "kernel")] == (axes.MLP, axes.EMBED)
    assert table[("embed",)] == (axes.VOCAB, axes.EMBED)
    assert set(table) == set(flat)


def test_check_param_axes_names_what_disagrees(tiny_checkpoint):
    config, _ = read_config(tiny_checkpoint("qwen3"))
    state = abstract_state(config)
    flat = [(p, v) for p, v in nnx.to_flat_state(state) if p != ("final_norm", "scale")]
    with pytest.raises(AssertionError, match=r"not in the model.*final_norm"):
        axes.check_param_axes(config, nnx.from_flat_state(flat))


def test_rules_split_divisible_dimensions_and_replicate_the_rest(caplog):
    r = rules_on(1, 4, 2)
    assert r.spec((axes.EMBED, axes.HEADS), (64, 32)) == P("fsdp", "tp")
    assert r.spec((axes.VOCAB, axes.EMBED), (301, 64)) == P(None, "fsdp")  # 301 is odd: replicated over tp
    assert r.spec((axes.BATCH, axes.LENGTH), (8, 16)) == P("fsdp", None)  # data=1 is dropped
    assert r.spec((axes.BATCH, None), (2, 16)) == P(None, None)  # 2 rows over 4 devices: replicated
    assert r.spec((axes.NORM,), (64,)) == P(None)
    r2 = rules_on(2, 4, 1)
    assert r2.spec((axes.BATCH, axes.LENGTH), (8, 16)) == P(("data", "fsdp"), None)
    assert r2.spec((axes.BATCH,), (2,)) == P("data")  # the axes that divide, in order
    assert rules_on(4, 2, 1).spec((axes.BATCH,), (2,)) == P("fsdp")
    with caplog.at_level(logging.WARNING, logger="framework.sharding"):
        r.spec((axes.VOCAB, axes.EMBED), (307, 64))
        r.spec((axes.VOCAB, axes.EMBED), (307, 64))
    assert [m for m in caplog.messages if "size 307" in m] == [
        "sharding: vocab dimension of size 307 does not divide over mesh axes ['tp'] (tp=2): replicated over them"]


def test_heads_split_only_between_whole_heads(tiny_checkpoint):
    config, _ = read_config(tiny_checkpoint("qwen3"))  # 6 heads of 16, 2 kv heads
    r = rules_on(1, 1, 4, config)
    assert r.spec((axes.EMBED, axes.HEADS), (48, 96)) == P(None, None)  # 96 % 4 == 0, but 6 heads % 4 != 0
    assert rules_on(1, 1, 2, config).spec((axes.EMBED, axes.HEADS), (48, 96)) == P(None, "tp")
    assert r.spec((axes.EMBED, axes.MLP), (48, 80)) == P(None, "tp")


def test_a_mesh_axis_is_used_once_per_array():
    r = MeshRules(rules_on(1, 2, 2).mesh, rules={"x": ("fsdp",), "y": ("fsdp", "tp")})
    assert r.spec(("x", "y"), (4, 4)) == P("fsdp", "tp")


def test_unknown_logical_axis_and_rank_mismatch_are_named():
    r = rules_on(1, 1, 1)
    with pytest.raises(KeyError, match=r"'vocabulary' has no sharding rule"):
        r.spec(("vocabulary",), (4,))
    with pytest.raises(ValueError, match="do not match the shape"):
        r.spec((axes.EMBED,), (4, 4))


def test_mesh_config_resolves_and_refuses():
    assert MeshConfig().shape(8) == (1, 8, 1)
    assert MeshConfig(data=2, fsdp=-1, tp=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tp=1).shape(3) == (3, 1, 1)
    with pytest.raises(ValueError, match=r"MeshConfig\.tp must be"):
        MeshConfig(tp=0)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        MeshConfig(fsdp=2, tp=2).shape(8)
    with pytest.raises(ValueError, match="not a multiple"):
        MeshConfig(tp=3).shape(8)
    mesh = make_mesh()  # every visible device (one, in this process)
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tp": 1}


def test_bank_opt_state_and_cache_shardings_follow_their_kernels(tiny_checkpoint):
    """Adapter weights split like their kernel and over fsdp as well (trained: ZeRO-3); the KV cache by
    rows and kv heads."""
    config, _ = read_config(tiny_checkpoint("llama_gqa"))  # D=48, F=80, 6 heads x 8, 2 kv heads, V=301
    r = rules_on(1, 2, 2, config)
    bank = jax.eval_shape(lambda: lora.empty_bank(config, 3, 4))
    specs = jax.tree.map(lambda s: s.spec, r.bank_shardings(bank), is_leaf=lambda x: isinstance(x, NamedSharding))
    assert specs.weights["q"]["a"] == P(None, None, "fsdp", None)  # [L, S, D, R]
    assert specs.weights["q"]["b"] == P(None, None, None, "tp")  # [L, S, R, N*H]: 6 heads, not 4
    assert specs.weights["k"]["b"] == P(None, None, None, "tp")  # 2 kv heads
    assert specs.weights["down"]["a"] == P(None, None, ("tp", "fsdp"), None)  # [L, S, F, R]
    assert specs.weights["unembed"]["b"] == P(None, None, None, None)  # V = 301
    assert specs.scales == P(None)
    one = jax.eval_shape(lambda b: jax.tree.map(lambda w: w[:, 0], b.weights), bank)
    one_s = r.adapter_shardings(one, slots=False)
    opt = jax.eval_shape(init_opt_state, one)
    opt_s = r.opt_state_shardings(init_opt_state, opt, one_s)
    mu = opt_s.inner_state[0].mu
    assert mu["q"]["a"].spec == P(None, "fsdp", None) and mu["o"]["a"].spec == P(None, "tp", None)
    assert opt_s.count.spec == P() and opt_s.hyperparams["learning_rate"].spec == P()
    cache = jax.eval_shape(lambda: KVCache.empty(config, 4, 16, np.float32))
    cache_s = r.kv_cache_shardings(cache)
    assert cache_s.keys[0].spec == P("fsdp", "tp", None, None) and cache_s.lengths.spec == P("fsdp")


def test_loading_into_shardings_equals_the_plain_load(tiny_checkpoint):
    path = tiny_checkpoint("llama_sharded")  # a checkpoint split over several safetensors files
    config, _ = read_config(path)
    rules = MeshRules.for_model(make_mesh(), config)
    shardings = rules.param_sharding_map(config, abstract_state(config))
    sharded = nnx.to_flat_state(nnx.state(load_checkpoint(path, shardings=shardings)))
    plain = dict(nnx.to_flat_state(nnx.state(load_checkpoint(path))))
    for p, v in sharded:
        assert v.get_value().sharding == shardings[p]
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(plain[p].get_value()))
    with pytest.raises(ValueError, match="shardings has no entry for parameter"):
        load_checkpoint(path, shardings={p: s for p, s in list(shardings.items())[1:]})


def test_loading_bf16_blocks(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    config, _ = read_config(path)
    rules = MeshRules.for_model(make_mesh(), config)
    model = load_checkpoint(path, dtype="bfloat16", shardings=rules.param_sharding_map(config, abstract_state(config)))
    plain = load_checkpoint(path, dtype="bfloat16")
    a, b = nnx.state(model), nnx.state(plain)
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(a))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                           strict=True))
