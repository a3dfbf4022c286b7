"""`ModelConfig`: the architecture of a decoder-only transformer, derived from a HF `config.json`.

One frozen dataclass covers every supported family; the differences between families are
explicit flags (`qkv_bias`, `qk_norm`, ...) set by `ModelConfig.from_hf`, never inferred later
from the family name. Anything in a `config.json` that would change the computation but that we
do not implement (sliding windows, unknown rope scaling, other activations) raises
`UnsupportedModelError` instead of being silently ignored.

Both spellings of the rope settings are read: transformers 4.x (`rope_theta` + `rope_scaling`)
and 5.x (`rope_parameters` holding `rope_theta` and the scaling type).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its features) is not implemented."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`rope_type` as transformers names it)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer.

    Letters used for shapes across `models/`: B batch, T time, D model width (`hidden_size`),
    N query heads, K kv heads, H head dim, F mlp width, V vocab, L layers.
    """

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count, embeddings included (counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        return self.num_layers * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 × matmul params + attention scores/values (causal, averaged)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        matmul = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f
        dense = 2 * (self.num_layers * matmul + d * v)
        attention = 2 * 2 * self.num_layers * self.q_size * (seq_len + 1) / 2
        return dense + attention

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a HF `config.json`; raises `UnsupportedModelError` for the rest."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported model_types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{model_type}: hidden_act={act!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type}: use_sliding_window=true is not supported")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{model_type}: layer_types other than 'full_attention' are not supported: "
                f"{sorted(set(layer_types))}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")

        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, rope_scaling = _rope_from_hf(hf, model_type)
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_from_hf(hf: dict[str, Any], model_type: str) -> tuple[float, RopeScaling]:
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**params, **hf["rope_scaling"]}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{model_type}: rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    needed = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in params]
    if missing:
        raise ValueError(f"{model_type}: rope_type {rope_type!r} needs rope scaling field(s) {', '.join(missing)}")
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def rope_inverse_frequencies(config: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies `[H/2]`, with the config's scaling applied (host-side, float64)."""
    dim = config.head_dim
    inv = [1.0 / (config.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return [f / scaling.factor for f in inv]
    if scaling.rope_type != "llama3":
        return inv
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scaling.factor)
        else:
            smooth = (old_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            out.append((1 - smooth) * f / scaling.factor + smooth * f)
    return out
