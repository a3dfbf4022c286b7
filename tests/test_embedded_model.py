"""The embedded default model (launcher/assets/tiny-arith) and the checkpoint writer that made it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from launcher.envs.arithmetic import ArithmeticEnv, forgot_carry
from launcher.pretrain import (
    DEFAULT_OUT,
    PretrainConfig,
    TinyModelConfig,
    build_tokenizer,
    encode_prompt,
    greedy_completions,
    run_pretrain,
)
from models import ModelConfig, Transformer, load_checkpoint, load_tokenizer
from models.saving import hf_config, save_checkpoint

ASSET = DEFAULT_OUT


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(ASSET)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSET)


def test_asset_is_a_small_complete_checkpoint():
    files = {p.name: p.stat().st_size for p in ASSET.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain.json"):
        assert name in files
    assert sum(files.values()) <= 20 * 2**20
    config = json.loads((ASSET / "config.json").read_text())
    assert config["model_type"] in ("qwen3", "llama")


def test_tokenizer_and_chat_template(tokenizer):
    assert tokenizer.eos_token == "<|end|>"
    assert load_checkpoint_config_eos() == (tokenizer.eos_token_id,)
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>What is 12 + 30?<|end|><|assistant|>"
    ids = encode_prompt(tokenizer, messages)
    assert ids == encode_prompt(build_tokenizer(), messages)  # the shipped tokenizer is the builder's
    assert tokenizer.convert_ids_to_tokens(ids[:2] + ids[-2:]) == ["<s>", "<|user|>", "<|end|>", "<|assistant|>"]
    assert len(ids) == 2 + len("What is 12 + 30?") + 2  # one token per byte
    assert tokenizer.decode(tokenizer.encode("héllo, wörld 42<|end|>", add_special_tokens=False)) == \
        "héllo, wörld 42<|end|>"


def load_checkpoint_config_eos() -> tuple[int, ...]:
    return ModelConfig.from_hf(json.loads((ASSET / "config.json").read_text())).eos_token_ids


def test_logits_match_transformers(model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(ASSET))
    hf_model = AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32).eval()
    env = ArithmeticEnv(seed=0)
    prompts = [encode_prompt(hf_tokenizer, env.prompt_messages(p)) for p in env.eval_problems(4)]
    n = min(map(len, prompts))
    tokens = np.array([p[:n] for p in prompts])
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)


def test_greedy_accuracy_is_low_but_not_zero(model, tokenizer):
    """RL needs room to improve: the shipped model is right on some held-out problems, not most."""
    env = ArithmeticEnv(seed=0)
    problems = env.eval_problems(100)
    completions = greedy_completions(model, tokenizer, env, problems, max_new_tokens=8)
    accuracy = np.mean([env.grade(p, c) for p, c in zip(problems, completions, strict=True)])
    assert 0.05 <= accuracy <= 0.40, accuracy
    # It has the format: a number, then the end-of-turn token.
    assert np.mean([c.endswith("<|end|>") and c[:-7].isdigit() for c in completions]) >= 0.9
    # Its mistakes are mostly the planted habit (a forgotten carry), not noise.
    slips = [c == forgot_carry(p) + "<|end|>" for p, c in zip(problems, completions, strict=True)
             if forgot_carry(p) and env.grade(p, c) == 0]
    assert np.mean(slips) >= 0.5


@pytest.mark.parametrize(("model_type", "tied"), [("qwen3", False), ("llama", True)])
def test_save_checkpoint_round_trips(tmp_path, model_type, tied):
    config = ModelConfig(model_type=model_type, vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=model_type == "qwen3",
                         tie_word_embeddings=tied, rope_theta=5000.0, bos_token_id=1, eos_token_ids=(2,))
    model = Transformer(config, rngs=nnx.Rngs(3))
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # non-trivial norms too
        variable.set_value(variable.get_value() + 0.1)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == config
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    assert ModelConfig.from_hf(hf_config(config)) == config

    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = np.array([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)


def test_hf_config_refuses_what_transformers_cannot_express():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                head_dim=4)
    with pytest.raises(ValueError, match="qwen2"):
        hf_config(ModelConfig(model_type="qwen2", **base))
    with pytest.raises(ValueError, match="llama"):
        hf_config(ModelConfig(model_type="llama", qkv_bias=True, **base))


def test_run_pretrain_writes_a_loadable_checkpoint(tmp_path):
    """The pretraining pipeline end to end, shrunk to a few steps (thresholds that accept anything)."""
    cfg = PretrainConfig(batch_size=8, skill_threshold=0.0, habit_steps=2, eval_every=2, eval_size=8,
                         max_new_tokens=4, target_min=0.0, target_max=1.0, out=str(tmp_path / "tiny"),
                         model=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                               num_kv_heads=1, head_dim=16))
    out = run_pretrain(cfg)
    record = json.loads((out / "pretrain.json").read_text())
    assert record["learn_steps"] == 2 and [p["phase"] for p in record["curve"]] == ["learn", "habit"]
    model = load_checkpoint(out)
    assert model.config.vocab_size == len(load_tokenizer(out)) and model.config.num_layers == 1
    assert Path(out, "model.safetensors").stat().st_size < 1e6
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
