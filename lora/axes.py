"""Logical axis names of the adapter bank and of one adapter's weights (see `models.axes`).

A target's `A [L, S, d_in, R]` and `B [L, S, R, d_out]` name their model dimensions after the
base kernel's (`adapter_embed`, `adapter_heads`, `adapter_mlp`, ...: `adapter_axis(axis)`), so the
rules can split them like the kernel *and* further: adapter weights are trained, so their gradient
buffer and AdamW moments must shard over `fsdp` too (ZeRO-3), also where the kernel's dimension is
only split over `tp` (heads, MLP width, vocabulary). Slot, rank and layer axes are named too (the
rules keep them whole by default).
"""

from __future__ import annotations

from models.axes import EMBED, HEADS, KV_HEADS, MLP, PROJECTION_AXES, VOCAB, LogicalAxes

LAYERS = "layers"
SLOT = "slot"
RANK = "rank"


def adapter_axis(axis: str) -> str:
    """The logical axis of an adapter dimension that matches the kernel dimension `axis`."""
    return f"adapter_{axis}"


ADAPTER_AXES: dict[str, str] = {axis: adapter_axis(axis) for axis in (EMBED, HEADS, KV_HEADS, MLP, VOCAB)}


def weight_axes(target: str, key: str, *, slots: bool) -> LogicalAxes:
    """Axes of `A` (`key="a"`) or `B` (`key="b"`) of `target`, with the slot axis when `slots`."""
    d_in, d_out = (ADAPTER_AXES[a] for a in PROJECTION_AXES[target])
    axes = (d_in, RANK) if key == "a" else (RANK, d_out)
    return (LAYERS, *((SLOT,) if slots else ()), *axes)


SCALES_AXES: LogicalAxes = (SLOT,)
"""Axes of `LoraBank.scales [S]`."""
