"""Records the service returns about weights, checkpoints, training runs and the server itself."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from framework.types._base import CheckpointType, ModelID, _error, _Response
from framework.types.training import AdamOptimizerConfig


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
