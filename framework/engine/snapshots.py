"""Sampler snapshots: immutable published weights, alive while something refers to them, and the
sampler bank that holds the ones being sampled.

- A snapshot is one adapter version (`adapter@vN`), weights loaded from disk (`file:<path>`), or
  the base model (`base`, permanent). Its weights are device arrays shared with whatever produced
  them (publishing copies nothing: engine writes never modify arrays in place).
- Lifetimes are reference counts: a `SamplingClient`, a name the service keeps, a queued or running
  request each hold one (`acquire` / `release`). `release` only queues the decrement (a
  `SimpleQueue`, safe in a garbage collector's finalizer on any thread, even one that holds the
  registry's lock); every locked operation applies the queued ones first. At zero the snapshot is
  dropped, its bank slot reclaimed and its prefix-cache entries purged (`drain_freed` tells the
  engine's worker which), so memory follows what is referenced, never the number of publishes.
- The sampler bank is a fixed `[L, S, d, R]` device cache of `sampler_slots` snapshots (slot 0 is the
  base model, all zeros). `place(ids)` loads snapshots into slots (LRU among unpinned slots);
  slots that decoding rows use are pinned. Weights must be finite: a decode step multiplies every
  slot into every row (`lora.make_hook`), so one tenant's NaN would reach every row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lora import LoraBank, LoraWeights

BASE = "base"
NULL_SLOT = 0


@dataclasses.dataclass
class Snapshot:
    snapshot_id: str
    adapter_id: str | None  # None: the base model or weights loaded from disk
    version: int
    weights: LoraWeights | None  # None: the base model
    scale: float
    refs: int = 0

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in jax.tree.leaves(self.weights)) if self.weights is not None else 0


class NoFreeSlot(RuntimeError):
    """Every sampler bank slot is pinned by rows still decoding; the request waits for one."""


def require_finite(weights: LoraWeights, what: str, hint: str) -> None:
    if not all(bool(jnp.isfinite(w).all()) for w in jax.tree.leaves(weights)):
        raise ValueError(f"{what} has non-finite weights (NaN or inf); {hint}")


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_slot(weights: LoraWeights, scales: jax.Array, slot: jax.Array, adapter: LoraWeights, scale: jax.Array):
    weights = jax.tree.map(lambda w, a: w.at[:, slot].set(a.astype(w.dtype)), weights, adapter)
    return weights, scales.at[slot].set(scale)


class SnapshotRegistry:
    """Every live snapshot of one engine, and the sampler bank."""

    def __init__(self, bank: LoraBank, place: Callable[[LoraBank], LoraBank] = lambda bank: bank):
        """`place` keeps the bank in its sharding after a slot write (`Placement.bank`)."""
        self._place = place
        self._lock = threading.Lock()
        self._releases: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._snapshots: dict[str, Snapshot] = {BASE: Snapshot(BASE, None, 0, None, 0.0, refs=1)}
        self._freed: list[str] = []
        self.bank = bank
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self._pins: collections.Counter[int] = collections.Counter()
        self.slot_loads = 0

    # ------------------------------------------------------------------------------ lifetimes
    def _apply_releases(self) -> None:
        """Apply the queued decrements (with the lock held)."""
        while True:
            try:
                snapshot_id = self._releases.get_nowait()
            except queue.Empty:
                return
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None or snapshot_id == BASE:
                continue
            snapshot.refs -= 1
            if snapshot.refs <= 0:
                del self._snapshots[snapshot_id]
                self._freed.append(snapshot_id)

    def add(self, snapshot: Snapshot) -> Snapshot:
        """Register `snapshot` holding one reference for the caller; if its id is already live, take
        a reference to the live one instead (same id = same weights)."""
        with self._lock:
            self._apply_releases()
            live = self._snapshots.get(snapshot.snapshot_id)
            if live is not None:
                live.refs += 1
                return live
            snapshot.refs = 1
            self._snapshots[snapshot.snapshot_id] = snapshot
            return snapshot

    def acquire(self, snapshot_id: str) -> Snapshot:
        with self._lock:
            self._apply_releases()
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is not None:
                snapshot.refs += 1
                return snapshot
        raise KeyError(f"unknown sampler snapshot {snapshot_id!r} (never published, or released)")

    def try_acquire(self, snapshot_id: str) -> Snapshot | None:
        try:
            return self.acquire(snapshot_id)
        except KeyError:
            return None

    def release(self, snapshot_id: str) -> None:
        """Drop one reference (any thread, finalizers included: this never blocks)."""
        self._releases.put(snapshot_id)

    def get(self, snapshot_id: str) -> Snapshot:
        with self._lock:
            self._apply_releases()
            snapshot = self._snapshots.get(snapshot_id)
        if snapshot is None:
            raise KeyError(f"unknown sampler snapshot {snapshot_id!r} (never published, or released)")
        return snapshot

    def __contains__(self, snapshot_id: object) -> bool:
        with self._lock:
            self._apply_releases()
            return snapshot_id in self._snapshots

    def __len__(self) -> int:
        with self._lock:
            self._apply_releases()
            return len(self._snapshots)

    def live_bytes(self) -> int:
        with self._lock:
            self._apply_releases()
            snapshots = list(self._snapshots.values())
        return sum(s.nbytes for s in snapshots)

    def drain_freed(self) -> list[str]:
        """Snapshots freed since the last call (worker side: purge their bank slots and caches)."""
        with self._lock:
            self._apply_releases()
            freed, self._freed = self._freed, []
        for snapshot_id in freed:  # a freed snapshot has no running rows (they hold references): no pins
            self._slot_of.pop(snapshot_id, None)
        return freed

    # ---------------------------------------------------------------------------- sampler bank
    @property
    def num_slots(self) -> int:
        return self.bank.num_slots - 1

    def place(self, snapshot_ids: Sequence[str]) -> dict[str, int]:
        """Load the snapshots into bank slots (worker only); raises `NoFreeSlot` if they do not fit
        beside the pinned ones (nothing is evicted then)."""
        wanted = [s for s in dict.fromkeys(snapshot_ids) if s != BASE]
        missing = [s for s in wanted if s not in self._slot_of]
        taken = set(self._slot_of.values())
        free = [s for s in range(1, self.bank.num_slots) if s not in taken]
        evictable = [sid for sid, slot in self._slot_of.items() if self._pins[slot] == 0 and sid not in wanted]
        if len(missing) > len(free) + len(evictable):
            raise NoFreeSlot(f"{len(missing)} snapshots need a sampler slot; {len(free) + len(evictable)} are free")
        slots = {BASE: NULL_SLOT}
        for sid in missing:
            snapshot = self.get(sid)
            slot = free.pop() if free else self._slot_of.pop(evictable.pop(0))
            weights, scales = _write_slot(self.bank.weights, self.bank.scales, jnp.int32(slot), snapshot.weights,
                                          jnp.float32(snapshot.scale))
            self.bank = self._place(LoraBank(weights, scales))
            self._slot_of[sid] = slot
            self.slot_loads += 1
        for sid in wanted:
            self._slot_of.move_to_end(sid)
            slots[sid] = self._slot_of[sid]
        return slots

    def pin(self, slot: int, count: int = 1) -> None:
        self._pins[slot] += count

    def unpin(self, slot: int, count: int = 1) -> None:
        self._pins[slot] -= count
        if self._pins[slot] <= 0:
            del self._pins[slot]
