"""Tiny random Hugging Face checkpoints, built on the fly with transformers + torch (CPU).

Each `TinySpec` names an architecture and a config with deliberately odd sizes; `build_checkpoint`
writes config.json + safetensors (single file or sharded) + a small byte-level BPE tokenizer with a
chat template, exactly as `save_pretrained` does for a real model. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Tinker trains LoRA adapters with sample, forward_backward and optim_step.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) ?",
]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    name: str
    model_type: str  # llama | qwen2 | qwen3
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_shard_size: str | None = None  # e.g. "40KB" to force a sharded checkpoint


BASE = dict(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

SPECS: list[TinySpec] = [
    TinySpec("llama_gqa", "llama", {}),
    TinySpec("llama_mha_tied", "llama", dict(num_key_value_heads=6, tie_word_embeddings=True)),
    TinySpec("llama3_rope_scaling", "llama", dict(
        rope_theta=50000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    TinySpec("llama_sharded", "llama", dict(num_hidden_layers=2), max_shard_size="60KB"),
    TinySpec("qwen2", "qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    rope_theta=1000000.0)),
    TinySpec("qwen2_tied", "qwen2", dict(tie_word_embeddings=True, num_hidden_layers=2)),
    TinySpec("qwen3", "qwen3", dict(head_dim=16)),  # head_dim 16 != 48 / 6
    TinySpec("qwen3_tied_mha", "qwen3", dict(head_dim=12, num_key_value_heads=6, tie_word_embeddings=True,
                                             num_hidden_layers=2)),
]
SPECS_BY_NAME = {s.name: s for s in SPECS}


def hf_config(spec: TinySpec):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[spec.model_type]
    return cls(**{**BASE, **spec.overrides})


def build_tokenizer():
    """A byte-level BPE tokenizer (≤ 300 tokens) with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_checkpoint(spec: TinySpec, directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a random HF checkpoint for `spec` to `directory` and return it."""
    import torch
    import transformers

    directory = Path(directory)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    with torch.no_grad():  # random non-trivial norms and biases, so a mis-mapped one shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    build_tokenizer().save_pretrained(directory)
    return directory


def load_torch_model(directory: str | os.PathLike[str]):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval()
