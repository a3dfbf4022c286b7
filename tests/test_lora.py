"""`lora/` against the references: `peft` on the same weights (export, import, peft's own adapters),
`transformers` on merged checkpoints, and the bank's slot discipline.

Two 2-layer checkpoints, one with tied embeddings (qwen3_tied_mha) and one without (llama_sharded).
Every forward of ours has the shape `[2, 16]` over a 3-slot bank of rank 8 holding all targets, so
each model compiles its LoRA forward once whatever the adapter's rank or targets (and the untied one
its plain forward once more).
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from hf_checkpoints import load_torch_model
from safetensors.numpy import load_file, save_file

import lora
from framework.engine import DatumArrays, Engine, EngineConfig, ForwardRequest, OptimRequest
from framework.optim import AdamHyperparams
from lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from models import load_checkpoint

TIED, UNTIED = "qwen3_tied_mha", "llama_sharded"
MAX_RANK, SLOTS, SLOT = 8, 3, 1
TOL = 1e-4
SUBSET = ("q", "v", "down")


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, adapter, scale, tokens):
    """Logits with `adapter` written into slot 1 of an empty bank and every row on that slot (None: no hook)."""
    model = nnx.merge(graphdef, state)
    if adapter is None:
        return model(tokens)
    bank = lora.write_slot(lora.empty_bank(model.config, SLOTS, MAX_RANK), SLOT, adapter, scale)
    return model(tokens, hook=lora.make_hook(bank, jnp.full((tokens.shape[0],), SLOT, jnp.int32)))


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_checkpoint(tiny_checkpoint(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(3, 301, size=(2, 16)).astype(np.int32)


def ours(model, tokens, adapter=None, scale=0.0) -> np.ndarray:
    """Our logits `[2, 16, V]` through `adapter` (None: the base model, no hook)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_logits(graphdef, state, adapter, scale, tokens))


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def assert_changes_logits(logits, checkpoint, tokens) -> None:
    """The adapter moves the logits well beyond the tolerance (else a comparison would prove nothing)."""
    assert np.abs(logits - torch_logits(load_torch_model(checkpoint), tokens)).max() > 1e-2


