"""`ModelConfig.from_hf`: HF config.json → our architecture description, and its refusals."""

from __future__ import annotations

import pytest
from hf_checkpoints import BASE, SPECS, hf_config, load_torch_model
from transformers import AutoConfig

from models import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling, UnsupportedModelError, read_config

SPEC_NAMES = [s.name for s in SPECS]
SPECS_BY_NAME = {s.name: s for s in SPECS}

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def minimal(model_type: str = "llama", **extra) -> dict:
    """A small valid config.json dict."""
    return dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **extra)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_config_maps_to_expected_fields(name, tiny_checkpoint):
    spec = SPECS_BY_NAME[name]
    hf = {**BASE, **spec.overrides}
    config, raw = read_config(tiny_checkpoint(name))
    assert raw["model_type"] == spec.model_type

    assert config.model_type == spec.model_type
    assert config.vocab_size == hf["vocab_size"]
    assert config.hidden_size == hf["hidden_size"]
    assert config.intermediate_size == hf["intermediate_size"]
    assert config.num_layers == hf["num_hidden_layers"]
    assert config.num_heads == hf["num_attention_heads"]
    assert config.num_kv_heads == hf["num_key_value_heads"]
    assert config.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    assert config.rms_norm_eps == hf["rms_norm_eps"]
    assert config.max_position_embeddings == hf["max_position_embeddings"]
    assert config.tie_word_embeddings is hf["tie_word_embeddings"]
    assert config.qkv_bias is (spec.model_type == "qwen2")
    assert config.o_bias is False
    assert config.mlp_bias is False
    assert config.qk_norm is (spec.model_type == "qwen3")
    assert config.bos_token_id == hf["bos_token_id"]
    assert config.eos_token_ids == (hf["eos_token_id"],)

    assert config.rope_theta == hf.get("rope_theta", _default_rope_theta(spec))
    if "rope_scaling" in hf:
        assert config.rope_scaling == RopeScaling(rope_type="llama3", **LLAMA3_SCALING)
    else:
        assert config.rope_scaling == RopeScaling()

    # The dict transformers builds in memory parses to the same config as what it wrote to disk.
    assert ModelConfig.from_hf(hf_config(spec).to_dict()) == config


def _default_rope_theta(spec) -> float:
    """The family's default rope_theta in the installed transformers (4.x attribute or 5.x rope_parameters)."""
    c = hf_config(spec)
    params = getattr(c, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def test_head_dim_differs_from_hidden_over_heads(tiny_checkpoint):
    config, _ = read_config(tiny_checkpoint("qwen3"))
    assert config.head_dim == 16 != config.hidden_size // config.num_heads
    assert config.q_size == 6 * 16 and config.kv_size == 2 * 16


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_num_params_matches_transformers(name, tiny_checkpoint):
    config, _ = read_config(tiny_checkpoint(name))
    torch_model = load_torch_model(tiny_checkpoint(name))
    assert config.num_params() == sum(p.numel() for p in torch_model.parameters())


# --- rope spellings -----------------------------------------------------------------------------------

ROPE_SPELLINGS = {
    "llama3": [
        dict(rope_theta=50000.0, rope_scaling=dict(type="llama3", **LLAMA3_SCALING)),
        dict(rope_theta=50000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_SCALING)),
        dict(rope_parameters=dict(rope_theta=50000.0, rope_type="llama3", **LLAMA3_SCALING)),
    ],
    "linear": [
        dict(rope_theta=50000.0, rope_scaling=dict(type="linear", factor=4.0)),
        dict(rope_theta=50000.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
        dict(rope_parameters=dict(rope_theta=50000.0, rope_type="linear", factor=4.0)),
    ],
    "default": [
        dict(rope_theta=50000.0),
        dict(rope_theta=50000.0, rope_scaling=None),
        dict(rope_parameters=dict(rope_theta=50000.0, rope_type="default")),
    ],
}
EXPECTED_SCALING = {
    "llama3": RopeScaling(rope_type="llama3", **LLAMA3_SCALING),
    "linear": RopeScaling(rope_type="linear", factor=4.0),
    "default": RopeScaling(),
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_SPELLINGS))
def test_transformers4_and_transformers5_rope_spellings_agree(rope_type):
    configs = [ModelConfig.from_hf(minimal(**spelling)) for spelling in ROPE_SPELLINGS[rope_type]]
    for config in configs:
        assert config.rope_theta == 50000.0
        assert config.rope_scaling == EXPECTED_SCALING[rope_type]
    assert len(set(configs)) == 1


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_rope_theta_default_is_the_one_transformers_uses(model_type):
    """A config.json without rope_theta (or rope_parameters) gets the default transformers itself uses for it."""
    hf = minimal(model_type)
    assert not {"rope_theta", "rope_parameters", "rope_scaling"} & set(hf)
    reference = AutoConfig.for_model(**hf)
    params = getattr(reference, "rope_parameters", None) or {}  # transformers 5.x; 4.x: the attribute
    assert ModelConfig.from_hf(hf).rope_theta == float(params.get("rope_theta", getattr(reference, "rope_theta", None)))


