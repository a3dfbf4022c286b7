"""PEFT interop: export an adapter as `adapter_config.json` + `adapter_model.safetensors`, import one
back, and merge an adapter into full Hugging Face weights.

PEFT stores `lora_A.weight [r, d_in]` and `lora_B.weight [d_out, r]` per module with scaling
`lora_alpha / r` (`lora_alpha / sqrt(r)` with rslora); ours are `A [d_in, R]`, `B [R, d_out]` padded to
the bank's rank, so export slices and transposes, import pads. Only plain LoRA is accepted on import:
DoRA, per-module rank/alpha patterns, layer subsets and trained biases raise a `ValueError` naming the
field, instead of being silently dropped. The copy of the base unembedding that `peft` saves beside an
`lm_head` adapter is accepted when its shape is the base's (its values are the base's own).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from lora.bank import UNEMBED_TARGET, LoraWeights, target_shape
from models import ModelConfig
from models.loading import read_config, safetensors_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# our target -> (HF module name in a decoder layer, or the top-level module for the unembedding)
HF_MODULES: dict[str, str] = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                              "down": "mlp.down_proj", UNEMBED_TARGET: "lm_head"}
_BY_SHORT_NAME = {module.split(".")[-1]: t for t, module in HF_MODULES.items()}


def _module_path(target: str, layer: int) -> str:
    """HF module path without the `base_model.model.` prefix."""
    if target == UNEMBED_TARGET:
        return "lm_head"
    return f"model.layers.{layer}.{HF_MODULES[target]}"


def export_peft(
    adapter: LoraWeights, *, config: ModelConfig, rank: int, alpha: float, targets: Iterable[str],
    out_dir: str | os.PathLike[str], base_model: str = "",
) -> Path:
    """Write one adapter (`{target: {"a": [L, d_in, R], "b": [L, R, d_out]}}`) in PEFT format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = list(targets)
    tensors: dict[str, np.ndarray] = {}
    for t in targets:
        a, b = np.asarray(adapter[t]["a"], np.float32), np.asarray(adapter[t]["b"], np.float32)
        for layer in range(a.shape[0]):
            prefix = f"base_model.model.{_module_path(t, layer)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer, :, :rank].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer, :rank, :].T)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in targets),
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return out


def import_peft(
    path: str | os.PathLike[str], *, config: ModelConfig, max_rank: int, bank_targets: Iterable[str],
) -> tuple[LoraWeights, int, float, tuple[str, ...]]:
    """Read a PEFT LoRA adapter. Returns (adapter padded to `max_rank`, rank, scale, trained targets)."""
    directory = Path(path)
    cfg_file = directory / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG}")
    cfg = json.loads(cfg_file.read_text())
    for field, ok in (("peft_type", cfg.get("peft_type", "LORA") == "LORA"), ("use_dora", not cfg.get("use_dora")),
                      ("rank_pattern", not cfg.get("rank_pattern")), ("alpha_pattern", not cfg.get("alpha_pattern")),
                      ("layers_to_transform", cfg.get("layers_to_transform") is None),
                      ("bias", cfg.get("bias", "none") == "none"), ("fan_in_fan_out", not cfg.get("fan_in_fan_out")),
                      ("modules_to_save", not cfg.get("modules_to_save"))):
        if not ok:
            raise ValueError(f"{cfg_file}: unsupported PEFT setting {field}={cfg.get(field)!r}")
    rank = int(cfg["r"])
    if not 0 < rank <= max_rank:
        raise ValueError(f"{cfg_file}: r={rank} is outside [1, {max_rank}] (the engine's maximum rank)")
    modules = cfg["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in _BY_SHORT_NAME]
    if unknown:
        raise ValueError(f"{cfg_file}: target_modules {unknown} are not LoRA targets we support "
                         f"({', '.join(sorted(_BY_SHORT_NAME))})")
    targets = tuple(t for t in HF_MODULES if HF_MODULES[t].split(".")[-1] in modules)
    bank_targets = list(bank_targets)
    missing_in_bank = [t for t in targets if t not in bank_targets]
    if missing_in_bank:
        raise ValueError(f"{cfg_file}: adapter trains {missing_in_bank}, which this engine's bank does not hold")
    alpha = float(cfg.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    weights_file = directory / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_WEIGHTS}")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(weights_file)).items()}
    used: set[str] = set()
    adapter: LoraWeights = {}
    for t in bank_targets:
        layers, d_in, d_out = target_shape(config, t)
        a = np.zeros((layers, d_in, max_rank), np.float32)
        b = np.zeros((layers, max_rank, d_out), np.float32)
        if t in targets:
            for layer in range(layers):
                prefix = f"base_model.model.{_module_path(t, layer)}"
                expected = {f"{prefix}.lora_A.weight": (rank, d_in), f"{prefix}.lora_B.weight": (d_out, rank)}
                for key, want in expected.items():
                    if key not in tensors:
                        raise ValueError(f"{weights_file}: missing tensor {key!r}")
                    if tensors[key].shape != want:
                        raise ValueError(
                            f"{weights_file}: tensor {key!r} has shape {tensors[key].shape}, expected {want}")
                    used.add(key)
                a[layer, :, :rank] = tensors[f"{prefix}.lora_A.weight"].T
                b[layer, :rank, :] = tensors[f"{prefix}.lora_B.weight"].T
        adapter[t] = {"a": a, "b": b}
    # With `lm_head` among its targets, `peft` also saves the base unembedding (`save_embedding_layers=
    # "auto"`, meant for resized vocabularies). A copy of the base's shape adds nothing; another shape
    # means another vocabulary, which this base cannot serve.
    base_copy = f"base_model.model.{_module_path(UNEMBED_TARGET, 0)}.base_layer.weight"
    if base_copy in tensors and UNEMBED_TARGET in targets:
        want = (config.vocab_size, config.hidden_size)
        if tensors[base_copy].shape != want:
            raise ValueError(f"{weights_file}: tensor {base_copy!r} has shape {tensors[base_copy].shape}, expected "
                             f"{want} (the adapter was saved for a different vocabulary)")
        used.add(base_copy)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{weights_file}: unexpected tensor {extra[0]!r}{more}")
    return adapter, rank, scale, targets


def export_merged(
    base_dir: str | os.PathLike[str], adapter: LoraWeights, *, scale: float, out_dir: str | os.PathLike[str],
) -> Path:
    """Write base + adapter as a full HF checkpoint (`W += scale · (A B)ᵀ`) that `transformers` loads.

    Tokenizer and config files are copied. A tied model whose unembedding was adapted is written
    untied (`tie_word_embeddings: false`, with its own `lm_head.weight`).
    """
    base, out = Path(base_dir), Path(out_dir)
    _, raw = read_config(base)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(set(safetensors_files(base).values())):
        tensors.update(load_file(str(file)))
    for t, ab in adapter.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        if not np.any(b):
            continue
        for layer in range(a.shape[0]):
            name = f"{_module_path(t, layer)}.weight"
            if t == UNEMBED_TARGET and name not in tensors:
                tensors[name] = tensors["model.embed_tokens.weight"].copy()
                raw["tie_word_embeddings"] = False
            w = tensors[name]
            tensors[name] = (w.astype(np.float32) + scale * (a[layer] @ b[layer]).T).astype(w.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out
