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

Our additions to the SDK's shapes are few, optional, and listed in `EXTENSIONS`. The package's modules:
`data` (ModelInput, TensorData, Datum), `training`, `sampling`, `records` (weights, checkpoints, runs,
server info) over `_base` (the bases and the field checks).
"""

from __future__ import annotations

from framework.types._base import EXTENSIONS, CheckpointType, LossFnType, ModelID, StopReason, TensorDtype
from framework.types.data import (
    Datum,
    EncodedTextChunk,
    LossFnInputs,
    LossFnOutput,
    ModelInput,
    ModelInputChunk,
    TensorData,
)
from framework.types.records import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    ModelData,
    ParsedCheckpointTinkerPath,
    SaveWeightsForSamplerResponse,
    SaveWeightsForSamplerResponseInternal,
    SaveWeightsResponse,
    SupportedModel,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from framework.types.sampling import SampledSequence, SampleResponse, SamplingParams
from framework.types.training import (
    AdamOptimizerConfig,
    AdamParams,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepResponse,
)

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
