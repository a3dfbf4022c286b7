"""`framework.losses` against NumPy transcriptions of tinker's documented formulas, on padded
batches whose padding holds garbage; gradients; PPO clipping; the registry's errors."""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import losses, types

B, T = 4, 9
LENGTHS = [9, 5, 1, 7]


def _batch(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random target logprobs and inputs; padded positions hold NaN / inf / huge values."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
    target = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    sampler = (target + rng.normal(0.0, 0.4, (B, T))).astype(np.float32)
    sampler[0, :2] = 0.0  # prompt positions as tinker-cookbook fills them: logprob 0, advantage 0
    advantages = rng.normal(0.0, 1.0, (B, T)).astype(np.float32)
    advantages[0, :2] = 0.0
    advantages[3, 3] = 0.0  # a sampled token with zero advantage still counts in the gap metrics
    weights = rng.uniform(0.0, 1.0, (B, T)).astype(np.float32)
    pad = mask == 0
    target[pad], sampler[pad], advantages[pad], weights[pad] = -np.inf, np.nan, 1e30, np.nan
    inputs = {"mask": mask, "logprobs": sampler, "advantages": advantages, "weights": weights}
    return target, inputs


def _reference(name: str, target: np.ndarray, inputs: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """The formulas of https://tinker-docs.thinkingmachines.ai/tinker/losses, row by row, in float64."""
    out = np.zeros(B)
    for b, n in enumerate(LENGTHS):
        lp = target[b, :n].astype(np.float64)
        q = inputs["logprobs"][b, :n].astype(np.float64)
        adv = inputs["advantages"][b, :n].astype(np.float64)
        ratio = np.exp(lp - q)
        if name == "cross_entropy":
            out[b] = -(lp * inputs["weights"][b, :n]).sum()
        elif name == "importance_sampling":
            out[b] = -(ratio * adv).sum()
        elif name == "ppo":
            clipped = np.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
            out[b] = -np.minimum(ratio * adv, clipped * adv).sum()
        elif name == "cispo":
            clipped = np.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
            out[b] = -(clipped * lp * adv).sum()
        elif name == "dro":
            out[b] = -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    return out


CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
    ("dro", {"beta": 0.05}),
]


@pytest.mark.parametrize(("name", "user_config"), CASES)
def test_loss_matches_the_documented_formula(name: str, user_config: dict) -> None:
    target, inputs = _batch()
    config = losses.check_loss_inputs(name, ["target_tokens", *inputs], user_config)
    loss, metrics = jax.jit(losses.get_loss(name).fn)(jnp.asarray(target), inputs, config)
    assert loss.shape == (B,)
    np.testing.assert_allclose(np.asarray(loss), _reference(name, target, inputs, config), rtol=1e-5, atol=1e-5)
    for value in metrics.values():
        assert value.shape == (B,) and np.all(np.isfinite(np.asarray(value)))


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo", "dro"])
def test_sampler_gap_metrics(name: str) -> None:
    target, inputs = _batch(1)
    config = losses.check_loss_inputs(name, ["target_tokens", *inputs], {"beta": 0.1} if name == "dro" else {})
    _, metrics = losses.get_loss(name).fn(jnp.asarray(target), inputs, config)
    for b, n in enumerate(LENGTHS):
        sampled = (inputs["logprobs"][b, :n] != 0) | (inputs["advantages"][b, :n] != 0)
        gap = np.abs(target[b, :n] - inputs["logprobs"][b, :n])[sampled]
        np.testing.assert_allclose(metrics["logprob_gap_sum"][b], gap.sum(), rtol=1e-5)
        np.testing.assert_allclose(metrics["logprob_gap_max"][b], gap.max(), rtol=1e-6)
        assert metrics["logprob_gap_count"][b] == sampled.sum()
    assert metrics["logprob_gap_count"][0] == LENGTHS[0] - 2  # the two prompt positions are skipped


def test_per_row_config_values() -> None:
    target, inputs = _batch(2)
    low, high = np.array([0.8, 0.9, 0.5, 0.7]), np.array([1.2, 1.1, 1.5, 1.3])
    batched, _ = losses.ppo(jnp.asarray(target), inputs, {"clip_low_threshold": low, "clip_high_threshold": high})
    for b in range(B):
        row, _ = losses.ppo(jnp.asarray(target), inputs, {"clip_low_threshold": low[b], "clip_high_threshold": high[b]})
        np.testing.assert_allclose(batched[b], row[b], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradients with respect to the target logprobs
# ---------------------------------------------------------------------------------------------


def _grad(name: str, target: np.ndarray, inputs: dict, config: dict) -> np.ndarray:
    fn = losses.get_loss(name).fn
    return np.asarray(jax.grad(lambda x: fn(x, inputs, config)[0].sum())(jnp.asarray(target)))


def _finite_difference(name: str, target: np.ndarray, inputs: dict, config: dict, eps: float = 1e-2) -> np.ndarray:
    fn = losses.get_loss(name).fn
    grad = np.zeros_like(target)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            up, down = target.copy(), target.copy()
            up[b, t] += eps
            down[b, t] -= eps
            grad[b, t] = (fn(jnp.asarray(up), inputs, config)[0][b] - fn(jnp.asarray(down), inputs, config)[0][b]) / (
                2 * eps
            )
    return grad


def test_importance_sampling_gradient() -> None:
    target, inputs = _batch(3)
    grad = _grad("importance_sampling", target, inputs, {})
    mask = inputs["mask"] > 0
    expected = np.where(mask, -np.exp(target - inputs["logprobs"]) * inputs["advantages"], 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grad, _finite_difference("importance_sampling", target, inputs, {}), rtol=2e-2, atol=2e-3
    )


def test_ppo_gradient() -> None:
    target, inputs = _batch(4)
    config = losses.check_loss_inputs("ppo", ["target_tokens", *inputs], {})
    ratio = np.exp(target - inputs["logprobs"])
    # Keep ratios off the clip boundaries, where the loss has a kink.
    near = np.isclose(ratio, 0.8, atol=2e-2) | np.isclose(ratio, 1.2, atol=2e-2)
    inputs["logprobs"] = np.where(near, inputs["logprobs"] + 0.1, inputs["logprobs"]).astype(np.float32)
    ratio = np.exp(target - inputs["logprobs"])
    adv = inputs["advantages"]
    clipped_away = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    expected = np.where((inputs["mask"] > 0) & ~clipped_away, -ratio * adv, 0.0)
    grad = _grad("ppo", target, inputs, config)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, _finite_difference("ppo", target, inputs, config), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize(
    ("ratio", "advantage", "gradient_flows"),
    [
        (1.5, +1.0, False),  # above the clip range, positive advantage: clipped, no gradient
        (0.5, -1.0, False),  # below the clip range, negative advantage: clipped, no gradient
        (0.5, +1.0, True),  # below the range but the unclipped term is smaller: gradient flows
        (1.5, -1.0, True),  # above the range with a negative advantage: gradient flows
        (1.0, +1.0, True),  # inside the range
        (1.0, -1.0, True),
    ],
)
def test_ppo_clipping(ratio: float, advantage: float, gradient_flows: bool) -> None:
    target = np.full((1, 1), -1.0, dtype=np.float32)
    inputs = {
        "mask": np.ones((1, 1), np.float32),
        "logprobs": target - np.log(ratio).astype(np.float32),
        "advantages": np.full((1, 1), advantage, np.float32),
    }
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    grad = _grad("ppo", target, inputs, config)[0, 0]
    if gradient_flows:
        np.testing.assert_allclose(grad, -ratio * advantage, rtol=1e-5)
    else:
        assert grad == 0.0
        loss, _ = losses.ppo(jnp.asarray(target), inputs, config)
        np.testing.assert_allclose(loss[0], -np.clip(ratio, 0.8, 1.2) * advantage, rtol=1e-5)


def test_cispo_gradient_does_not_flow_through_the_ratio() -> None:
    target, inputs = _batch(5)
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    coefficient = np.clip(np.exp(target - inputs["logprobs"]), 0.5, 1.5)
    expected = np.where(inputs["mask"] > 0, -coefficient * inputs["advantages"], 0.0)
    np.testing.assert_allclose(_grad("cispo", target, inputs, config), expected, rtol=1e-5, atol=1e-6)


def test_dro_and_cross_entropy_gradients() -> None:
    target, inputs = _batch(6)
    valid = inputs["mask"] > 0
    beta = 0.3
    expected = np.where(valid, -(inputs["advantages"] - beta * (target - inputs["logprobs"])), 0.0)
    np.testing.assert_allclose(_grad("dro", target, inputs, {"beta": beta}), expected, rtol=1e-5, atol=1e-5)
    expected = np.where(valid, -inputs["weights"], 0.0)
    np.testing.assert_allclose(_grad("cross_entropy", target, inputs, {}), expected, rtol=1e-6)


def test_padding_never_reaches_loss_or_gradient() -> None:
    target, inputs = _batch(7)
    for name, config in CASES:
        config = losses.check_loss_inputs(name, ["target_tokens", *inputs], config)
        grad = _grad(name, target, inputs, config)
        assert np.all(np.isfinite(grad)), name
        assert np.all(grad[inputs["mask"] == 0] == 0.0), name


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_covers_the_loss_fn_type() -> None:
    assert set(losses.LOSSES) == set(typing.get_args(types.LossFnType))
    assert losses.get_loss("cross_entropy").input_keys == ("target_tokens", "weights")
    for name in ("importance_sampling", "ppo", "cispo", "dro"):
        assert losses.get_loss(name).input_keys == ("target_tokens", "logprobs", "advantages")


def test_unknown_loss_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'gspo'") as excinfo:
        losses.get_loss("gspo")
    for name in losses.LOSSES:
        assert name in str(excinfo.value)


def test_config_defaults() -> None:
    policy = ["target_tokens", "logprobs", "advantages"]
    assert losses.check_loss_inputs("ppo", policy) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert losses.check_loss_inputs("cispo", policy) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert losses.check_loss_inputs("ppo", policy, {"clip_high_threshold": 1.28})["clip_high_threshold"] == 1.28
    assert losses.check_loss_inputs("importance_sampling", [*policy, "weights"]) == {}  # extra inputs are fine
    assert losses.check_loss_inputs("dro", policy, {"beta": 1}) == {"beta": 1.0}


@pytest.mark.parametrize(
    ("name", "keys", "config", "needle"),
    [
        ("cross_entropy", ["target_tokens"], None, "['weights']"),
        ("ppo", ["target_tokens", "weights"], None, "['advantages', 'logprobs']"),
        ("ppo", ["target_tokens", "logprobs", "advantages"], {"clip_ratio": 0.2}, "['clip_ratio']"),
        ("importance_sampling", ["target_tokens", "logprobs", "advantages"], {"beta": 0.1}, "['beta']"),
        ("dro", ["target_tokens", "logprobs", "advantages"], None, "'beta'"),
        ("dro", ["target_tokens", "logprobs", "advantages"], {"beta": -1.0}, "'beta'"),
        ("ppo", ["target_tokens", "logprobs", "advantages"], {"clip_low_threshold": float("nan")}, "nan"),
        ("ppo", ["target_tokens", "logprobs", "advantages"], {"clip_low_threshold": "0.8"}, "'0.8'"),
        ("ppo", ["target_tokens", "logprobs", "advantages"], {"clip_low_threshold": 1.5}, "clip_high_threshold"),
        ("cispo", ["target_tokens", "logprobs", "advantages"], {"clip_low_threshold": -0.1}, "clip_low_threshold"),
        ("nope", [], None, "'nope'"),
    ],
)
def test_check_loss_inputs_errors(name: str, keys: list[str], config: dict | None, needle: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        losses.check_loss_inputs(name, keys, config)
    assert needle in str(excinfo.value)
