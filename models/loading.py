"""Load a Hugging Face checkpoint directory (config.json + safetensors + tokenizer) into `Transformer`.

The HF-name → our-name mapping is one table (`weight_map`), checked both ways: every tensor the
model needs must be in the checkpoint and every tensor in the checkpoint must be used, with the
right shape; each violation raises `CheckpointError` naming the tensor and the file. The model is
built abstractly (`nnx.eval_shape`), so loading never allocates random weights first. Nothing is
ever downloaded: the path must be a local directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from models.config import ModelConfig
from models.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Buffers some exporters write that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" notice: we use only its tokenizers and
    configs, never its PyTorch models, so the notice would only make a user think something is broken.
    Installed before anything here imports transformers (an idempotent `addFilter`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchNotice())


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent with its config."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor: where it goes in our model and how its layout changes on the way."""

    hf_name: str
    path: tuple[str | int, ...]  # path in the model's nnx.State
    transpose: bool  # HF Linear weights are [out, in]; our kernels are [in, out]


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    """The complete table of checkpoint tensors for `config`."""
    specs = [WeightSpec("model.embed_tokens.weight", ("embed",), False),
             WeightSpec("model.norm.weight", ("final_norm", "scale"), False)]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head",), False))
    linears = [("self_attn.q_proj", ("attn", "q_proj"), config.qkv_bias),
               ("self_attn.k_proj", ("attn", "k_proj"), config.qkv_bias),
               ("self_attn.v_proj", ("attn", "v_proj"), config.qkv_bias),
               ("self_attn.o_proj", ("attn", "o_proj"), config.o_bias),
               ("mlp.gate_proj", ("mlp", "gate_proj"), config.mlp_bias),
               ("mlp.up_proj", ("mlp", "up_proj"), config.mlp_bias),
               ("mlp.down_proj", ("mlp", "down_proj"), config.mlp_bias)]
    for i in range(config.num_layers):
        prefix, ours = f"model.layers.{i}", ("layers", i)
        specs.append(WeightSpec(f"{prefix}.input_layernorm.weight", (*ours, "input_norm", "scale"), False))
        specs.append(WeightSpec(f"{prefix}.post_attention_layernorm.weight",
                                (*ours, "post_attn_norm", "scale"), False))
        for hf, path, bias in linears:
            specs.append(WeightSpec(f"{prefix}.{hf}.weight", (*ours, *path, "kernel"), True))
            if bias:
                specs.append(WeightSpec(f"{prefix}.{hf}.bias", (*ours, *path, "bias"), False))
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                specs.append(WeightSpec(f"{prefix}.self_attn.{norm}.weight", (*ours, "attn", norm, "scale"), False))
    return specs


def read_config(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """`ModelConfig` and the raw dict from `<path>/config.json`."""
    directory = _checkpoint_dir(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON ({e})") from e
    return ModelConfig.from_hf(raw), raw


def safetensors_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    directory = _checkpoint_dir(path)
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from e
        files = {name: directory / fname for name, fname in index.items()}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index_file}: tensor {name!r} is mapped to missing file {file.name}")
        held: dict[Path, set[str]] = {}
        for name, file in files.items():
            if file not in held:
                with safe_open(file, framework="numpy") as f:
                    held[file] = set(f.keys())
            if name not in held[file]:
                raise CheckpointError(f"{index_file}: tensor {name!r} is mapped to {file.name}, which does not hold it")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    dtype: jnp.dtype | str = jnp.float32,
    shard: Callable[[tuple[str | int, ...], np.ndarray], jax.Array] | None = None,
    shardings: Mapping[tuple[str | int, ...], jax.sharding.Sharding] | None = None,
) -> Transformer:
    """Build a `Transformer` holding the checkpoint's weights, cast to `dtype`.

    `shardings` (`{state path: Sharding}` for every parameter, e.g. from
    `framework.sharding.MeshRules.param_sharding_map`) loads each parameter straight into its
    shards: every device's block is read from the safetensors file as a slice
    (`jax.make_array_from_callback`), so no device and no host buffer ever holds a whole tensor that
    is split, and each process of a multi-host run reads only its own devices' blocks.
    Otherwise `shard(path, array)` may place each whole parameter (e.g. `jax.device_put`); by
    default arrays go to the default device.
    """
    config, _ = read_config(path)
    dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {spec.path: spec for spec in weight_map(config)}
    flat = dict(nnx.to_flat_state(state))
    ours_missing = set(flat) - set(expected)
    if ours_missing:  # the table and the module disagree: a bug here, not in the checkpoint
        raise AssertionError(f"weight_map does not cover model parameters {sorted(map(str, ours_missing))}")

    files = safetensors_files(path)
    by_hf = {spec.hf_name: spec for spec in expected.values()}
    unexpected = [n for n in files if n not in by_hf and not n.endswith(_IGNORED_SUFFIXES)
                  and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        name = sorted(unexpected)[0]
        raise CheckpointError(
            f"{files[name]}: unexpected tensor {name!r} for a {config.model_type} config"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    missing = [n for n in by_hf if n not in files]
    if missing:
        where = sorted({str(f) for f in files.values()})
        raise CheckpointError(
            f"missing tensor {missing[0]!r} in {', '.join(where)}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )

    if shardings is not None:
        unplaced = [p for p in expected if p not in shardings]
        if unplaced:
            raise ValueError(f"shardings has no entry for parameter {unplaced[0]}"
                             + (f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""))
    place = shard or (lambda _path, array: jnp.asarray(array))
    handles: dict[Path, Any] = {}
    try:
        for hf_name, spec in by_hf.items():
            file = files[hf_name]
            if file not in handles:
                handles[file] = safe_open(file, framework="numpy")
            tensor = handles[file].get_slice(hf_name)
            stored = tuple(tensor.get_shape())
            variable = flat[spec.path]
            want = tuple(variable.shape)
            if (stored[::-1] if spec.transpose else stored) != want:
                expect = want[::-1] if spec.transpose else want
                raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {stored}, config.json implies {expect}")
            if shardings is not None:
                value = jax.make_array_from_callback(
                    want, shardings[spec.path], functools.partial(_read_block, tensor, spec.transpose, dtype))
            else:
                array = handles[file].get_tensor(hf_name)
                value = place(spec.path, np.ascontiguousarray(array.T if spec.transpose else array).astype(dtype))
            variable.set_value(value)
    finally:
        handles.clear()
    return nnx.merge(graphdef, state)


def _read_block(tensor: Any, transpose: bool, dtype: np.dtype, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` (in our layout) of a safetensors tensor, read as a slice of the file."""
    block = tensor[index[::-1]].T if transpose else tensor[index]
    return np.ascontiguousarray(block).astype(dtype)


def load_tokenizer(path: str | os.PathLike[str]):  # -> transformers.PreTrainedTokenizerBase
    """The checkpoint's tokenizer (and chat template) through `transformers.AutoTokenizer`, offline."""
    from transformers import AutoTokenizer

    directory = _checkpoint_dir(path)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{directory}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot load a tokenizer ({e})") from e


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    return directory
