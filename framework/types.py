"""The public request/response types, mirroring the official `tinker` SDK (`tinker.types`).

Same class names, field names, defaults and helper methods as tinker 0.38, so user code ports
with an import change (`from framework import types`). The service parses the SDK's JSON with
these same classes: one schema set, not a wire copy and an engine copy. What is unusual:

- Every type is a frozen pydantic v2 model. The SDK turned `TensorData`, `Datum`,
  `SampledSequence`, `SampleResponse` and `ForwardBackwardOutput` into dataclasses holding numpy
  arrays (its wire for those is protobuf); ours keep the JSON shape of the SDK's pydantic twins
  (`tinker.types._pydantic_types`) and offer the same accessors (`to_numpy`, `tokens_np`, ...).
- Inputs are validated where they are built, and every error names the field and the value:
  a bad learning rate or a negative token id fails in the user's process, not in the engine.
- No torch at runtime: `TensorData.from_numpy` / `from_jax` replace `from_torch`; a `Datum`
  still accepts anything with `__array__` (numpy, jax, CPU torch tensors) or plain lists.
- Text only: a `ModelInput` holds `EncodedTextChunk`s; image chunks are not supported.
- Request models forbid unknown fields (SDK `StrictBase`); response models and `SamplingParams`
  ignore them (SDK `BaseModel`), so a newer peer can add fields without breaking us.

Our additions to the SDK's shapes are few, optional, and listed in `EXTENSIONS`.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = [
    "EXTENSIONS",
    "AdamOptimizerConfig",
    "AdamParams",
    "Checkpoint",
    "CheckpointType",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelData",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "ParsedCheckpointTinkerPath",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsForSamplerResponseInternal",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
]

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


# ---------------------------------------------------------------------------------------------
# Model input
# ---------------------------------------------------------------------------------------------


class EncodedTextChunk(_Request):
    """A run of token ids."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @field_validator("tokens", mode="before")
    @classmethod
    def _arrays_to_lists(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, tokens: list[int]) -> list[int]:
        return _check_token_ids("tokens", tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = EncodedTextChunk
"""The SDK's chunk union also holds image chunks; we serve text-only models."""


class ModelInput(_Request):
    """The tokens a model reads, as a list of chunks. May be empty (`ModelInput.empty()`);
    a `Datum` or a sampling prompt refuses an empty one."""

    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new `ModelInput` with `chunk` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new `ModelInput` with one token added at the end."""
        return self.append(EncodedTextChunk(tokens=[token]))


# ---------------------------------------------------------------------------------------------
# Tensors and training data
# ---------------------------------------------------------------------------------------------

_NUMPY_DTYPE: dict[str, type] = {"int64": np.int64, "float32": np.float32}


def _tensor_dtype_of(array: np.ndarray) -> TensorDtype:
    if array.dtype.kind == "f":
        return "float32"
    if array.dtype.kind in "iu":
        return "int64"
    raise ValueError(f"dtype must be a float or integer array dtype, got {array.dtype}")


class TensorData(_Request):
    """A dense tensor as a flat list plus a shape, or a 2-D sparse CSR tensor.

    Sparse (SDK layout): `data` holds the listed values, `sparse_crow_indices` the row pointers
    (rows + 1), `sparse_col_indices` the column of each value; every other entry is the
    `pad_value` given to `to_numpy`.
    """

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TensorData:
        if self.shape is not None and any(d < 0 for d in self.shape):
            raise _error("shape", self.shape, "non-negative sizes")
        floats = bool(self.data) and isinstance(self.data[0], float)
        if self.dtype == "int64" and floats and not all(float(x).is_integer() for x in self.data):
            raise _error("data", "non-integral values", "integers for dtype int64")
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise _error("sparse_col_indices", self.sparse_col_indices, "set together with sparse_crow_indices")
        if self.sparse_crow_indices is None:
            if self.shape is not None and math.prod(self.shape) != len(self.data):
                raise ValueError(
                    f"shape {self.shape} holds {math.prod(self.shape)} values but data has {len(self.data)}"
                )
            return self
        crow, col = self.sparse_crow_indices, self.sparse_col_indices
        assert col is not None
        if self.shape is None or len(self.shape) != 2:
            raise _error("shape", self.shape, "2-D for a sparse CSR tensor")
        rows, cols = self.shape
        if len(crow) != rows + 1 or crow[0] != 0 or any(b < a for a, b in itertools.pairwise(crow)):
            raise _error("sparse_crow_indices", crow, f"{rows + 1} non-decreasing row pointers from 0")
        if not (crow[-1] == len(col) == len(self.data)):
            raise ValueError(
                f"sparse tensor lists {crow[-1]} values in sparse_crow_indices, {len(col)} in "
                f"sparse_col_indices and {len(self.data)} in data; they must agree"
            )
        if any(not 0 <= c < cols for c in col):
            raise _error("sparse_col_indices", col, f"column indices in [0, {cols})")
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype = _tensor_dtype_of(array)
        return cls(data=array.astype(_NUMPY_DTYPE[dtype]).ravel().tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_jax(cls, array: Any) -> TensorData:
        """From a `jax.Array` (bfloat16 and other floats widen to float32)."""
        host = np.asarray(array)
        if host.dtype.kind not in "fiu":  # ml_dtypes such as bfloat16 are kind "V"
            host = host.astype(np.float32)
        return cls.from_numpy(host)

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        """A new array of the tensor's dtype and shape; sparse entries not listed are `pad_value`."""
        np_dtype = _NUMPY_DTYPE[self.dtype]
        values = np.asarray(self.data, dtype=np_dtype)
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape) if self.shape is not None else values
        if isinstance(pad_value, bool) or not isinstance(pad_value, int | np.integer):
            raise _error("pad_value", pad_value, "an integer")
        assert self.shape is not None and self.sparse_col_indices is not None
        dense = np.full(self.shape, pad_value, dtype=np_dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))
        dense[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = values
        return dense

    def to_jax(self, pad_value: int = 0) -> Any:
        """As a `jax.Array` (int64 becomes int32 unless jax x64 is enabled)."""
        import jax.numpy as jnp  # lazy: clients and the service import this module without jax

        return jnp.asarray(self.to_numpy(pad_value))

    def tolist(self, pad_value: int = 0) -> list[Any]:
        return self.to_numpy(pad_value).tolist()


LossFnInputs = dict[str, TensorData]
LossFnOutput = dict[str, TensorData]

# The wire dtype of known loss inputs; any other key takes the dtype of its values.
_KEY_DTYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
}


