"""Training batches: the datums of one engine call laid out in rows, packed when that saves work.

Every datum belongs to one adapter group (the index of its adapter among the batch's adapters). Rows
are `T` tokens, T the longest datum rounded up to a length bucket (`shapes.length_bucket`, at least
`min_bucket`); the row count is rounded up to a power of two, so few shapes are ever compiled.

Packing puts several short datums into one row (first fit, longest first), in one of two ways:
- datums of one group per row, when that halves the row count or better. `groups [B]` then names
  each row's adapter and the LoRA update stays one batched matmul per row (each row gathers its
  adapter's weights);
- with `mix_cost`, datums of several groups per row (many tenants with a few short sequences each).
  `groups [B, T]` then names each token's adapter, and every token computes the low-rank products of
  every adapter of the batch, keeping its own (`lora.make_hook(..., one_hot=True)`): no per-row copies
  of adapter weights, at G times the LoRA FLOPs for G adapters. So rows mix only when that is cheaper:
  `rows_mixed · (1 + G·c) < rows · (1 + c)`, with `c = mix_cost` the LoRA FLOPs of one adapter per
  token relative to the base model's.
Attention never crosses datums (`segments`: the datum id of each token; the model masks across
ids) and positions restart at 0 for each datum, so a packed datum's logprobs, loss and gradient
equal the unpacked ones. In a mixed row, though, other tenants' values meet a zero weight (the masked
attention, the one-hot LoRA); a non-finite value there (a diverged adapter) would leak through `0 · inf`,
so the engine checks every result of a mixed batch and runs it again unmixed when one is not finite.

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
    groups: np.ndarray  # [B] int32 adapter group of each row, or [B, T] of each token when rows mix groups
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
        """Whether rows may hold several adapters' datums (`groups` per token)."""
        return self.groups.ndim == 2


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
           input_keys: Sequence[str], *, min_bucket: int, pack: bool, mix_cost: float | None = None) -> Batch:
    """The rows for `datums` (datum i of adapter group `groups[i]`, with its request's loss config);
    with `mix_cost`, rows may hold several groups' datums when that is cheaper (module docstring)."""
    lengths = [len(d.tokens) for d in datums]
    t = length_bucket(max(lengths), min_bucket)
    rows: list[list[int]] = [[i] for i in range(len(datums))]
    mixed = False
    if pack and len(datums) > 1:
        packed: list[list[int]] = []
        for g in dict.fromkeys(groups):
            members = [i for i in range(len(datums)) if groups[i] == g]
            packed += [[members[j] for j in b] for b in _first_fit([lengths[i] for i in members], t)]
        if bucket(len(packed)) < bucket(len(rows)):
            rows = packed
        if mix_cost is not None and len(set(groups)) > 1:
            shared = _first_fit(lengths, t)
            g = bucket(len(set(groups)))
            if bucket(len(shared)) * (1 + g * mix_cost) < bucket(len(rows)) * (1 + mix_cost):
                rows, mixed = shared, True
    is_packed = any(len(r) > 1 for r in rows)
    b, d = bucket(len(rows)), bucket(len(datums))
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    segments = np.full((b, t), -1, np.int32)
    datum_ids = np.full((b, t), d, np.int32)
    token_groups = np.zeros((b, t), np.int32)
    inputs = {k: np.zeros((b, t), np.int32 if k == "target_tokens" else np.float32) for k in input_keys}
    inputs["mask"] = np.zeros((b, t), np.float32)
    config = {k: np.zeros((b, t), np.float32) for k in (configs[0] if configs else {})}
    placement: list[tuple[int, int, int]] = [(0, 0, 0)] * len(datums)
    for r, members in enumerate(rows):
        start = 0
        token_groups[r] = groups[members[0]]
        for i in members:
            n, datum = lengths[i], datums[i]
            span = slice(start, start + n)
            token_groups[r, span] = groups[i]
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
            start += n
    return Batch(tokens, positions, segments if is_packed else None, token_groups if mixed else token_groups[:, 0],
                 inputs, config, datum_ids, d, placement)
