"""The REST API under `/api/v1`, one module per area:

- `health`: healthz, client config, server capabilities, telemetry, metrics
- `sessions`: sessions, heartbeats, finishing, listing
- `models`: create_model, get_info, unload_model, and creating a model from a checkpoint
- `training`: forward / forward_backward, optim_step
- `weights`: save_weights, save_weights_for_sampler, load_weights into an existing model
- `sampling`: sampling sessions, samplers, asample
- `futures`: retrieve_future (long-poll), retrieve_futures, cancel_future
- `checkpoints`: training runs, checkpoint listing / deletion / publishing / TTL, weights_info
"""

from __future__ import annotations

from fastapi import APIRouter

from service.routes import checkpoints, futures, health, models, sampling, sessions, training, weights

ROUTERS: list[APIRouter] = [health.router, sessions.router, models.router, training.router, weights.router,
                            sampling.router, futures.router, checkpoints.router]
