"""The client API (`ServiceClient`, `TrainingClient`, `SamplingClient`) and the types shared with the
official `tinker` SDK, over the in-process multi-adapter engine.

    from framework import ServiceClient, types

`framework.remote.RemoteServiceClient` offers the same API against a server (`python -m service`).
"""

from framework import types
from framework.client import APIFuture, SamplingClient, ServiceClient, TrainingClient
from framework.engine import EngineConfig

__all__ = ["APIFuture", "EngineConfig", "SamplingClient", "ServiceClient", "TrainingClient", "types"]
