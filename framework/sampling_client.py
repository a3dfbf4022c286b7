"""`SamplingClient`: samples from one immutable snapshot (an adapter version, saved weights, or the base
model), as in the tinker SDK.

A client holds a reference to its snapshot for as long as it lives (released by `close()` or when
the client is garbage collected), and each queued request holds one more until it is done, so the
engine frees a snapshot exactly when nothing can use it again.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from framework import types
from framework.engine import LogprobsRequest, SampleJob, SampleResult, TopK
from framework.futures import APIFuture
from framework.validation import check_tokens

if TYPE_CHECKING:
    from framework.client import ServiceClient

MAX_TOPK_LOGPROBS = 64  # top-k logprobs per position: [rows, positions, k] floats come back to the host


class SamplingClient:
    """Samples from one immutable snapshot; every call returns an `APIFuture` at once."""

    def __init__(self, service: ServiceClient, base_model: str, snapshot_id: str, *, version: int | None):
        """Takes over one reference to `snapshot_id` that the caller acquired."""
        self.service = service
        self.base_model = base_model
        self.snapshot_id = snapshot_id
        self.version = version
        self._engine, self._scheduler = service._runtime.get(base_model)
        self._release = weakref.finalize(self, self._engine.release_snapshot, snapshot_id)

    def close(self) -> None:
        """Release the snapshot now (requests already queued still complete)."""
        self._release()

    def __enter__(self) -> SamplingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._release.alive:
            raise ValueError("this SamplingClient is closed; create a new one")

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0
               ) -> APIFuture[types.SampleResponse]:
        """`num_samples` continuations of `prompt`, each with its tokens' logprobs; with
        `topk_sample_logprobs=k` also the k most likely tokens at each sampled position, with
        `include_prompt_logprobs` / `topk_prompt_logprobs=k` the same for the prompt's tokens."""
        self._check_open()
        job = self._job(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                        topk_sample_logprobs)
        self._scheduler.wake()  # raises if the engine is shut down, before the request takes a reference
        future = self._engine.submit_sample(job)
        self._scheduler.wake()
        return APIFuture(future, to_sample_response)

    def _job(self, prompt, num_samples, params, include_prompt_logprobs, topk_prompt_logprobs, topk_sample_logprobs
             ) -> SampleJob:
        engine = self._engine
        if not isinstance(prompt, types.ModelInput):
            raise ValueError(f"prompt must be a ModelInput, got {type(prompt).__name__}")
        if not isinstance(params, types.SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        for name, k in (("topk_prompt_logprobs", topk_prompt_logprobs), ("topk_sample_logprobs", topk_sample_logprobs)):
            if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 0 <= k <= MAX_TOPK_LOGPROBS:
                raise ValueError(f"{name} must be an integer in [0, {MAX_TOPK_LOGPROBS}], got {k!r}")
        tokens = np.asarray(prompt.to_ints(), np.int64)
        check_tokens("prompt", tokens, engine.model_config.vocab_size)
        room = engine.max_seq_len - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, 512)
        if max_tokens > room:
            raise ValueError(f"sampling_params.max_tokens={max_tokens}: the prompt has {len(tokens)} tokens and the "
                             f"context is {engine.max_seq_len}, so at most {room} can be sampled")
        stop = params.stop
        stop_strings = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
        stop_tokens = [s for s in stop or [] if isinstance(s, int)] if not isinstance(stop, str) else []
        if stop is None:
            stop_tokens = list(engine.model_config.eos_token_ids)
        for t in stop_tokens:
            if t >= engine.model_config.vocab_size:
                raise ValueError(f"sampling_params.stop token {t} is outside the vocabulary")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        return SampleJob(snapshot_id=self.snapshot_id, prompt=tokens.astype(np.int32), num_samples=num_samples,
                         max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                         top_k=params.top_k, seed=seed, stop_tokens=tuple(stop_tokens),
                         stop_strings=tuple(stop_strings), prompt_logprobs=include_prompt_logprobs,
                         topk_prompt=min(topk_prompt_logprobs, engine.model_config.vocab_size),
                         topk_sample=min(topk_sample_logprobs, engine.model_config.vocab_size),
                         decode=self._decoder() if stop_strings else None)

    def _decoder(self) -> Callable[[list[int]], str]:
        tokenizer = self.service._runtime.tokenizer(self.base_model)
        return lambda ids: tokenizer.decode(ids)

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of `prompt` (None for the first)."""
        self._check_open()
        tokens = np.asarray(prompt.to_ints(), np.int64)
        check_tokens("prompt", tokens, self._engine.model_config.vocab_size)
        if len(tokens) > self._engine.max_seq_len:
            raise ValueError(f"prompt has {len(tokens)} tokens; the maximum is {self._engine.max_seq_len}")
        engine = self._engine
        engine.acquire_snapshot(self.snapshot_id)  # held until the request is done
        try:
            future = self._scheduler.submit(lambda reqs: engine.logprobs(reqs),
                                            LogprobsRequest(self.snapshot_id, tokens.astype(np.int32)),
                                            batch_key=("logprobs",), rows=1, tokens=len(tokens))
        except BaseException:
            engine.release_snapshot(self.snapshot_id)
            raise
        future.add_done_callback(lambda _: engine.release_snapshot(self.snapshot_id))
        return APIFuture(future, lambda lp: [None if np.isnan(x) else float(x) for x in lp])

    def get_tokenizer(self) -> Any:
        return self.service._runtime.tokenizer(self.base_model)

    def get_base_model(self) -> str:
        return self.base_model

    async def sample_async(self, *args: Any, **kwargs: Any) -> types.SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)


def to_sample_response(result: SampleResult) -> types.SampleResponse:
    sequences = [types.SampledSequence(stop_reason=s.stop_reason, tokens=s.tokens, logprobs=s.logprobs,
                                       topk_logprobs=None if s.topk is None else _topk_lists(s.topk),
                                       weights_version=result.version) for s in result.sequences]
    prompt_lp = None if result.prompt_logprobs is None else [
        None if np.isnan(x) else float(x) for x in result.prompt_logprobs]
    prompt_topk = None
    if result.prompt_topk is not None:
        prompt_topk = _topk_lists(result.prompt_topk)
        prompt_topk[0] = None  # nothing predicts the first token
    return types.SampleResponse(sequences=sequences, prompt_logprobs=prompt_lp, topk_prompt_logprobs=prompt_topk,
                                prompt_cache_hit_tokens=result.cached_prompt_tokens)


def _topk_lists(topk: TopK) -> list[list[tuple[int, float]] | None]:
    return [list(zip(ids, lps, strict=True)) for ids, lps in zip(topk.ids.tolist(), topk.logprobs.tolist(),
                                                                 strict=True)]
