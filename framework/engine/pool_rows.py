"""Host-side state of the decode pool: the requests in flight (`Running`) and what each KV-cache row
holds (`PoolRows`, numpy arrays the decode loop reads and writes between compiled chunks)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import numpy as np

from framework.engine.requests import SampledRow, SampleJob
from framework.engine.snapshots import Snapshot


@dataclasses.dataclass
class Running:
    """A request in flight: which of its samples are done, which rows hold the others."""

    job: SampleJob
    future: Future
    snapshot: Snapshot
    submitted: float
    results: list[SampledRow | None]
    next_sample: int = 0  # samples [0, next_sample) have been admitted
    cached_tokens: int = 0
    prompt_logprobs: np.ndarray | None = None  # what the prefix cache knows of the prompt's (NaN elsewhere)
    started: bool = False  # its future was marked running (at its first admission)
    settled: bool = False  # its future is resolved and its snapshot reference released

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.results)


@dataclasses.dataclass
class PoolRows:
    """Host-side state of the pool's rows (numpy, one entry per row)."""

    owner: list[Running | None]
    sample: np.ndarray  # int32: the sample index of the row's request
    active: np.ndarray  # bool
    counts: np.ndarray  # int32: tokens emitted so far
    budget: np.ndarray  # int32
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    slot: np.ndarray  # int32: sampler bank slot
    key_data: np.ndarray  # uint32 [R, 2]
    stop: np.ndarray  # int32 [R, M], -1 padded
    tokens: list[list[int]]
    logprobs: list[list[float]]
    topk_ids: list[list[np.ndarray]]
    topk_logprobs: list[list[np.ndarray]]
    prompt_len: np.ndarray  # int32

    @classmethod
    def empty(cls, rows: int, stop_width: int) -> PoolRows:
        return cls(owner=[None] * rows, sample=np.zeros(rows, np.int32), active=np.zeros(rows, bool),
                   counts=np.zeros(rows, np.int32), budget=np.zeros(rows, np.int32),
                   temperature=np.ones(rows, np.float32), top_p=np.ones(rows, np.float32),
                   top_k=np.full(rows, -1, np.int32), slot=np.zeros(rows, np.int32),
                   key_data=np.zeros((rows, 2), np.uint32), stop=np.full((rows, stop_width), -1, np.int32),
                   tokens=[[] for _ in range(rows)], logprobs=[[] for _ in range(rows)],
                   topk_ids=[[] for _ in range(rows)], topk_logprobs=[[] for _ in range(rows)],
                   prompt_len=np.zeros(rows, np.int32))

    def take(self, index: list[int], rows: int, stop_width: int) -> PoolRows:
        """Rows `index` moved to positions 0.. of a pool of `rows` rows."""
        out = PoolRows.empty(rows, stop_width)
        for new, old in enumerate(index):
            out.owner[new] = self.owner[old]
            for name in ("sample", "active", "counts", "budget", "temperature", "top_p", "top_k", "slot", "key_data",
                         "prompt_len"):
                getattr(out, name)[new] = getattr(self, name)[old]
            width = min(stop_width, self.stop.shape[1])
            out.stop[new, :width] = self.stop[old, :width]
            for name in ("tokens", "logprobs", "topk_ids", "topk_logprobs"):
                getattr(out, name)[new] = getattr(self, name)[old]
        return out

    def free(self) -> list[int]:
        return [r for r, owner in enumerate(self.owner) if owner is None]
