"""The client API (`ServiceClient`, `TrainingClient`, `SamplingClient`) and the types shared with the
official `tinker` SDK, over the in-process multi-adapter engine.

    from framework import ServiceClient, types

`framework.remote.RemoteServiceClient` offers the same API against a server (`python -m service`).
"""

from framework import types
from framework.client import ServiceClient
from framework.engine import EngineConfig
from framework.futures import APIFuture
from framework.sampling_client import SamplingClient
from framework.training_client import TrainingClient

__all__ = ["APIFuture", "EngineConfig", "SamplingClient", "ServiceClient", "TrainingClient", "types"]
