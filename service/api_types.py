"""The JSON request envelopes of the wire, as the SDK 0.38 sends them (`tinker/types/*_request.py`).

Only the envelopes live here; what they carry (`LoraConfig`, `AdamParams`, `ModelInput`,
`SamplingParams`, ...) and every response are `framework.types`, the one schema set shared with the
in-process client. Envelopes forbid unknown fields, as the SDK's `StrictBase` does, and bound every
number that reaches the store or the engine, so an absurd value is a 400 naming the field rather
than an overflow deeper down.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from framework import types

MAX_SAMPLES = 128  # num_samples of one sampling request
MAX_TOPK = 64
TEN_YEARS_S = 10 * 365 * 24 * 3600

SeqId = Annotated[int, Field(ge=0, le=2**62)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=160)]
Text = Annotated[str, StringConstraints(max_length=1024)]
Metadata = dict[Annotated[str, StringConstraints(max_length=256)], Any]
CheckpointName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:+=@-]+$")]
Ttl = Annotated[int, Field(ge=1, le=TEN_YEARS_S)]


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ClientConfigRequest(BaseModel):
    """Unknown fields are ignored here so that a newer SDK reaches the version check."""

    model_config = ConfigDict(extra="ignore")
    sdk_version: Annotated[str, StringConstraints(max_length=64)] = ""


class CreateSessionRequest(Envelope):
    tags: list[Annotated[str, StringConstraints(max_length=256)]] = Field(default=[], max_length=100)
    user_metadata: Metadata | None = None
    sdk_version: Annotated[str, StringConstraints(max_length=64)]
    project_id: Text | None = None
    display_name: Text | None = None
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(Envelope):
    session_id: Id
    type: Literal["session_heartbeat"] = "session_heartbeat"


class FinishReason(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["success", "errored", "interrupted"]


class FinishSessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reason: FinishReason
    detail: Annotated[str, StringConstraints(max_length=4096)] | None = None


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, StringConstraints(max_length=64)] = "adamw"

    @field_validator("type")
    @classmethod
    def _adamw(cls, value: str) -> str:
        if value != "adamw":
            raise ValueError(f"optimizer {value!r} is not supported; this server trains with 'adamw'")
        return value


class CreateModelRequest(Envelope):
    session_id: Id
    model_seq_id: SeqId
    base_model: Text
    user_metadata: Metadata | None = None
    lora_config: types.LoraConfig | None = None
    optimizer_config: OptimizerConfig = OptimizerConfig()
    type: Literal["create_model"] = "create_model"


class ModelIdRequest(Envelope):
    """`get_info` and `unload_model`."""

    model_id: Id
    type: Literal["get_info", "unload_model"] = "get_info"


class OptimStepRequest(Envelope):
    model_id: Id
    seq_id: SeqId | None = None
    adam_params: types.AdamParams | None = None
    optim_params: types.AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None
    type: Literal["optim_step"] = "optim_step"


class SaveWeightsRequest(Envelope):
    model_id: Id
    path: CheckpointName | None = None
    seq_id: SeqId | None = None
    ttl_seconds: Ttl | None = None
    overwrite: bool = False
    user_metadata: dict[Annotated[str, StringConstraints(max_length=256)], Text] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(Envelope):
    model_id: Id
    path: CheckpointName | None = None
    sampling_session_seq_id: SeqId | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: SeqId | None = None
    ttl_seconds: Ttl | None = None
    user_metadata: dict[Annotated[str, StringConstraints(max_length=256)], Text] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsRequest(Envelope):
    model_id: Id | None = None
    seq_id: SeqId | None = None
    session_id: Id | None = None
    model_seq_id: SeqId | None = None
    base_model: Text | None = None
    user_metadata: Metadata | None = None
    path: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: Text | None = None
    type: Literal["load_weights"] = "load_weights"


class CreateSamplingSessionRequest(Envelope):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Text | None = None
    model_path: Annotated[str, StringConstraints(max_length=2048)] | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SampleRequest(Envelope):
    num_samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] = 1
    prompt: types.ModelInput
    sampling_params: types.SamplingParams
    base_model: Text | None = None
    model_path: Annotated[str, StringConstraints(max_length=2048)] | None = None
    sampling_session_id: Id | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOPK)] = 0
    topk_sample_logprobs: Annotated[int, Field(ge=0, le=MAX_TOPK)] = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: Annotated[int, Field(ge=0)] = 0
    prompt_logprobs_last_n: Annotated[int, Field(ge=1, le=2**31)] | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"

    @field_validator("prompt")
    @classmethod
    def _token_range(cls, prompt: types.ModelInput) -> types.ModelInput:
        for j, chunk in enumerate(prompt.chunks):
            if chunk.tokens and max(chunk.tokens) >= 2**31:
                raise ValueError(f"chunks[{j}].tokens holds {max(chunk.tokens)}, far outside any vocabulary")
        return prompt

    @field_validator("sampling_params")
    @classmethod
    def _bounded(cls, params: types.SamplingParams) -> types.SamplingParams:
        if params.seed is not None and not 0 <= params.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {params.seed}")
        if params.max_tokens is not None and params.max_tokens > 2**31:
            raise ValueError(f"max_tokens must be at most 2^31, got {params.max_tokens}")
        if params.top_k > 2**31:
            raise ValueError(f"top_k must be at most 2^31, got {params.top_k}")
        if isinstance(params.stop, list) and len(params.stop) > 64:
            raise ValueError(f"stop holds {len(params.stop)} entries; at most 64")
        return params


class FutureRetrieveRequest(Envelope):
    request_id: Id
    allow_metadata_only: bool = False


class SamplingSessionTarget(Envelope):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: Id
    cloned_sampler_id: Annotated[int, Field(ge=0, le=2**31)] = 0


class FuturesRetrieveRequest(Envelope):
    target: SamplingSessionTarget
    prev_cursor: Annotated[int, Field(ge=0, le=2**62)] = 0
    timeout: Annotated[float, Field(ge=0, le=600)] | None = None
    retrieved_request_ids: list[Id] = Field(default=[], max_length=10000)


class CancelFutureRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    request_id: Id


class WeightsInfoRequest(Envelope):
    tinker_path: Annotated[str, StringConstraints(min_length=1, max_length=2048)]


class TtlRequest(Envelope):
    ttl_seconds: Ttl | None = None


class ForwardBackwardInput(Envelope):
    data: list[types.Datum]
    loss_fn: Annotated[str, StringConstraints(max_length=64)]
    loss_fn_config: dict[Annotated[str, StringConstraints(max_length=64)], float] | None = None


class ForwardBackwardJsonRequest(Envelope):
    """The JSON form of forward/backward (older SDKs; the 0.38 SDK sends protobuf)."""

    forward_backward_input: ForwardBackwardInput
    model_id: Id
    seq_id: SeqId | None = None
    type: Literal["forward_backward", "forward"] = "forward_backward"


# ------------------------------------------------------------------------------------ responses
class UntypedAPIFuture(BaseModel):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class CreateSessionResponse(BaseModel):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class CreateSamplingSessionResponse(BaseModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(BaseModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class GetSessionResponse(BaseModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None