def random_adapter(config, *, rank, targets, seed) -> lora.LoraWeights:
    """A bank-shaped adapter (numpy): random A and B on the trained targets' first `rank` columns / rows."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in lora.ALL_TARGETS:
        layers, d_in, d_out = lora.target_shape(config, t)
        a = np.zeros((layers, d_in, MAX_RANK), np.float32)
        b = np.zeros((layers, MAX_RANK, d_out), np.float32)
        if t in targets:
            a[..., :rank] = rng.uniform(-d_in**-0.5, d_in**-0.5, a[..., :rank].shape)
            b[:, :rank] = rng.normal(0.0, 0.3, b[:, :rank].shape)
        out[t] = {"a": a, "b": b}
    return out


# ------------------------------------------------------------------------------------- bank
def test_fresh_adapter_leaves_logits_unchanged(models, tokens):
    model = models(UNTIED)
    adapter = lora.init_adapter(model.config, rank=4, seed=0, targets=lora.ALL_TARGETS,
                                bank_targets=lora.ALL_TARGETS, max_rank=MAX_RANK)
    assert all(np.abs(np.asarray(ab["a"])).max() > 0 for ab in adapter.values()), "A must be random"
    assert all(not np.asarray(ab["b"]).any() for ab in adapter.values()), "B must start at zero"
    np.testing.assert_array_equal(ours(model, tokens, adapter, 32.0 / 4), ours(model, tokens))


def test_write_slot_leaves_other_slots_bitwise_unchanged(models):
    config = models(UNTIED).config
    rng = np.random.default_rng(0)
    bank = lora.empty_bank(config, SLOTS, MAX_RANK)
    bank = lora.LoraBank({t: {k: rng.normal(size=w.shape).astype(np.float32) for k, w in ab.items()}
                          for t, ab in bank.weights.items()}, np.array([0.5, 1.5, 2.5], np.float32))
    adapter = random_adapter(config, rank=3, targets=SUBSET, seed=1)
    written = jax.device_get(jax.jit(lora.write_slot)(bank, SLOT, adapter, 4.0))
    for t, ab in bank.weights.items():
        for k, before in ab.items():
            after = written.weights[t][k]
            for other in (0, 2):
                np.testing.assert_array_equal(after[:, other], before[:, other], err_msg=f"{t}.{k} slot {other}")
            np.testing.assert_array_equal(after[:, SLOT], adapter[t][k], err_msg=f"{t}.{k} slot {SLOT}")
    np.testing.assert_array_equal(written.scales, [0.5, 4.0, 2.5])
    jax.tree.map(np.testing.assert_array_equal, lora.read_slot(written, SLOT), adapter)


def test_one_hot_hook_equals_gathered(models):
    """Both evaluations of `make_hook` (per-row gathers; every slot under a one-hot weight) give the same
    logits, for decode-shaped rows (one token each) and longer ones, rows on different slots."""
    model = models(UNTIED)
    rng = np.random.default_rng(3)
    bank = lora.empty_bank(model.config, SLOTS, MAX_RANK)
    bank = lora.LoraBank({t: {k: 0.05 * rng.normal(size=w.shape).astype(np.float32) for k, w in ab.items()}
                          for t, ab in bank.weights.items()}, np.array([0.5, 1.5, 2.5], np.float32))
    slot_ids = jnp.array([0, 2, 1, 2], jnp.int32)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="one_hot")
    def logits(tokens, one_hot):
        return nnx.merge(graphdef, state)(tokens, hook=lora.make_hook(bank, slot_ids, one_hot=one_hot))

    for length in (1, 5):
        tokens = jnp.asarray(rng.integers(3, 301, size=(4, length)), jnp.int32)
        gathered, one_hot = np.asarray(logits(tokens, False)), np.asarray(logits(tokens, True))
        assert np.abs(gathered - np.asarray(model(tokens))).max() > 1e-2  # the adapters matter
        np.testing.assert_allclose(one_hot, gathered, atol=1e-4, rtol=1e-4)


def test_padded_rank_columns_stay_zero_under_training(models, tiny_checkpoint):
    """A rank-3 adapter over three targets in a rank-8 bank, trained by the engine with weight decay:
    columns 3..7 of A, rows 3..7 of B and the untrained targets stay exactly zero. Also with `eps=0`,
    which `AdamParams` accepts: the zero gradient of every padded weight must not become 0/0."""
    engine = Engine(str(tiny_checkpoint(UNTIED)), EngineConfig(max_adapters=2, max_rank=MAX_RANK),
                    model=models(UNTIED))
    rank, targets = 3, ("q", "down", "unembed")
    rng = np.random.default_rng(0)
    datums = []
    for n in (20, 11):
        ids = rng.integers(3, 301, n + 1).astype(np.int32)
        datums.append(DatumArrays(ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(n, np.float32)}))
    for eps in (1e-12, 0.0):
        adapter_id = engine.create_adapter(rank=rank, seed=0, targets=targets).adapter_id
        hp = AdamHyperparams.make(1e-2, eps=eps, weight_decay=0.1)
        for _ in range(3):
            engine.forward([ForwardRequest(adapter_id, datums, "cross_entropy")], backward=True)
            engine.optim_step([OptimRequest(adapter_id, hp)])
        weights = jax.device_get(engine.adapter_weights(adapter_id))
        for t, ab in weights.items():
            a, b = ab["a"], ab["b"]
            if t in targets:
                assert np.isfinite(a).all() and np.isfinite(b).all(), f"eps={eps}: {t} is not finite"
                assert np.abs(b[:, :rank]).max(axis=(1, 2)).min() > 0, f"eps={eps}: {t} did not train in every layer"
                assert not a[..., rank:].any(), f"eps={eps}: {t}: A has non-zero padded columns"
                assert not b[:, rank:].any(), f"eps={eps}: {t}: B has non-zero padded rows"
            else:
                assert not a.any() and not b.any(), f"eps={eps}: untrained target {t} is not all zero"
    # The lower edge of every AdamParams field at once (learning_rate, betas and eps 0): a step that moves nothing.
    engine.forward([ForwardRequest(adapter_id, datums, "cross_entropy")], backward=True)
    engine.optim_step([OptimRequest(adapter_id, AdamHyperparams.make(0.0, beta1=0.0, beta2=0.0, eps=0.0,
                                                                     weight_decay=0.1))])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(engine.adapter_weights(adapter_id)), weights)


# ------------------------------------------------------------------------------------ PEFT io
@pytest.mark.parametrize("targets", [lora.ALL_TARGETS, SUBSET], ids=["all", "subset"])
@pytest.mark.parametrize("name", [TIED, UNTIED])
def test_export_loads_in_peft_with_our_logits(models, tiny_checkpoint, tokens, tmp_path, name, targets):
    model = models(name)
    rank, alpha = 5, 10.0
    adapter = random_adapter(model.config, rank=rank, targets=targets, seed=2)
    lora.export_peft(adapter, config=model.config, rank=rank, alpha=alpha, targets=targets, out_dir=tmp_path,
                     base_model=str(tiny_checkpoint(name)))
    reference = peft.PeftModel.from_pretrained(load_torch_model(tiny_checkpoint(name)), str(tmp_path)).eval()
    expected = torch_logits(reference, tokens)
    got = ours(model, tokens, adapter, alpha / rank)
    assert_changes_logits(got, tiny_checkpoint(name), tokens)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_import_peft_round_trips_exactly(models, tmp_path):
    config = models(TIED).config
    rank, alpha = 5, 7.0
    adapter = random_adapter(config, rank=rank, targets=("k", "o", "up", "unembed"), seed=3)
    lora.export_peft(adapter, config=config, rank=rank, alpha=alpha, targets=("k", "o", "up", "unembed"),
                     out_dir=tmp_path)
    back, got_rank, scale, targets = lora.import_peft(tmp_path, config=config, max_rank=MAX_RANK,
                                                      bank_targets=lora.ALL_TARGETS)
    assert (got_rank, scale, targets) == (rank, alpha / rank, ("k", "o", "up", "unembed"))
    assert set(back) == set(lora.ALL_TARGETS)
    for t in lora.ALL_TARGETS:
        for k in ("a", "b"):
            assert back[t][k].dtype == np.float32
            np.testing.assert_array_equal(back[t][k], adapter[t][k], err_msg=f"{t}.{k}")


@pytest.mark.parametrize("name", [TIED, UNTIED])
def test_import_adapter_made_by_peft(models, tiny_checkpoint, tokens, tmp_path, name):
    """An adapter `peft` itself created and saved (default options: with `lm_head` among the targets
    it also saves the base `lm_head.base_layer.weight`) gives our logits = peft's logits."""
    torch.manual_seed(0)
    modules = ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules)
    reference = peft.get_peft_model(load_torch_model(tiny_checkpoint(name)), config)
    with torch.no_grad():
        for param_name, param in reference.named_parameters():
            if "lora_B" in param_name:
                param.copy_(0.3 * torch.randn_like(param))
    reference.save_pretrained(str(tmp_path))
    expected = torch_logits(reference.eval(), tokens)

    model = models(name)
    adapter, rank, scale, targets = lora.import_peft(tmp_path, config=model.config, max_rank=MAX_RANK,
                                                     bank_targets=lora.ALL_TARGETS)
    assert (rank, scale, targets) == (4, 2.0, ("q", "v", "gate", "down", "unembed"))
    got = ours(model, tokens, adapter, scale)
    assert_changes_logits(got, tiny_checkpoint(name), tokens)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(("name", "targets"), [(TIED, lora.ALL_TARGETS), (UNTIED, SUBSET)])
