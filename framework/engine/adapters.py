"""Adapter residency: every training adapter's state, on the device or paged out to host memory.

One adapter (`AdapterState`) is its LoRA weights laid out for the engine (`{target: {"a": [L, d_in, R],
"b": [L, R, d_out]}}`, zero-padded to the engine's max rank and targets), its AdamW state (created at
its first optim_step), its accumulated gradients (created by its first forward_backward, dropped by
optim_step), its step count and its version. Nothing is sized by the number of adapters: a batch
stacks the weights of the adapters it uses, so a step costs what its adapters need.

- Device residency is a cache of `capacity` adapters: `ensure_resident(ids)` pages in what a batch
  needs and pages out the least recently used others. Paging is an exact `jax.device_get` /
  device-put round trip of every array the adapter owns, so an evicted-then-restored adapter
  continues bit for bit, and a user never sees a "no free slot" error while host memory lasts.
- Versions never lie: every write to an adapter's weights (an optim_step, a state load, an import)
  bumps its version; sampler snapshots are keyed by (adapter, version).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

from lora import LoraWeights


@dataclasses.dataclass
class AdapterState:
    adapter_id: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    seed: int
    weights: LoraWeights  # device arrays when resident, host numpy when paged out
    opt_state: Any | None = None  # AdamW state; None until the first optim_step
    grads: LoraWeights | None = None  # accumulated since the last optim_step; None when there are none
    step: int = 0  # optimizer steps applied
    version: int = 0  # bumped by every write to the weights
    accumulated: int = 0  # forward_backward calls since the last optim_step
    resident: bool = True
    last_used: int = 0
    incarnation: int = 0  # distinguishes adapters created under a reused id (snapshot ids include it)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdapterPool:
    """The adapters of one engine, by id, with at most `capacity` of them on the device."""

    def __init__(self, capacity: int, to_device: Callable[[LoraWeights, Any, LoraWeights | None], tuple]):
        """`to_device(weights, opt_state, grads)` places a paged-out adapter's host arrays back on the
        device(s) (`framework.engine.placement.Placement.adapter_state`)."""
        self.capacity = capacity
        self._to_device = to_device
        self._adapters: dict[str, AdapterState] = {}
        self._clock = itertools.count(1)
        self.page_ins = 0
        self.page_outs = 0
        self.page_in_seconds = 0.0

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._adapters

    def __iter__(self):
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __getitem__(self, adapter_id: str) -> AdapterState:
        return self.get(adapter_id)

    def get(self, adapter_id: str) -> AdapterState:
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise KeyError(f"unknown adapter {adapter_id!r} (never created, or released)") from None

    def items(self) -> Iterable[tuple[str, AdapterState]]:
        return self._adapters.items()

    def add(self, adapter: AdapterState) -> AdapterState:
        if adapter.adapter_id in self._adapters:
            raise ValueError(f"adapter_id {adapter.adapter_id!r} already exists")
        self._adapters[adapter.adapter_id] = adapter
        adapter.resident = True
        adapter.last_used = next(self._clock)
        self._make_room(keep={adapter.adapter_id})
        return adapter

    def remove(self, adapter_id: str) -> AdapterState:
        return self._adapters.pop(self.get(adapter_id).adapter_id)

    def ensure_resident(self, adapter_ids: Iterable[str]) -> list[AdapterState]:
        """The adapters, all on the device (paging in as needed, and out the least recently used others).
        A batch that needs more than `capacity` adapters holds them all until the next call."""
        adapters = [self.get(a) for a in dict.fromkeys(adapter_ids)]
        for adapter in adapters:
            adapter.last_used = next(self._clock)
        incoming = [a for a in adapters if not a.resident]
        if incoming:  # all the evictions in one transfer, then all the arrivals in one wait
            self._make_room(keep={a.adapter_id for a in adapters}, incoming=len(incoming))
            self._page_in(incoming)
        return adapters

    def is_resident(self, adapter_id: str) -> bool:
        """Whether the adapter is on the device now (False for an unknown one)."""
        adapter = self._adapters.get(adapter_id)
        return adapter is not None and adapter.resident

    @property
    def resident_count(self) -> int:
        # list() of a dict view runs in C under the GIL: safe while the worker adds or removes adapters
        return sum(a.resident for a in list(self._adapters.values()))

    def _make_room(self, keep: set[str], incoming: int = 0) -> None:
        resident = sorted((a for a in self._adapters.values() if a.resident and a.adapter_id not in keep),
                          key=lambda a: a.last_used)
        excess = self.resident_count + incoming - self.capacity
        self._page_out(resident[:max(0, excess)])

    def _page_out(self, adapters: list[AdapterState]) -> None:
        if not adapters:
            return
        states = jax.device_get([(a.weights, a.opt_state, a.grads) for a in adapters])
        for adapter, (weights, opt_state, grads) in zip(adapters, states, strict=True):
            adapter.weights, adapter.opt_state, adapter.grads = weights, opt_state, grads
            adapter.resident = False
        self.page_outs += len(adapters)

    def _page_in(self, adapters: list[AdapterState]) -> None:
        t0 = time.perf_counter()
        # The transfers start together; nothing changes until all have landed, so a failed one (e.g. out of
        # device memory) leaves every adapter paged out with its host copy.
        states = jax.block_until_ready([self._to_device(a.weights, a.opt_state, a.grads) for a in adapters])
        for adapter, (weights, opt_state, grads) in zip(adapters, states, strict=True):
            adapter.weights, adapter.opt_state, adapter.grads = weights, opt_state, grads
            adapter.resident = True
        self.page_ins += len(adapters)
        self.page_in_seconds += time.perf_counter() - t0