def _to_tensor_data(key: str, value: Any) -> Any:
    """A loss input given as an array or a list becomes `TensorData` (what the SDK does)."""
    if isinstance(value, TensorData | dict):  # dict: the JSON form, validated by pydantic
        return value
    if not (isinstance(value, list | tuple) or hasattr(value, "__array__")):
        raise TypeError(f"loss_fn_inputs[{key!r}] must be TensorData, an array or a list, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ValueError(f"loss_fn_inputs[{key!r}] must be a rectangular numeric array") from exc
    if array.dtype.kind not in "fiub":
        raise ValueError(f"loss_fn_inputs[{key!r}] must be numeric, got dtype {array.dtype}")
    dtype = _KEY_DTYPE.get(key) or _tensor_dtype_of(array.astype(np.float32) if array.dtype.kind == "b" else array)
    if dtype == "int64" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise ValueError(f"loss_fn_inputs[{key!r}] must hold integers, got non-integral floats")
    return TensorData.from_numpy(array.astype(_NUMPY_DTYPE[dtype]))


class Datum(_Request):
    """One training sequence: the model input and the per-token tensors its loss needs.

    As in tinker, position i of every `loss_fn_inputs` tensor belongs to position i of
    `model_input` (which predicts `target_tokens[i]`), so each tensor's first dimension must
    equal `model_input.length`. Float inputs must be finite; token ids non-negative.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = {}

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_arrays(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: _to_tensor_data(key, v) for key, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> Datum:
        length = self.model_input.length
        if length == 0:
            raise _error("model_input", "an empty ModelInput", "at least one token")
        for key, tensor in self.loss_fn_inputs.items():
            field = f"loss_fn_inputs[{key!r}]"
            shape = tensor.shape if tensor.shape is not None else [len(tensor.data)]
            if not shape or shape[0] != length:
                raise ValueError(
                    f"{field} has shape {shape}; its first dimension must equal model_input.length {length}"
                )
            values = np.asarray(tensor.data, dtype=_NUMPY_DTYPE[tensor.dtype])
            if tensor.dtype == "float32" and not np.all(np.isfinite(values)):
                raise _error(field, "non-finite values", "finite")
            if key == "target_tokens":
                if tensor.dtype != "int64":
                    raise _error(field, tensor.dtype, "int64 token ids")
                if values.size and values.min() < 0:
                    raise _error(field, int(values.min()), "non-negative token ids")
        return self


# ---------------------------------------------------------------------------------------------
# Training configuration
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


class ForwardBackwardOutput(_Response):
    """Per-datum output tensors (e.g. `logprobs`) and scalar metrics (e.g. `loss:sum`)."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = {}


class OptimStepResponse(_Response):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(_Response):
    path: str
    type: Literal["save_weights"] | None = None


class SaveWeightsForSamplerResponse(_Response):
    path: str
    type: Literal["save_weights_for_sampler"] | None = None


class SaveWeightsForSamplerResponseInternal(_Response):
    """What the server returns: a path, or a sampling session id when no path was asked for."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class LoadWeightsResponse(_Response):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


class ModelData(_Response):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Response):
    type: Literal["get_info"] | None = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: AdamOptimizerConfig = AdamOptimizerConfig()
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class SupportedModel(_Response):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(_Response):
    supported_models: list[SupportedModel]


# ---------------------------------------------------------------------------------------------
# Checkpoints and training runs
# ---------------------------------------------------------------------------------------------


class Checkpoint(_Response):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


_PATH_SEGMENT_TYPE: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


class ParsedCheckpointTinkerPath(_Response):
    """`tinker://<run id>/<weights|sampler_weights|external_weights>/<name>`, taken apart."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        prefix = "tinker://"
        parts = tinker_path.removeprefix(prefix).split("/")
        if not tinker_path.startswith(prefix) or len(parts) != 3 or parts[1] not in _PATH_SEGMENT_TYPE:
            form = "tinker://<run id>/<weights|sampler_weights|external_weights>/<name>"
            raise _error("tinker_path", tinker_path, form)
        return cls(
            tinker_path=tinker_path,
            training_run_id=parts[0],
            checkpoint_type=_PATH_SEGMENT_TYPE[parts[1]],
            checkpoint_id=f"{parts[1]}/{parts[2]}",
        )


class Cursor(_Response):
    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(_Response):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(_Response):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(_Response):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoResponse(_Response):
    base_model: str
    optimizer_config: AdamOptimizerConfig = AdamOptimizerConfig()
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