# --- refusals -----------------------------------------------------------------------------------------


def test_unsupported_model_type_names_the_supported_ones():
    """Every model_type the error lists parses, and it lists every family we check against transformers
    (hf_checkpoints.SPECS); other families transformers knows are refused, not read as a look-alike."""
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf(minimal("gpt2"))
    message = str(info.value)
    assert "'gpt2'" in message
    listed = message.split("supported model_types: ")[1].split(", ")
    for model_type in listed:
        assert ModelConfig.from_hf(minimal(model_type)).model_type == model_type
    assert {spec.model_type for spec in SPECS} <= set(listed)
    for model_type in ("mistral", "gemma", "gpt_oss", "qwen3_moe"):  # families transformers has and we do not
        with pytest.raises(UnsupportedModelError, match=model_type):
            ModelConfig.from_hf(minimal(model_type))


def test_missing_model_type_is_unsupported():
    hf = minimal()
    del hf["model_type"]
    with pytest.raises(UnsupportedModelError, match="model_type"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_type", "yarn"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type", "yarn"),
        (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope_type", "dynamic"),
        (dict(hidden_act="gelu"), "hidden_act", "gelu"),
        (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window", ""),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types", "sliding_attention"),
    ],
    ids=["yarn-t4", "yarn-t5", "dynamic", "gelu", "sliding_window", "layer_types"],
)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_unsupported_feature_names_the_field(model_type, extra, field, value):
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf(minimal(model_type, **extra))
    assert field in str(info.value)
    assert value in str(info.value)


@pytest.mark.parametrize(
    "field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
)
def test_missing_required_field_is_named(field):
    hf = minimal()
    del hf[field]
    with pytest.raises(ValueError, match=field) as info:
        ModelConfig.from_hf(hf)
    assert not isinstance(info.value, UnsupportedModelError)


def test_heads_not_multiple_of_kv_heads_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf({**minimal(), "num_attention_heads": 4, "num_key_value_heads": 3})


def test_kv_heads_default_to_heads_and_eos_list_is_kept():
    hf = minimal(eos_token_id=[2, 7])
    del hf["num_key_value_heads"]
    config = ModelConfig.from_hf(hf)
    assert config.num_kv_heads == config.num_heads == 4
    assert config.eos_token_ids == (2, 7)


def test_llama_attention_bias_and_mlp_bias():
    config = ModelConfig.from_hf(minimal(attention_bias=True, mlp_bias=True))
    assert config.qkv_bias and config.o_bias and config.mlp_bias
    # Qwen2 always has q/k/v bias and never an o_proj bias.
    qwen2 = ModelConfig.from_hf(minimal("qwen2"))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.mlp_bias



@pytest.mark.parametrize("rope_type,given", [("llama3", {"factor": 8.0}), ("linear", {})])
def test_rope_scaling_missing_field_is_named(rope_type, given):
    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": rope_type, **given}}
    with pytest.raises(ValueError, match="factor" if rope_type == "linear" else "low_freq_factor"):
        ModelConfig.from_hf(raw)
