"""Training batches: the datums of one engine call laid out in rows, packed when that saves work.

Every datum belongs to one adapter group (the index of its adapter among the batch's adapters). Rows
are `T` tokens, T the longest datum rounded up to a length bucket (`shapes.length_bucket`, at least
`min_bucket`); the row count is rounded up to a power of two, so few shapes are ever compiled.

Packing puts several short datums into one row (first fit, longest first), in one of two ways:
- datums of one group per row, when that halves the row count or better. `groups [B]` then names
  each row's adapter and the LoRA update stays one batched matmul per row;
- with `mix`, datums of several groups per row, when that takes fewer rows still (many tenants with
  a few short sequences each). A row is then cut into K equal chunks (`chunks_per_row`); every datum
  starts on a chunk, so a chunk holds one datum at most, and `groups [B, K]` names each chunk's
  adapter (`lora.make_hook` applies it chunk by chunk: the same FLOPs, K times the gathers).
Attention never crosses datums (`segments`: the datum id of each token; the model masks across
ids) and positions restart at 0 for each datum, so a packed datum's logprobs, loss and gradient
equal the unpacked ones. In a mixed row, though, another tenant's datum sits behind a mask that
multiplies by zero; a non-finite value there (a diverged adapter) would leak through `0 · inf`, so
the engine checks every result of a mixed batch and runs it again unmixed when one is not finite.

Losses are sums over tokens, so the compiled step evaluates them per token and sums by datum
(`datum_ids`, with id `num_datums` for padding): per-datum losses and metrics come back whatever
the layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from framework.engine.requests import DatumArrays
from framework.engine.shapes import bucket, length_bucket


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [B, T] int32, restarting at 0 for every datum
    segments: np.ndarray | None  # [B, T] int32 datum id per token (-1 on padding); None when unpacked
    groups: np.ndarray  # [B] int32 adapter group of each row, or [B, K] of each chunk when rows mix groups
    inputs: dict[str, np.ndarray]  # [B, T] per loss input, plus `mask` (1.0 on real tokens)
    config: dict[str, np.ndarray]  # [B, T] per loss config key (the datum's request's value)
    datum_ids: np.ndarray  # [B, T] int32, `num_datums` on padding
    num_datums: int  # a power of two ≥ the number of datums
    placement: list[tuple[int, int, int]]  # (row, start, length) of each datum, in input order

    @property
    def packed(self) -> bool:
        return self.segments is not None

    @property
    def mixed(self) -> bool:
        """Whether rows hold several adapters' datums (`groups` per chunk)."""
        return self.groups.ndim == 2


MAX_CHUNKS_PER_ROW = 16
MIN_CHUNK = 16


def chunks_per_row(t: int) -> int:
    """K for rows of `t` tokens that mix adapters: a power of two ≤ 16 with chunks of ≥ 16 tokens
    (`t` is a length bucket, so K divides it); 1 for rows too short to cut."""
    return 1 << (max(1, min(MAX_CHUNKS_PER_ROW, t // MIN_CHUNK)).bit_length() - 1)


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length ≤ capacity, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def layout(groups: Sequence[int], datums: Sequence[DatumArrays], configs: Sequence[Mapping[str, float]],
           input_keys: Sequence[str], *, min_bucket: int, pack: bool, mix: bool = False) -> Batch:
    """The rows for `datums` (datum i of adapter group `groups[i]`, with its request's loss config);
    `mix`: rows may hold several groups' datums when that takes fewer rows."""
    lengths = [len(d.tokens) for d in datums]
    t = length_bucket(max(lengths), min_bucket)
    rows: list[list[int]] = [[i] for i in range(len(datums))]
    chunks = 1  # per row, when rows mix groups
    if pack and len(datums) > 1:
        packed: list[list[int]] = []
        for g in dict.fromkeys(groups):
            members = [i for i in range(len(datums)) if groups[i] == g]
            packed += [[members[j] for j in b] for b in _first_fit([lengths[i] for i in members], t)]
        if bucket(len(packed)) < bucket(len(rows)):
            rows = packed
        if mix and len(set(groups)) > 1 and chunks_per_row(t) > 1:
            chunk = t // chunks_per_row(t)
            mixed = _first_fit([-(-n // chunk) for n in lengths], chunks_per_row(t))
            if bucket(len(mixed)) < bucket(len(rows)):
                rows, chunks = mixed, chunks_per_row(t)
    is_packed = any(len(r) > 1 for r in rows)
    b, d = bucket(len(rows)), bucket(len(datums))
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    segments = np.full((b, t), -1, np.int32)
    datum_ids = np.full((b, t), d, np.int32)
    row_groups = np.zeros((b, chunks), np.int32)
    inputs = {k: np.zeros((b, t), np.int32 if k == "target_tokens" else np.float32) for k in input_keys}
    inputs["mask"] = np.zeros((b, t), np.float32)
    config = {k: np.zeros((b, t), np.float32) for k in (configs[0] if configs else {})}
    placement: list[tuple[int, int, int]] = [(0, 0, 0)] * len(datums)
    chunk = t // chunks
    for r, members in enumerate(rows):
        start = 0
        row_groups[r] = groups[members[0]]
        for i in members:
            n, datum = lengths[i], datums[i]
            span = slice(start, start + n)
            row_groups[r, start // chunk: -(-(start + n) // chunk)] = groups[i]
            tokens[r, span] = datum.tokens
            positions[r, span] = np.arange(n)
            segments[r, span] = i
            datum_ids[r, span] = i
            inputs["mask"][r, span] = 1.0
            for k in input_keys:
                inputs[k][r, span] = datum.inputs[k]
            for k, v in configs[i].items():
                config[k][r, span] = v
            placement[i] = (r, start, n)
            start += n if chunks == 1 else -(-n // chunk) * chunk
    return Batch(tokens, positions, segments if is_packed else None, row_groups if chunks > 1 else row_groups[:, 0],
                 inputs, config, datum_ids, d, placement)
