"""Loading HF checkpoint directories: every way a checkpoint can be broken gives a `CheckpointError`
naming the tensor and the file (or the directory); the sharded layout, on-disk bf16 and the tokenizer
load offline. Checkpoints are corrupted only in private copies (`checkpoint_copy`)."""

from __future__ import annotations

import dataclasses
import json
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_checkpoints import CHAT_TEMPLATE, SPECS, SPECS_BY_NAME, build_checkpoint, load_torch_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from models import CheckpointError, UnsupportedModelError, load_checkpoint, load_tokenizer, read_config, weight_map

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
VICTIM = "model.layers.1.mlp.up_proj.weight"


def rewrite(file, edit) -> None:
    """Rewrite a safetensors file with `edit(tensors)` applied to its `{name: array}` dict."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def shard_of(directory, tensor: str) -> str:
    return json.loads((directory / INDEX).read_text())["weight_map"][tensor]


def checkpoint_tensors(directory) -> dict[str, tuple[int, ...]]:
    files = sorted(directory.glob("*.safetensors"))
    assert files
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def params_by_path(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --- directory-level errors ---------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        load_checkpoint(missing)


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_checkpoint(file)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "config.json" in str(info.value)


def test_config_json_with_invalid_json(checkpoint_copy):
    directory = checkpoint_copy("llama_gqa")
    (directory / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert str(directory / "config.json") in str(info.value)
    assert "JSON" in str(info.value)


def test_no_safetensors_file(checkpoint_copy):
    directory = checkpoint_copy("llama_gqa")
    (directory / SINGLE).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert str(directory) in str(info.value)
    assert SINGLE in str(info.value)


def test_unsupported_model_type_in_config_json(checkpoint_copy):
    directory = checkpoint_copy("llama_gqa")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(directory)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        read_config(directory)


def test_unsupported_feature_in_config_json(checkpoint_copy):
    directory = checkpoint_copy("qwen2")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8}))
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        load_checkpoint(directory)


# --- tensor-level errors, single file -----------------------------------------------------------------


def test_missing_tensor_names_tensor_and_file(checkpoint_copy):
    directory = checkpoint_copy("llama_gqa")
    rewrite(directory / SINGLE, lambda t: t.pop(VICTIM))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert VICTIM in str(info.value)
    assert SINGLE in str(info.value)


def test_missing_lm_head_in_untied_checkpoint(checkpoint_copy):
    directory = checkpoint_copy("qwen2")
    rewrite(directory / SINGLE, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight") as info:
        load_checkpoint(directory)
    assert SINGLE in str(info.value)


def test_unexpected_tensor_names_tensor_and_file(checkpoint_copy):
    directory = checkpoint_copy("llama_gqa")
    extra = "model.layers.0.self_attn.q_proj.bias"  # llama without attention_bias has no q bias
    rewrite(directory / SINGLE, lambda t: t.update({extra: np.zeros(48, np.float32)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert extra in str(info.value)
    assert SINGLE in str(info.value)


def test_extra_layer_is_unexpected(checkpoint_copy):
    """A checkpoint with more layers than config.json says must not load silently truncated."""
    directory = checkpoint_copy("qwen2_tied")
    extra = "model.layers.2.mlp.down_proj.weight"
    rewrite(directory / SINGLE, lambda t: t.update({extra: t["model.layers.1.mlp.down_proj.weight"]}))
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        load_checkpoint(directory)


def test_rotary_inv_freq_buffer_is_ignored(checkpoint_copy, tiny_checkpoint):
    directory = checkpoint_copy("llama_gqa")
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(directory / SINGLE, lambda t: t.update({buffer: np.ones(4, np.float32)}))
    loaded = params_by_path(load_checkpoint(directory))
    reference = params_by_path(load_checkpoint(tiny_checkpoint("llama_gqa")))
    assert loaded.keys() == reference.keys()
    for path in loaded:
        np.testing.assert_array_equal(loaded[path], reference[path])


@pytest.mark.parametrize("transposed", [False, True], ids=["wrong_shape", "transposed"])
def test_wrong_shape_names_tensor_file_and_both_shapes(checkpoint_copy, transposed):
    directory = checkpoint_copy("llama_gqa")
    expected = (80, 48)  # [intermediate, hidden], as HF stores an up_proj weight
    wrong = (48, 80) if transposed else (81, 48)
    rewrite(directory / SINGLE, lambda t: t.update({VICTIM: np.zeros(wrong, np.float32)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert VICTIM in message
    assert SINGLE in message
    assert str(wrong) in message
    assert str(expected) in message


def test_wrong_shape_of_a_norm(checkpoint_copy):
    directory = checkpoint_copy("qwen3")
    name = "model.layers.0.self_attn.q_norm.weight"  # [head_dim] = [16], not [hidden // heads] = [8]
    rewrite(directory / SINGLE, lambda t: t.update({name: np.ones(8, np.float32)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert name in str(info.value) and "(8,)" in str(info.value) and "(16,)" in str(info.value)


# --- sharded checkpoints ------------------------------------------------------------------------------


def test_sharded_index_pointing_to_missing_shard(checkpoint_copy):
    directory = checkpoint_copy("llama_sharded")
    shard = shard_of(directory, VICTIM)
    (directory / shard).unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert shard in str(info.value)
    assert INDEX in str(info.value)


def test_sharded_invalid_index(checkpoint_copy):
    directory = checkpoint_copy("llama_sharded")
    (directory / INDEX).write_text(json.dumps({"metadata": {}}))  # no weight_map
    with pytest.raises(CheckpointError, match=re.escape(INDEX)):
        load_checkpoint(directory)


def test_sharded_missing_tensor_names_it(checkpoint_copy):
    directory = checkpoint_copy("llama_sharded")
    index = json.loads((directory / INDEX).read_text())
    shard = index["weight_map"].pop(VICTIM)
    (directory / INDEX).write_text(json.dumps(index))
    rewrite(directory / shard, lambda t: t.pop(VICTIM))
    with pytest.raises(CheckpointError, match=re.escape(VICTIM)):
        load_checkpoint(directory)


def test_sharded_index_pointing_to_shard_without_the_tensor(checkpoint_copy):
    directory = checkpoint_copy("llama_sharded")
    shard = shard_of(directory, VICTIM)
    rewrite(directory / shard, lambda t: t.pop(VICTIM))  # the index still maps VICTIM to this shard
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    assert VICTIM in str(info.value) and shard in str(info.value)


def test_sharded_checkpoint_loads_same_weights_as_single_file(tiny_checkpoint, tmp_path):
    sharded = tiny_checkpoint("llama_sharded")
    assert (sharded / INDEX).is_file() and not (sharded / SINGLE).exists()
    shards = set(json.loads((sharded / INDEX).read_text())["weight_map"].values())
    assert len(shards) > 1
    # The same spec and seed written as one file.
    spec = dataclasses.replace(SPECS_BY_NAME["llama_sharded"], name="llama_single_file", max_shard_size=None)
    single = build_checkpoint(spec, tmp_path / spec.name)
    assert (single / SINGLE).is_file() and not (single / INDEX).exists()
    a, b = params_by_path(load_checkpoint(sharded)), params_by_path(load_checkpoint(single))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    # And the weights are the ones transformers reads (logit parity itself: test_model_parity[llama_sharded]).
    torch_model = load_torch_model(sharded)
    np.testing.assert_array_equal(a[("embed",)], torch_model.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(a[("layers", 1, "mlp", "up_proj", "kernel")],
                                  torch_model.model.layers[1].mlp.up_proj.weight.detach().numpy().T)


# --- what is loaded -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_weight_map_covers_exactly_the_checkpoint(name, tiny_checkpoint):
    directory = tiny_checkpoint(name)
    config, _ = read_config(directory)
    specs = weight_map(config)
    names = [s.hf_name for s in specs]
    assert len(names) == len(set(names))
    assert len({s.path for s in specs}) == len(specs)
    on_disk = checkpoint_tensors(directory)
    # save_pretrained drops a tied lm_head; a checkpoint that keeps it is also accepted by the loader.
    assert set(names) == set(on_disk) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert ("lm_head.weight" in names) is (not config.tie_word_embeddings)


def test_shard_callback_places_every_parameter(tiny_checkpoint):
    directory = tiny_checkpoint("qwen3")
    config, _ = read_config(directory)
    seen = {}

    def place(path, array):
        seen[path] = array.shape
        return jnp.asarray(np.ones_like(array))

    model = load_checkpoint(directory, shard=place)
    assert set(seen) == {s.path for s in weight_map(config)}
    for path, value in params_by_path(model).items():
        assert value.shape == seen[path]
        assert np.all(value == 1), path


def test_bf16_on_disk_checkpoint_loads_in_fp32_and_matches_transformers(checkpoint_copy):
    """Released checkpoints are usually bf16 on disk; loading one in fp32 must upcast exactly."""
    directory = checkpoint_copy("qwen2_tied")
    rewrite(directory / SINGLE, lambda t: t.update({k: v.astype(jnp.bfloat16) for k, v in t.items()}))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))

    model = load_checkpoint(directory, dtype=jnp.float32)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(1, 16))
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))[0]
    with torch.no_grad():
        ref = load_torch_model(directory)(torch.from_numpy(tokens)).logits[0].numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-4


# --- tokenizer ----------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "qwen3"])
def test_tokenizer_chat_template_offline(name, tiny_checkpoint, no_network):
    tokenizer = load_tokenizer(tiny_checkpoint(name))
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>What is 12 + 30?<|end|><|assistant|>42<|end|>"
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert ids and all(isinstance(i, int) for i in ids)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < read_config(tiny_checkpoint(name))[0].vocab_size
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1


def test_tokenizer_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        load_tokenizer(tmp_path / "nope")


def test_tokenizer_empty_directory(tmp_path, no_network):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


def test_tokenizer_files_missing(checkpoint_copy, no_network):
    directory = checkpoint_copy("llama_gqa")
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / file).unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(directory))):
        load_tokenizer(directory)
