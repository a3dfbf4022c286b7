"""What every public type shares: the request/response bases, the literal aliases, the field
checks whose errors name the field and the value, and the list of our extensions to the SDK."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

TensorDtype = Literal["int64", "float32"]
StopReason = Literal["length", "stop"]
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
"""The built-in losses we implement (`framework.losses.LOSSES`). The SDK also names `gspo`,
`stable_reinforce` and `custom`; those are refused with a clear error."""
CheckpointType = Literal["training", "sampler", "external"]
ModelID = str

# Fields we add to the SDK's shapes. All optional with a None default, so the SDK's JSON parses
# into ours, and the SDK's response models (extra="ignore") drop them when parsing ours.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "SampledSequence": ("weights_version",),
}


class _Request(BaseModel):
    """Inputs: unknown fields are an error (SDK `StrictBase`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _Response(BaseModel):
    """Outputs: unknown fields are ignored (SDK `BaseModel`), `model_*` field names allowed."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())


def _error(field: str, value: Any, requirement: str) -> ValueError:
    return ValueError(f"{field} must be {requirement}, got {value!r}")


def _finite(
    field: str, value: float, lo: float | None = None, hi: float | None = None, *, hi_open: bool = False
) -> float:
    """Check `value` is finite and inside [lo, hi] (or [lo, hi) with `hi_open`)."""
    bounds = f"in [{lo}, {hi}{')' if hi_open else ']'}" if hi is not None else f">= {lo}"
    requirement = "a finite number" + ("" if lo is None else f" {bounds}")
    if not math.isfinite(value):
        raise _error(field, value, requirement)
    if lo is not None and value < lo:
        raise _error(field, value, requirement)
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise _error(field, value, requirement)
    return value


def _as_list(value: Any) -> Any:
    """numpy / jax arrays (anything with `tolist`) become Python lists before validation."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, list) else value


def _check_token_ids(field: str, tokens: list[int]) -> list[int]:
    if tokens and min(tokens) < 0:
        i = next(i for i, token in enumerate(tokens) if token < 0)
        raise ValueError(f"{field} must be non-negative token ids, got {tokens[i]} at index {i}")
    return tokens