def test_export_merged_loads_in_transformers(models, tiny_checkpoint, tokens, tmp_path, name, targets):
    """A tied model with an adapted unembedding is written untied; transformers' logits on the merged
    checkpoint equal ours with the adapter."""
    model = models(name)
    rank, alpha = 6, 12.0
    adapter = random_adapter(model.config, rank=rank, targets=targets, seed=4)
    out = lora.export_merged(tiny_checkpoint(name), adapter, scale=alpha / rank, out_dir=tmp_path / "merged")
    if name == TIED:
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    got = ours(model, tokens, adapter, alpha / rank)
    np.testing.assert_allclose(got, torch_logits(load_torch_model(out), tokens), atol=TOL, rtol=0)
    assert_changes_logits(got, tiny_checkpoint(name), tokens)


def _edit_config(**changes):
    def edit(directory):
        cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
        cfg.update(changes)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg))

    return edit


def _edit_tensors(drop=None, add=None):
    def edit(directory):
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
        if drop:
            del tensors[drop]
        if add:
            tensors[add] = np.zeros((2, 2), np.float32)
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))

    return edit


_V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
IMPORT_ERRORS = {
    "dora": (_edit_config(use_dora=True), r"use_dora=True"),
    "rank_above_max": (_edit_config(r=16), r"r=16 is outside \[1, 8\]"),
    "unknown_target": (_edit_config(target_modules=["q_proj", "v_proj", "down_proj", "lm_head", "foo_proj"]),
                       r"target_modules \['foo_proj'\]"),
    "missing_tensor": (_edit_tensors(drop=_V_B), rf"missing tensor '{_V_B}'"),
    "unexpected_tensor": (_edit_tensors(add="base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"),
                          r"unexpected tensor '.*up_proj.lora_A.weight'"),
    "rank_pattern": (_edit_config(rank_pattern={"q_proj": 2}), r"rank_pattern="),
    "resized_vocab": (_edit_tensors(add="base_model.model.lm_head.base_layer.weight"),
                      r"lm_head.base_layer.weight' has shape \(2, 2\).*different vocabulary"),
}
IMPORT_TARGETS = (*SUBSET, "unembed")


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_refuses_unsupported_adapters(models, tmp_path, case):
    config = models(UNTIED).config
    good = tmp_path / "good"
    lora.export_peft(random_adapter(config, rank=4, targets=IMPORT_TARGETS, seed=5), config=config, rank=4,
                     alpha=8.0, targets=IMPORT_TARGETS, out_dir=good)
    lora.import_peft(good, config=config, max_rank=MAX_RANK, bank_targets=lora.ALL_TARGETS)  # the control
    bad = shutil.copytree(good, tmp_path / "bad")
    edit, message = IMPORT_ERRORS[case]
    edit(bad)
    with pytest.raises(ValueError, match=message):
        lora.import_peft(bad, config=config, max_rank=MAX_RANK, bank_targets=lora.ALL_TARGETS)
