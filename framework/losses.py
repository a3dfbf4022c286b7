"""tinker's built-in losses as pure JAX functions over padded batches, selected by name.

Each loss maps the current model's logprobs of the target tokens, `target_logprobs[B, T]`, and
the datum inputs (each `[B, T]`, padded) to a per-row loss `[B]` plus per-row metrics. What to
know:

- tinker's convention: a loss is a SUM over tokens, weighted by `weights` or `advantages`;
  dividing by a token count is the caller's job. The formulas are those of
  https://tinker-docs.thinkingmachines.ai/tinker/losses (one page per loss), with the
  `loss_fn_config` defaults of tinker-cookbook `tutorials/202_loss_functions.py`.
- The caller adds `mask[B, T]` (1.0 on real positions, 0.0 on padding) to `inputs`. Padding may
  hold anything (garbage, -inf, NaN): every operand is zeroed there first, so nothing from a
  padded position reaches the loss, the metrics or the gradient.
- Config values may be Python floats, scalar arrays, or `[B]` arrays (one value per row), so
  rows of one packed batch can carry different requests' configs without a recompile.
- Losses that take sampler logprobs also report the sampler-vs-trainer logprob gap per row
  (`logprob_gap_sum`, `logprob_gap_max`, `logprob_gap_count`). The gap skips positions where both
  the sampler logprob and the advantage are exactly 0: that is how tinker-cookbook fills prompt
  positions, which were never sampled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "LossSpec", "check_loss_inputs", "get_loss"]

Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Mapping[str, jax.Array], Mapping[str, float | jax.Array]], tuple[jax.Array, Metrics]]

REQUIRED = None
"""A config default of `REQUIRED` means the caller must give the key."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss: its function, the `loss_fn_inputs` keys it reads, its config keys and defaults."""

    name: str
    fn: LossFn
    input_keys: tuple[str, ...]
    config_defaults: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    check_config: Callable[[dict[str, float]], None] | None = None
    """Raises ValueError naming the key if a resolved config value is out of range."""


def _row(value: float | jax.Array, like: jax.Array) -> jax.Array:
    """A scalar, or a `[B]` array made `[B, 1]` so it broadcasts over the time axis."""
    value = jnp.asarray(value, dtype=like.dtype)
    return value[:, None] if value.ndim == 1 else value


def _clean(target_logprobs: jax.Array, inputs: Mapping[str, jax.Array], *keys: str) -> tuple[jax.Array, ...]:
    """(valid[B, T], target_logprobs, *inputs[keys]) with every padded position set to 0.

    Zeroing the operands, not just the products, keeps padding out of the gradient too:
    `where(valid, f(x), 0)` still back-propagates 0 * f'(x), which is NaN if f'(x) is.
    """
    valid = inputs["mask"] > 0
    return valid, *(jnp.where(valid, x, 0.0) for x in (target_logprobs, *(inputs[k] for k in keys)))


def _gap_metrics(valid: jax.Array, log_ratio: jax.Array, sampler_logprobs: jax.Array, advantages: jax.Array) -> Metrics:
    """Per row: sum, max and count of |log p_theta - log q| over sampled positions."""
    sampled = valid & ((sampler_logprobs != 0) | (advantages != 0))
    gap = jnp.where(sampled, jnp.abs(jax.lax.stop_gradient(log_ratio)), 0.0)
    return {
        "logprob_gap_sum": gap.sum(axis=-1),
        "logprob_gap_max": gap.max(axis=-1),
        "logprob_gap_count": sampled.sum(axis=-1).astype(log_ratio.dtype),
    }


def cross_entropy(target_logprobs, inputs, config):
    """-sum_t weights_t * log p_theta(x_t)."""
    del config
    _, logprobs, weights = _clean(target_logprobs, inputs, "weights")
    return -(weights * logprobs).sum(axis=-1), {}


def importance_sampling(target_logprobs, inputs, config):
    """-sum_t (p_theta / q)(x_t) * A_t."""
    del config
    valid, logprobs, sampler, advantages = _clean(target_logprobs, inputs, "logprobs", "advantages")
    log_ratio = logprobs - sampler
    loss = -(jnp.exp(log_ratio) * advantages).sum(axis=-1)
    return loss, _gap_metrics(valid, log_ratio, sampler, advantages)


