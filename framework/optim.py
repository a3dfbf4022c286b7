"""Per-adapter AdamW (optax) over one bank slot, with every hyperparameter a traced value.

`optax.inject_hyperparams` keeps learning rate, betas, eps and weight decay in the optimizer state,
so a schedule that changes them every step never recompiles. Global-norm clipping (tinker's
`grad_clip_norm`, 0 = off) is applied first. The optimizer sees only one adapter's weights
(`[L, d_in, R]` / `[L, R, d_out]` per target), so weight decay and moments are confined to the slot
being stepped; zero-padded rank columns and untrained targets have zero gradient and zero weight and
so stay exactly zero. That needs `eps > 0`, as Adam's update there is 0 / (0 + eps): an `eps` below
`EPS_FLOOR` (0, which `AdamParams` accepts, or anything XLA may flush to zero once it folds the bias
correction 1 - beta1 into the denominator) is raised to it. The floor is too small to change the
update wherever the second moment is non-zero: the square root of a non-zero float32 is at least ~4e-23.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from lora.bank import LoraWeights

EPS_FLOOR = 1e-30
"""The smallest `eps` used (module docstring); stays a normal float32 when scaled by 1 - beta1 >= 6e-8."""


class AdamHyperparams(NamedTuple):
    """Traced AdamW settings (fp32 scalars: host values until a step takes them)."""

    learning_rate: ArrayLike
    beta1: ArrayLike
    beta2: ArrayLike
    eps: ArrayLike
    weight_decay: ArrayLike
    grad_clip_norm: ArrayLike  # <= 0 disables clipping

    @classmethod
    def make(cls, learning_rate: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-12,
             weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> AdamHyperparams:
        # numpy, not jnp: six device arrays per optim_step cost ~1 ms of dispatch on the caller's thread
        return cls(*(np.float32(v) for v in (learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)))


def _adamw() -> optax.GradientTransformationExtraArgs:
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.0, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0
    )


def init_opt_state(params: LoraWeights) -> Any:
    """Fresh AdamW state for one adapter."""
    return _adamw().init(params)


def adamw_step(
    params: LoraWeights, grads: LoraWeights, opt_state: Any, hp: AdamHyperparams
) -> tuple[LoraWeights, Any, dict[str, jax.Array]]:
    """One AdamW update; returns new params, new state and metrics (grad norm before clipping)."""
    grad_norm = optax.tree.norm(grads)
    clip = jnp.where((hp.grad_clip_norm > 0) & (grad_norm > hp.grad_clip_norm),
                     hp.grad_clip_norm / jnp.maximum(grad_norm, 1e-30), 1.0)
    grads = jax.tree.map(lambda g: g * clip.astype(g.dtype), grads)
    eps = jnp.maximum(hp.eps, EPS_FLOOR)  # never 0 / 0 on a zero gradient (module docstring)
    hyper = {"learning_rate": hp.learning_rate, "b1": hp.beta1, "b2": hp.beta2, "eps": eps,
             "weight_decay": hp.weight_decay}
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **hyper})
    updates, opt_state = _adamw().update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": grad_norm, "update_norm": optax.tree.norm(updates)}
