"""Write a `Transformer` as a Hugging Face checkpoint directory (config.json + model.safetensors).

The inverse of `models.loading`: the same `weight_map` table drives both directions, so a tensor
cannot be saved under a name the loader would not read back (kernels are transposed back to HF's
`[out, in]` layout). `hf_config` turns a `ModelConfig` into the `config.json` dict that both our
`ModelConfig.from_hf` and `transformers.AutoConfig` read to the same architecture; a config that
the family's HF code cannot express (e.g. Qwen2 without q/k/v biases) raises `ValueError`.

The rope settings are written in both spellings (transformers 5.x `rope_parameters`, 4.x
`rope_theta` + `rope_scaling`), so either major version loads the directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.loading import SINGLE_FILE, weight_map
from models.transformer import Transformer

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict of `config` (round-trips through `ModelConfig.from_hf`)."""
    t = config.model_type
    if t == "qwen2" and not config.qkv_bias:
        raise ValueError("qwen2 always has q/k/v biases; this config has qkv_bias=False")
    if t == "llama" and config.qkv_bias != config.o_bias:
        raise ValueError("llama's attention_bias covers q/k/v and o together; got qkv_bias != o_bias")
    if t != "llama" and (config.o_bias or config.mlp_bias):
        raise ValueError(f"{t} has no o_proj or MLP biases")
    if t == "qwen3" and config.qkv_bias:
        raise ValueError("qwen3 with attention_bias also biases o_proj, which ModelConfig does not model")
    if config.qk_norm != (t == "qwen3"):
        raise ValueError(f"qk_norm={config.qk_norm} does not match model_type {t!r}")

    scaling = config.rope_scaling
    rope: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": config.rope_theta}
    if scaling.rope_type == "linear":
        rope["factor"] = scaling.factor
    elif scaling.rope_type == "llama3":
        rope.update({k: v for k, v in dataclasses.asdict(scaling).items() if k != "rope_type"})
    legacy_scaling = None if scaling.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    eos = list(config.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[t]],
        "model_type": t,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": legacy_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.qkv_bias if t != "qwen2" else False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "dtype": dtype,
        "use_cache": True,
    }
    if t == "llama":
        out["mlp_bias"] = config.mlp_bias
    if t != "llama":
        out["use_sliding_window"] = False
    return out


def save_checkpoint(model: Transformer, directory: str | os.PathLike[str], *, dtype: str = "float32") -> Path:
    """Write `model` to `directory` as config.json + model.safetensors (cast to `dtype`); returns it.

    Tokenizer files are not written here: save the tokenizer into the same directory
    (`tokenizer.save_pretrained(directory)`) to make it a complete checkpoint.
    """
    config = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = weight_map(config)
    unmapped = set(flat) - {s.path for s in specs}
    if unmapped:  # the table and the module disagree: a bug here, not the caller's
        raise AssertionError(f"weight_map does not cover model parameters {sorted(map(str, unmapped))}")
    tensors = {}
    for spec in specs:
        array = np.asarray(flat[spec.path].get_value(), dtype=np.dtype(dtype))
        tensors[spec.hf_name] = np.ascontiguousarray(array.T if spec.transpose else array)
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
    return directory
