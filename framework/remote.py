"""The remote client: the same `ServiceClient` / `TrainingClient` / `SamplingClient` surface as the
in-process one, served by a tinker-jax server (or any server the tinker SDK speaks to).

    from framework.remote import RemoteServiceClient
    service = RemoteServiceClient(base_url="http://gpu-host:8000", api_key="tml-...")
    trainer = service.create_lora_training_client(base_model="/ckpt/Qwen3-0.6B", rank=32)

It is a thin adapter over the official `tinker` SDK rather than a second implementation of the wire:
the SDK already does sessions, heartbeats, seq_id numbering, retries, protobuf and long-polling, and
the server is tested against it. What this module adds is the translation between the SDK's types
and `framework.types` (the ones recipes build), so recipe code is the same in-process and remote:
requests go out as SDK types and results come back as ours, as `framework.APIFuture`s.

Differences from in-process, all small: `forward_backward_custom` runs the user's loss here, between a
forward and a weighted backward on the server (two round trips, as in the SDK); checkpoint paths are
`tinker://` paths; a sampler-weights checkpoint is fetched with `download_checkpoint` (this server's
`/archive` endpoint). The SDK is imported lazily, so in-process users never load it.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framework import types
from framework.futures import APIFuture
from framework.training_client import forward_backward_two_pass


class ServerUnavailable(ConnectionError):
    """Nothing healthy answers at the base URL (checked up front: the SDK would retry for minutes)."""


def _check_up(base_url: str) -> None:
    import httpx

    try:
        response = httpx.get(f"{base_url}/api/v1/healthz", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ServerUnavailable(f"no tinker server answers at {base_url} ({error}); start one with "
                                "`python -m service --base-model <path>` or fix client.base_url") from None


def _sdk() -> Any:
    import tinker

    return tinker


def _to_sdk_datum(datum: types.Datum) -> Any:
    sdk = _sdk().types
    return sdk.Datum(model_input=sdk.ModelInput.from_ints(datum.model_input.to_ints()),
                     loss_fn_inputs={key: np.asarray(t.to_numpy()) for key, t in datum.loss_fn_inputs.items()})


def _to_sdk_params(params: types.SamplingParams) -> Any:
    return _sdk().types.SamplingParams(**params.model_dump())


def _from_sdk_output(out: Any) -> types.ForwardBackwardOutput:
    outputs = [{key: types.TensorData.from_numpy(np.asarray(t.to_numpy())) for key, t in o.items()}
               for o in out.loss_fn_outputs]
    return types.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type, loss_fn_outputs=outputs,
                                       metrics=dict(out.metrics))


def _from_sdk_sample(out: Any) -> types.SampleResponse:
    sequences = [types.SampledSequence(stop_reason=s.stop_reason, tokens=list(s.tokens), logprobs=s.logprobs,
                                       sequence_id=s.sequence_id, topk_logprobs=s.topk_logprobs)
                 for s in out.sequences]
    return types.SampleResponse(sequences=sequences, prompt_logprobs=out.prompt_logprobs,
                                topk_prompt_logprobs=out.topk_prompt_logprobs,
                                prompt_cache_hit_tokens=out.prompt_cache_hit_tokens)


def _wrap(sdk_future: Any, convert: Callable[[Any], Any] | None = None) -> APIFuture:
    return APIFuture(sdk_future.future(), convert)


def _pydantic(cls: type) -> Callable[[Any], Any]:
    return lambda value: cls.model_validate(value.model_dump())


def _local_tokenizer(*candidates: str | None) -> Any:
    """The tokenizer of the first candidate that is a local directory (None when none is)."""
    from models import load_tokenizer

    for candidate in candidates:
        if candidate and os.path.isdir(candidate):
            return load_tokenizer(candidate)
    return None


class RemoteServiceClient:
    """Creates training and sampling clients on a remote server. `api_key` defaults to `$TINKER_API_KEY`;
    `tokenizer_path` is a local directory to load tokenizers from when the server's is not local."""

    def __init__(self, base_url: str, api_key: str | None = None, *, tokenizer_path: str | None = None):
        self.base_url = base_url.rstrip("/")
        _check_up(self.base_url)
        self._api_key = api_key or os.environ.get("TINKER_API_KEY")
        self.tokenizer_path = tokenizer_path
        self.sdk = _sdk().ServiceClient(base_url=self.base_url, api_key=self._api_key)
        self._rest: Any = None

    @property
    def rest(self) -> Any:
        """The SDK's RestClient (made on first use: making one already talks to the server)."""
        if self._rest is None:
            self._rest = _sdk().RestClient(base_url=self.base_url, api_key=self._api_key)
        return self._rest

    def __enter__(self) -> RemoteServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sdk.close("success").result()

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return _pydantic(types.GetServerCapabilitiesResponse)(self.rest.get_server_capabilities().result())

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None) -> RemoteTrainingClient:
        client = self.sdk.create_lora_training_client(
            base_model=base_model, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
            train_unembed=train_unembed, user_metadata=user_metadata).result()
        return RemoteTrainingClient(self, client)

    def create_training_client_from_state(self, path: str, user_metadata: dict[str, str] | None = None
                                          ) -> RemoteTrainingClient:
        client = self.sdk.create_training_client_from_state(path, user_metadata=user_metadata).result()
        return RemoteTrainingClient(self, client)

    def create_training_client_from_state_with_optimizer(self, path: str, user_metadata: dict[str, str] | None = None
                                                         ) -> RemoteTrainingClient:
        client = self.sdk.create_training_client_from_state_with_optimizer(path, user_metadata=user_metadata).result()
        return RemoteTrainingClient(self, client)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None
                               ) -> RemoteSamplingClient:
        sampler = self.sdk.create_sampling_client(model_path=model_path, base_model=base_model).result()
        return RemoteSamplingClient(self, sampler)

    def delete_checkpoint(self, tinker_path: str) -> None:
        self.rest.delete_checkpoint_from_tinker_path(tinker_path).result()

    def download_checkpoint(self, tinker_path: str, destination: str | os.PathLike[str]) -> Path:
        """Fetch a checkpoint's files into `destination` (created): e.g. sampler weights as a PEFT adapter."""
        import httpx

        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        run, checkpoint = parsed.training_run_id, parsed.checkpoint_id
        url = f"{self.base_url}/api/v1/training_runs/{run}/checkpoints/{checkpoint}/archive"
        response = httpx.get(url, headers={"X-API-Key": self._api_key or ""}, timeout=600)
        response.raise_for_status()
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:*") as archive:
            archive.extractall(destination, filter="data")
        return destination

    def tokenizer(self, info: types.GetInfoResponse | None, base_model: str | None) -> Any:
        data = info.model_data if info is not None else None
        local = _local_tokenizer(data.tokenizer_id if data else None, base_model, self.tokenizer_path)
        if local is None:
            raise ValueError(f"no local tokenizer for {base_model!r}: pass tokenizer_path=<a local directory with "
                             "the model's tokenizer files>")
        return local