def ppo(target_logprobs, inputs, config):
    """-sum_t min(r_t * A_t, clip(r_t, low, high) * A_t), r = p_theta / q."""
    valid, logprobs, sampler, advantages = _clean(target_logprobs, inputs, "logprobs", "advantages")
    log_ratio = logprobs - sampler
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, _row(config["clip_low_threshold"], ratio), _row(config["clip_high_threshold"], ratio))
    objective = jnp.minimum(ratio * advantages, clipped * advantages)
    return -objective.sum(axis=-1), _gap_metrics(valid, log_ratio, sampler, advantages)


def cispo(target_logprobs, inputs, config):
    """-sum_t sg(clip(r_t, low, high)) * log p_theta(x_t) * A_t (sg: stop gradient)."""
    valid, logprobs, sampler, advantages = _clean(target_logprobs, inputs, "logprobs", "advantages")
    log_ratio = logprobs - sampler
    ratio = jnp.exp(log_ratio)
    low, high = _row(config["clip_low_threshold"], ratio), _row(config["clip_high_threshold"], ratio)
    coefficient = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
    loss = -(coefficient * logprobs * advantages).sum(axis=-1)
    return loss, _gap_metrics(valid, log_ratio, sampler, advantages)


def dro(target_logprobs, inputs, config):
    """-sum_t [log p_theta(x_t) * A_t - beta/2 * (log p_theta(x_t) - log q(x_t))^2]."""
    valid, logprobs, sampler, advantages = _clean(target_logprobs, inputs, "logprobs", "advantages")
    log_ratio = logprobs - sampler
    objective = logprobs * advantages - 0.5 * _row(config["beta"], logprobs) * jnp.square(log_ratio)
    return -objective.sum(axis=-1), _gap_metrics(valid, log_ratio, sampler, advantages)


def _check_clip(config: dict[str, float]) -> None:
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if low < 0:
        raise ValueError(f"loss_fn_config['clip_low_threshold'] must be >= 0, got {low}")
    if high < low:
        raise ValueError(f"loss_fn_config['clip_high_threshold'] ({high}) must be >= clip_low_threshold ({low})")


def _check_beta(config: dict[str, float]) -> None:
    if config["beta"] < 0:
        raise ValueError(f"loss_fn_config['beta'] must be >= 0, got {config['beta']}")


_POLICY_INPUTS = ("target_tokens", "logprobs", "advantages")

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", cross_entropy, ("target_tokens", "weights")),
        LossSpec("importance_sampling", importance_sampling, _POLICY_INPUTS),
        LossSpec("ppo", ppo, _POLICY_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _check_clip),
        LossSpec("cispo", cispo, _POLICY_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, _check_clip),
        # tinker documents `beta` for dro but not its default, so we ask for it.
        LossSpec("dro", dro, _POLICY_INPUTS, {"beta": REQUIRED}, _check_beta),
    )
}


def get_loss(name: str) -> LossSpec:
    """The loss called `name`; a ValueError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss_fn {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def check_loss_inputs(
    name: str, provided_keys: Iterable[str], config: Mapping[str, object] | None = None
) -> dict[str, float]:
    """Check a request against the loss's spec and return its config with defaults filled in.

    Raises ValueError naming: an unknown loss, missing `loss_fn_inputs` keys, unknown or
    missing config keys, and config values that are not finite numbers or out of range.
    Extra input keys are allowed and ignored (tinker's own examples send `weights` to RL losses).
    """
    spec = get_loss(name)
    missing = sorted(set(spec.input_keys) - set(provided_keys))
    if missing:
        raise ValueError(f"loss_fn {name!r} needs loss_fn_inputs {missing}; it reads {list(spec.input_keys)}")
    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.config_defaults))
    if unknown:
        accepted = sorted(spec.config_defaults) or "none"
        raise ValueError(f"loss_fn {name!r} does not take loss_fn_config keys {unknown}; it takes {accepted}")
    resolved: dict[str, float] = {}
    for key, default in spec.config_defaults.items():
        value = config.get(key, default)
        if value is REQUIRED:
            raise ValueError(f"loss_fn {name!r} needs loss_fn_config[{key!r}]")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        resolved[key] = float(value)
    if spec.check_config is not None:
        spec.check_config(resolved)
    return resolved
