"""`create_app(config)`: the FastAPI application, its start-up and shut-down.

Start-up, before the first request is accepted (so `/api/v1/healthz` answering means ready): open
and migrate the database; fail, with a message saying why, every future a previous run of the
server left pending (they died with it); load every served base model. Shut-down fails the
futures still pending and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from framework import EngineConfig
from service import errors, maintenance
from service import store as st
from service.bridge import BadInput, Bridge
from service.config import ServerConfig
from service.futures import FutureRegistry
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.ordering import SeqQueues
from service.routes import ROUTERS
from service.routes.common import OPENAPI_MODELS
from service.state import ServerState, first_seq

log = logging.getLogger(__name__)

RESTARTED = ("the server restarted while this request was in flight, and its work was lost; "
             "submit it again (saved checkpoints are intact)")


def build_state(config: ServerConfig, metrics: Metrics) -> ServerState:
    store = st.Store(config.db_url)
    failed = store.fail_pending_futures(RESTARTED)
    if failed:
        log.warning("failed %d futures left pending by a previous run", failed)
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    bridge = Bridge(config.base_models, home=config.checkpoint_dir.absolute(),
                    engine_config=config.engine or EngineConfig(), snapshots_per_model=config.snapshots_per_model)

    def on_done(entry: Any) -> None:
        if entry.finished is not None:
            metrics.future_seconds.labels(entry.kind, entry.status).observe(entry.finished - entry.created)

    futures = FutureRegistry(store, hold_s=config.poll_hold_s, keep_s=config.future_keep_s, on_done=on_done)
    queues = SeqQueues(gap_timeout_s=config.seq_gap_timeout_s, first_seq=lambda key: first_seq(store, key))
    state = ServerState(config=config, store=store, bridge=bridge, futures=futures, queues=queues, metrics=metrics)
    metrics.watch_engine(bridge.metrics)
    return state


def create_app(config: ServerConfig) -> FastAPI:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(config, metrics)
        await asyncio.get_running_loop().run_in_executor(state.bridge.pool, state.bridge.load)
        app.state.server = state
        app.state.store = state.store
        task = asyncio.create_task(maintenance.run_forever(state), name="maintenance")
        log.info("ready", extra={"fields": {"models": sorted(state.bridge.models), "db": config.db_url}})
        try:
            yield
        finally:
            task.cancel()
            state.futures.fail_all_pending("the server is shutting down; submit the request again once it is back")
            state.bridge.close()
            state.store.close()

    app = FastAPI(title="tinker-jax", version="0.1.0", lifespan=lifespan,
                  description="A self-hosted server for the tinker SDK's training and sampling API.")
    errors.install(app)

    @app.exception_handler(BadInput)
    async def _bad_input(request: Any, error: BadInput) -> Any:
        return errors.error_response(400, error.message)

    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body=config.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the body models of the routes that parse their bodies themselves (the
    numbered training requests, and forward/backward's protobuf-or-JSON body)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in OPENAPI_MODELS:
            extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(extra.pop("$defs", {}))
            components[model.__name__] = extra
        app.openapi_schema = schema
    return app.openapi_schema