class RemoteTrainingClient:
    """One LoRA adapter on the server. Every method returns a `framework.APIFuture` at once."""

    def __init__(self, service: RemoteServiceClient, client: Any):
        self.service = service
        self.sdk = client
        self.model_id = client.model_id
        self._info = _pydantic(types.GetInfoResponse)(client.get_info())
        self.base_model = self._info.model_data.model_name

    def forward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                loss_fn_config: dict[str, float] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        return _wrap(self.sdk.forward([_to_sdk_datum(d) for d in data], loss_fn, loss_fn_config), _from_sdk_output)

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: dict[str, float] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        return _wrap(self.sdk.forward_backward([_to_sdk_datum(d) for d in data], loss_fn, loss_fn_config),
                     _from_sdk_output)

    def forward_backward_custom(self, data: Sequence[types.Datum],
                                loss_fn: Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, Any]]]
                                ) -> APIFuture[types.ForwardBackwardOutput]:
        """A user loss of the per-token logprobs: a forward on the server, the loss and its gradient with
        respect to the logprobs here (JAX), then a backward on the server weighted by that gradient."""
        return forward_backward_two_pass(self, list(data), loss_fn)

    def optim_step(self, adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        adam = adam_params or types.AdamParams()
        return _wrap(self.sdk.optim_step(_sdk().types.AdamParams(**adam.model_dump())),
                     _pydantic(types.OptimStepResponse))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        return _wrap(self.sdk.save_state(name, ttl_seconds=ttl_seconds, overwrite=overwrite,
                                         user_metadata=user_metadata), _pydantic(types.SaveWeightsResponse))

    # The SDK's public load_state* are deprecated wrappers of `_load_state_impl` that log an error on every
    # call; the recipes' resume path uses create_training_client_from_state_with_optimizer instead.
    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return _wrap(self.sdk._load_state_impl(path, optimizer=False, weights_access_token=None),
                     _pydantic(types.LoadWeightsResponse))

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return _wrap(self.sdk._load_state_impl(path, optimizer=True, weights_access_token=None),
                     _pydantic(types.LoadWeightsResponse))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return _wrap(self.sdk.save_weights_for_sampler(name, ttl_seconds=ttl_seconds, user_metadata=user_metadata),
                     _pydantic(types.SaveWeightsForSamplerResponse))

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> RemoteSamplingClient:
        if name is not None:
            self.save_weights_for_sampler(name).result()
        return RemoteSamplingClient(self.service, self.sdk.save_weights_and_get_sampling_client().result())

    def create_sampling_client(self, model_path: str) -> RemoteSamplingClient:
        return self.service.create_sampling_client(model_path=model_path)

    def get_info(self) -> types.GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> Any:
        return self.service.tokenizer(self._info, self.base_model)


class RemoteSamplingClient:
    """Samples from weights on the server (a snapshot, saved sampler weights, or the base model)."""

    def __init__(self, service: RemoteServiceClient, client: Any):
        self.service = service
        self.sdk = client
        self.base_model = client.get_base_model()

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0
               ) -> APIFuture[types.SampleResponse]:
        sdk_prompt = _sdk().types.ModelInput.from_ints(prompt.to_ints())
        future = self.sdk.sample(sdk_prompt, num_samples, _to_sdk_params(sampling_params),
                                 include_prompt_logprobs=include_prompt_logprobs,
                                 topk_prompt_logprobs=topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs)
        return _wrap(future, _from_sdk_sample)

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        return _wrap(self.sdk.compute_logprobs(_sdk().types.ModelInput.from_ints(prompt.to_ints())), list)

    def get_tokenizer(self) -> Any:
        return self.service.tokenizer(None, self.base_model)

    def get_base_model(self) -> str:
        return self.base_model
