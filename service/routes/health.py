"""Health, the client's feature flags, what the server serves, telemetry and metrics.

`client/config` is the SDK's first request: its answer sets the SDK's transport and batching
flags, and this is where an SDK whose wire we do not speak is refused, naming both versions.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from framework import types
from service.api_types import ClientConfigRequest
from service.auth import Owner
from service.metrics import CONTENT_TYPE
from service.routes.common import State, check_sdk_version

router = APIRouter(prefix="/api/v1")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(req: ClientConfigRequest, owner: Owner, state: State) -> dict[str, Any]:
    check_sdk_version(req.sdk_version)
    config = state.config
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "use_pyqwest_transport": False,
        "parallel_fwdbwd_chunks": True,
        "proto_compress_fwdbwd": config.compress_fwdbwd,
        "sample_use_retrieve_futures": config.sample_use_retrieve_futures,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
        "sample_no_retries": False,
    }


@router.post("/client/dynamic_config")
async def client_dynamic_config(req: ClientConfigRequest, owner: Owner) -> dict[str, Any]:
    check_sdk_version(req.sdk_version)
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": True}


@router.get("/get_server_capabilities")
async def get_server_capabilities(owner: Owner, state: State) -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(supported_models=state.bridge.supported())


@router.post("/telemetry")
async def telemetry(request: Request, owner: Owner) -> dict[str, str]:
    """The SDK's telemetry batches: accepted and dropped (this server keeps its own logs)."""
    await request.body()
    return {"status": "accepted"}


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    state.metrics.futures_pending.set(state.futures.pending)
    state.metrics.seq_waiting.set(state.queues.waiting())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
