"""Sampling sessions and `asample`.

A sampling session (`<session>:sample:<n>`) samples from the base model, from saved sampler weights
(`tinker://…/sampler_weights/…`), from a training checkpoint (`tinker://…/weights/…`: its weights
are published as a snapshot), or from a snapshot of a live model (made by
`save_weights_for_sampler` without a name). Samples are not ordered by seq_id: they read immutable
weights, so they run as soon as the engine can batch them.

`asample` answers with one `sample_sequence_ids` entry per requested sample (the SDK asserts it) and
its result is a protobuf `SampleResponse`. Beyond `max_pending_samples` queued samples it answers
429, which makes the SDK back off and resubmit.
"""

from __future__ import annotations

from fastapi import APIRouter

from framework import types
from service import store as st
from service import wire
from service.api_types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    SampleRequest,
    UntypedAPIFuture,
)
from service.auth import Owner
from service.errors import BadRequest, Busy
from service.futures import Payload
from service.routes.common import State, queued
from service.state import ServerState

router = APIRouter(prefix="/api/v1")


async def ensure_sampler(state: ServerState, row: st.SamplerRow) -> None:
    """Make sure the sampler exists on the engine (after a restart, rebuilt from what it was made of)."""
    if state.bridge.sampler(row.id) is not None:
        return
    async with state.lock(row.id):
        if state.bridge.sampler(row.id) is not None:
            return
        base = state.base_model(row.base_model)
        if row.model_path is not None:
            checkpoint = state.checkpoint(row.owner, row.model_path)
            if checkpoint.kind == "sampler":
                await state.bridge.blocking(state.bridge.sampler_from_weights, row.id, checkpoint.disk_path, base)
            else:
                await state.bridge.blocking(state.bridge.sampler_from_state, row.id, checkpoint.disk_path)
        elif row.source_model_id is not None:
            raise BadRequest(f"sampling_session_id: {row.id!r} sampled an in-memory snapshot of {row.source_model_id}"
                             " that is gone (the server restarted, the session finished, or the model published "
                             f"{state.bridge.snapshots_per_model} newer ones since); make a new sampling client")
        else:
            state.bridge.sampler_for_base(row.id, base)


@router.post("/create_sampling_session")
async def create_sampling_session(req: CreateSamplingSessionRequest, owner: Owner, state: State
                                  ) -> CreateSamplingSessionResponse:
    session = state.open_session(owner, req.session_id)
    sampler_id = f"{session.id}:sample:{req.sampling_session_seq_id}"
    existing = state.store.get(st.SamplerRow, sampler_id)
    if existing is not None:
        if (existing.model_path, existing.base_model) == (req.model_path, req.base_model or existing.base_model):
            return CreateSamplingSessionResponse(sampling_session_id=sampler_id)  # a retry
        raise BadRequest(f"sampling_session_seq_id: sampling session {sampler_id!r} already exists")
    if req.model_path is not None:
        checkpoint = state.checkpoint(owner, req.model_path)
        base = state.base_model(checkpoint.base_model)
        if req.base_model is not None and state.base_model(req.base_model).path != base.path:
            raise BadRequest(f"base_model: {req.base_model!r} differs from the checkpoint's {checkpoint.base_model!r}")
    elif req.base_model is not None:
        base = state.base_model(req.base_model)
    else:
        raise BadRequest("model_path: give model_path (tinker://...) or base_model")
    row = st.SamplerRow(id=sampler_id, session_id=session.id, owner=owner, base_model=req.base_model or base.name,
                        model_path=req.model_path, created_at=st.utcnow())
    state.store.add(row)
    try:
        await ensure_sampler(state, row)
    except Exception:
        state.store.delete_sampler(sampler_id)
        raise
    return CreateSamplingSessionResponse(sampling_session_id=sampler_id)


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, owner: Owner, state: State) -> GetSamplerResponse:
    row = state.sampler(owner, sampler_id)
    return GetSamplerResponse(sampler_id=row.id, base_model=row.base_model, model_path=row.model_path)


def _unsupported(req: SampleRequest) -> str | None:
    if req.target_prompt_logprobs is not None:
        return "target_prompt_logprobs: not supported by this server"
    if req.prompt_alt_tokens_k:
        return "prompt_alt_tokens_k: not supported by this server"
    if req.record_stability_info:
        return ("record_stability_info: not supported by this server (it serves the losses cross_entropy, "
                "importance_sampling, ppo, cispo, dro; stable_reinforce is not one of them)")
    if req.prompt_logprobs_last_n is not None:
        if not req.prompt_logprobs:
            return "prompt_logprobs_last_n: needs prompt_logprobs"
        if req.prompt_logprobs_last_n > max(1, req.prompt.length - 1):
            return (f"prompt_logprobs_last_n: must be between 1 and len(prompt) - 1 = {req.prompt.length - 1}, "
                    f"got {req.prompt_logprobs_last_n}")
    return None


def _last_n(out: types.SampleResponse, n: int | None) -> types.SampleResponse:
    """Keep the prompt logprobs (and top-k rows) of the last `n` prompt tokens only."""
    if n is None:
        return out
    update: dict = {}
    if out.prompt_logprobs is not None:
        cut = len(out.prompt_logprobs) - n
        update["prompt_logprobs"] = [None] * cut + list(out.prompt_logprobs[cut:])
    if out.topk_prompt_logprobs is not None:
        cut = len(out.topk_prompt_logprobs) - n
        update["topk_prompt_logprobs"] = [None] * cut + list(out.topk_prompt_logprobs[cut:])
    return out.model_copy(update=update)


@router.post("/asample")
async def asample(req: SampleRequest, owner: Owner, state: State) -> UntypedAPIFuture:
    if req.sampling_session_id is None:
        raise BadRequest("sampling_session_id: required; create one with create_sampling_session (SDK: "
                         "create_sampling_client / save_weights_and_get_sampling_client)")
    problem = _unsupported(req)
    if problem:
        raise BadRequest(problem)
    row = state.sampler(owner, req.sampling_session_id)
    if req.seq_id is not None:
        existing = state.store.future_for_seq(sampler_id=row.id, seq_id=req.seq_id)
        if existing is not None:
            entry = state.futures.get(existing.id, owner)
            if entry is not None:
                return queued(entry, sample_sequence_ids=[f"{entry.id}:{i}" for i in range(req.num_samples)])
    if state.futures.pending_of_kind("sample") >= state.config.max_pending_samples:
        raise Busy(f"{state.config.max_pending_samples} samples are queued; retry shortly")
    await ensure_sampler(state, row)
    api = state.bridge.sample(row.id, req.prompt, req.num_samples, req.sampling_params,
                              prompt_logprobs=bool(req.prompt_logprobs), topk_prompt=req.topk_prompt_logprobs,
                              topk_sample=req.topk_sample_logprobs)
    entry = state.futures.create(owner, "sample", sampler_id=row.id, seq_id=req.seq_id)
    entry.cancel = api.future.cancel
    last_n, topk_prompt, topk_sample = req.prompt_logprobs_last_n, req.topk_prompt_logprobs, req.topk_sample_logprobs

    async def work() -> Payload:
        out = _last_n(await state.bridge.result(api), last_n)
        body = await state.bridge.blocking(lambda: wire.encode_sample_response(
            out, topk_prompt=topk_prompt, topk_sample=topk_sample))
        return Payload("proto", body, kind="sample")

    state.futures.run(entry, work)
    return queued(entry, sample_sequence_ids=[f"{entry.id}:{i}" for i in range(req.num_samples)])

