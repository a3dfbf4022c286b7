"""The client API (`ServiceClient`, `TrainingClient`, `SamplingClient`) and the types shared with the
official `tinker` SDK, over the in-process multi-adapter engine.

    from framework import ServiceClient, types
"""

from framework import types
from framework.client import APIFuture, SamplingClient, ServiceClient, TrainingClient
from framework.engine import EngineConfig

__all__ = ["APIFuture", "EngineConfig", "SamplingClient", "ServiceClient", "TrainingClient", "types"]
