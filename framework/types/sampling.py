"""Sampling: the settings of a request and the sequences it returns."""

from __future__ import annotations

import math

import numpy as np
from pydantic import field_validator

from framework.types._base import StopReason, _error, _finite, _Response


class SamplingParams(_Response):
    """How to sample. `stop=None` stops at EOS; `stop=[]` disables every stop, EOS included.

    Unknown fields are ignored, as in the SDK (it is a `BaseModel` there, not a `StrictBase`).
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1
    top_k: int = -1
    top_p: float = 1

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise _error("max_tokens", value, ">= 1 (or None)")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return _finite("temperature", value, 0.0)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise _error("top_k", value, "-1 (no limit) or >= 1")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not (math.isfinite(value) and 0 < value <= 1):
            raise _error("top_p", value, "in (0, 1]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | list[int] | None) -> str | list[str] | list[int] | None:
        for item in [value] if isinstance(value, str) else value or []:
            if item == "":
                raise _error("stop", value, "non-empty strings")
            if isinstance(item, int) and item < 0:
                raise _error("stop", value, "non-negative token ids")
        return value


class SampledSequence(_Response):
    """One sampled continuation."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None
    """The SDK's client stamps a session-scoped id here; None until something assigns one."""
    topk_logprobs: list[list[tuple[int, float]] | None] | None = None
    """With `topk_sample_logprobs=k`: per sampled token, the k most likely `(token_id, logprob)`."""

    # --- extensions (see EXTENSIONS) ---
    weights_version: int | None = None
    """The adapter version that produced this sample (our addition; not in the SDK)."""

    @property
    def tokens_np(self) -> np.ndarray:
        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> np.ndarray | None:
        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)


class SampleResponse(_Response):
    """The sequences of one sampling request, and the prompt's logprobs when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """One entry per prompt token; None where there is none (the first token)."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0

    @property
    def prompt_logprobs_np(self) -> np.ndarray | None:
        """The prompt logprobs as float32, NaN where there is none."""
        if self.prompt_logprobs is None:
            return None
        return np.asarray([math.nan if x is None else x for x in self.prompt_logprobs], dtype=np.float32)
