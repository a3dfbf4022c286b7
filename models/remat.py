"""Rematerialisation of decoder layers: which activations a training step keeps for the backward pass.

A layer's backward needs its intermediate activations (normed inputs, q/k/v, attention
probabilities, MLP gate/up, ...). Keeping all of them costs memory linear in layers × tokens;
`jax.checkpoint` around each layer keeps only what the policy saves and recomputes the rest
during the backward pass (one more forward of the layer). Policies, by name:

- `none`: no checkpoint, everything is kept (fastest; the CPU default);
- `full`: keep only each layer's input, recompute the whole layer (least memory);
- `dots`: keep the projection outputs (matmuls without batch dimensions: q/k/v/o, gate/up/down
  and the LoRA products), recompute the attention scores and the elementwise work — on
  accelerators most of the memory saving for a fraction of the recompute.

The choice is a static argument of `Transformer.hidden_states` / `__call__`; gradients are the
same whatever the policy (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_NAMES: tuple[str, ...] = ("none", *REMAT_POLICIES)


def checkpointed(fn: Callable[..., jax.Array], remat: str) -> Callable[..., jax.Array]:
    """`fn` under the rematerialisation policy named `remat` (`fn` itself for `none`)."""
    if remat == "none":
        return fn
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_NAMES)}, got {remat!r}")
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat])
