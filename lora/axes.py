"""Logical axis names of the adapter bank and of one adapter's weights (see `models.axes`).

A target's `A [L, S, d_in, R]` and `B [L, S, R, d_out]` carry the logical axis of the base
kernel's input and output dimension (`embed`, `heads`, `mlp`, ...), so the rules that split a
frozen kernel split its adapter the same way, and the low-rank product needs no other collective
than the kernel's. Slot, rank and layer axes are named too (the rules keep them whole by default).
"""

from __future__ import annotations

from models.axes import PROJECTION_AXES, LogicalAxes

LAYERS = "layers"
SLOT = "slot"
RANK = "rank"


def weight_axes(target: str, key: str, *, slots: bool) -> LogicalAxes:
    """Axes of `A` (`key="a"`) or `B` (`key="b"`) of `target`, with the slot axis when `slots`."""
    d_in, d_out = PROJECTION_AXES[target]
    axes = (d_in, RANK) if key == "a" else (RANK, d_out)
    return (LAYERS, *((SLOT,) if slots else ()), *axes)


SCALES_AXES: LogicalAxes = (SLOT,)
"""Axes of `LoraBank.scales [S]`."""
