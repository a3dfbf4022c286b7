"""The engine's typed requests and results: what the client layer hands the engine (validated, host
numpy) and what comes back. Nothing here touches a device."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from framework.optim import AdamHyperparams


@dataclasses.dataclass(frozen=True)
class DatumArrays:
    """One validated datum: input tokens `[n]` and per-token loss inputs `[n]` (host numpy)."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ForwardRequest:
    """`forward` / `forward_backward` of one adapter's datums under a built-in loss."""

    adapter_id: str
    datums: Sequence[DatumArrays]
    loss_name: str
    loss_config: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CustomLossRequest:
    """`forward_backward` under a user loss traced to a jaxpr of the datums' logprobs (`[n]` each)."""

    adapter_id: str
    datums: Sequence[DatumArrays]
    loss: Any  # jax.extend.core.ClosedJaxpr of `loss_fn(data, logprobs) -> (value, metrics)`
    out_tree: Any  # the pytree structure of `(value, metrics)`


@dataclasses.dataclass(frozen=True)
class OptimRequest:
    adapter_id: str
    hp: AdamHyperparams


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """One validated sampling request: `num_samples` continuations of `prompt` from a snapshot."""

    snapshot_id: str
    prompt: np.ndarray  # [n] int32
    num_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False
    topk_prompt: int = 0  # > 0: the k most likely tokens at each prompt position
    topk_sample: int = 0  # > 0: the k most likely tokens at each sampled position
    decode: Callable[[list[int]], str] | None = None  # tokenizer decode, needed for stop strings


@dataclasses.dataclass(frozen=True)
class LogprobsRequest:
    """log p(token_t | tokens_<t) of every token of `tokens` under a snapshot (`compute_logprobs`)."""

    snapshot_id: str
    tokens: np.ndarray  # [n] int32


@dataclasses.dataclass(frozen=True)
class TopK:
    """The k most likely tokens at each of n positions, most likely first (raw model logprobs)."""

    ids: np.ndarray  # [n, k] int32
    logprobs: np.ndarray  # [n, k] float32


@dataclasses.dataclass(frozen=True)
class SampledRow:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk: TopK | None = None  # per sampled token, with `topk_sample`


@dataclasses.dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledRow]
    prompt_logprobs: np.ndarray | None  # [n], NaN for the first token
    version: int  # the adapter version the snapshot holds
    prompt_topk: TopK | None = None  # [n, k]; row 0 (no prediction for the first token) is unused
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache instead of prefilled


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    logprobs: list[np.ndarray]  # per datum, [n]
    loss: float  # sum over the request's datums
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class OptimResult:
    metrics: dict[str, float]  # grad_norm, update_norm
    version: int  # the adapter's weights version after the step
