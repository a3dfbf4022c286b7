"""Training: the optimizer step's hyperparameters, the adapter's configuration, and what
forward_backward and optim_step return."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from framework.types._base import _error, _finite, _Request, _Response
from framework.types.data import TensorData


class AdamParams(_Request):
    """One AdamW step (decoupled weight decay). `grad_clip_norm=0` means no clipping."""

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @field_validator("learning_rate", "eps", "weight_decay", "grad_clip_norm")
    @classmethod
    def _non_negative(cls, value: float, info: Any) -> float:
        return _finite(info.field_name, value, 0.0)

    @field_validator("beta1", "beta2")
    @classmethod
    def _beta(cls, value: float, info: Any) -> float:
        value = _finite(info.field_name, value, 0.0, 1.0, hi_open=True)
        if np.float32(value) >= 1.0:  # the step runs in float32: 1 - beta would be 0 and the bias correction 0/0
            raise _error(info.field_name, value, "< 1 in float32 (at most 0.99999994)")
        return value


class AdamOptimizerConfig(_Request):
    """The optimizer family chosen when a model is created (only AdamW here)."""

    type: Literal["adamw"] = "adamw"


class LoraConfig(_Request):
    """Where the adapter goes and its rank."""

    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, rank: int) -> int:
        if rank < 1:
            raise _error("rank", rank, ">= 1")
        return rank

    @model_validator(mode="after")
    def _trains_something(self) -> LoraConfig:
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("train_unembed, train_mlp and train_attn are all False; the adapter would train nothing")
        return self


class ForwardBackwardOutput(_Response):
    """Per-datum output tensors (e.g. `logprobs`) and scalar metrics (e.g. `loss:sum`)."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = {}


class OptimStepResponse(_Response):
    metrics: dict[str, float] | None = None
