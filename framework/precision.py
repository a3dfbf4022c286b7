"""Which dtype each kind of state and computation uses, by backend.

On accelerators the base model runs in bf16 (weights, residual stream, matmuls) while everything
that accumulates stays fp32: the LoRA bank is the fp32 master copy of the adapters, so their
gradients, the gradient buffer and the AdamW moments are fp32 too; the low-rank products run in
bf16 (`lora.make_hook(..., compute_dtype=...)`), the gradient flowing back to fp32 through the cast.
What `models/` already keeps in fp32 whatever the weights: RMSNorm statistics, rope, attention scores
and softmax, logits (`preferred_element_type=float32`), hence log-probabilities and losses. On CPU,
where bf16 is emulated and the tests compare with transformers in fp32, everything is fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Precision:
    params: str = "float32"  # base weights and activations (the residual stream)
    adapters: str = "float32"  # LoRA bank, gradient buffer, AdamW state: the master weights

    def __post_init__(self) -> None:
        for name in ("params", "adapters"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"Precision.{name} must be float32, bfloat16 or float16, got {value!r}")

    @property
    def compute(self) -> jnp.dtype:
        """dtype of the LoRA products (`lora.make_hook(compute_dtype=...)`): the model's."""
        return jnp.dtype(self.params)

    @classmethod
    def for_backend(cls, backend: str | None = None) -> Precision:
        """fp32 on CPU; bf16 base model with fp32 adapters elsewhere."""
        backend = backend or jax.default_backend()
        return cls() if backend == "cpu" else cls(params="bfloat16")

    @classmethod
    def from_dtype(cls, dtype: str, backend: str | None = None) -> Precision:
        """A model dtype as configs spell it (`auto` = by backend); adapters stay fp32."""
        return cls.for_backend(backend) if dtype == "auto" else cls(params=dtype)
