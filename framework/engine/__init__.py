"""The engine of one base model: adapters (paged between device and host), sampler snapshots,
compiled training steps with packing, and a continuous-batching decode loop with a prefix cache.

    client → scheduler → Engine (core) → adapters / snapshots / training / decode → lora → models
"""

from framework.engine.adapters import AdapterPool, AdapterState
from framework.engine.config import EngineConfig
from framework.engine.core import Engine
from framework.engine.requests import (
    CustomLossRequest,
    DatumArrays,
    ForwardRequest,
    ForwardResult,
    LogprobsRequest,
    OptimRequest,
    OptimResult,
    SampledRow,
    SampleJob,
    SampleResult,
    TopK,
)
from framework.engine.shapes import bucket
from framework.engine.snapshots import BASE, NoFreeSlot, Snapshot

__all__ = [
    "BASE",
    "AdapterPool",
    "AdapterState",
    "CustomLossRequest",
    "DatumArrays",
    "Engine",
    "EngineConfig",
    "ForwardRequest",
    "ForwardResult",
    "LogprobsRequest",
    "NoFreeSlot",
    "OptimRequest",
    "OptimResult",
    "SampleJob",
    "SampleResult",
    "SampledRow",
    "Snapshot",
    "TopK",
    "bucket",
]
