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


# The loss_fn_inputs of each built-in loss as tinker documents them ("Input tensors" on each page under
# https://tinker-docs.thinkingmachines.ai/tinker/losses). dro's beta is documented without a default.
DOCUMENTED_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
REQUIRED_CONFIG = {"dro": {"beta": 0.1}}


@pytest.mark.parametrize("name", sorted(set(losses.LOSSES) | set(typing.get_args(types.LossFnType))))
def test_each_loss_runs_on_its_documented_inputs_and_names_a_missing_one(name: str) -> None:
    """Every loss the registry or `types.LossFnType` offers is accepted with exactly tinker's documented inputs
    and runs on a batch that holds only those (as the engine packs it: `target_tokens` turned into the target
    logprobs, plus the padding mask); without any one of them the request is refused with an error naming it."""
    assert name in DOCUMENTED_INPUTS, f"{name!r} is offered but not in DOCUMENTED_INPUTS"
    documented, config = DOCUMENTED_INPUTS[name], REQUIRED_CONFIG.get(name)
    resolved = losses.check_loss_inputs(name, documented, config)
    target, full = _batch(8)
    inputs = {key: full[key] for key in ("mask", *documented) if key != "target_tokens"}
    loss, _ = jax.jit(losses.get_loss(name).fn)(jnp.asarray(target), inputs, resolved)
    assert loss.shape == (B,) and np.all(np.isfinite(np.asarray(loss)))
    for key in documented:
        with pytest.raises(ValueError, match=rf"loss_fn '{name}' needs loss_fn_inputs \['{key}'\]"):
            losses.check_loss_inputs(name, [k for k in documented if k != key], config)
    # More than documented is fine (tinker's own examples send weights to RL losses) and changes nothing.
    assert losses.check_loss_inputs(name, [*documented, "weights", "my_extra"], config) == resolved


def test_unknown_loss_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'gspo'") as excinfo:
        losses.get_loss("gspo")
    for name in losses.LOSSES:
        assert name in str(excinfo.value)


# tinker's default clip ranges, applied when loss_fn_config leaves them out: PPO clips the ratio to [1 - 0.2,
# 1 + 0.2] (https://tinker-docs.thinkingmachines.ai/tinker/losses/ppo: "currently fixed to 0.2"; tinker-cookbook
# tutorials/202_loss_functions.py: "PPO defaults to 0.8 and 1.2"), CISPO one-sided to [0, 4] (same tutorial:
# "CISPO defaults to a one-sided clip ... {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}").
# Each ratio sits just inside or just outside a bound, so a default off by more than 0.01 changes the result.
RATIOS = np.array([0.01, 0.5, 0.79, 0.81, 1.19, 1.21, 2.0, 3.9, 4.1, 8.0], np.float32)


def _one_token_rows(ratios: np.ndarray, advantage: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One token per row with the given ratio p/q (the same target logprob, sampler logprob shifted)."""
    target = np.full((len(ratios), 1), -1.0, np.float32)
    return target, {"mask": np.ones_like(target), "logprobs": target - np.log(ratios)[:, None].astype(np.float32),
                    "advantages": np.full_like(target, advantage)}


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_default_ppo_clip_range_is_tinkers(advantage: float) -> None:
    """With no loss_fn_config, a token's gradient vanishes exactly where the ratio has left [0.8, 1.2] on the
    side its advantage pushes it (PPO's pessimistic min), and the loss uses the ratio clipped to that range."""
    target, inputs = _one_token_rows(RATIOS, advantage)
    config = losses.check_loss_inputs("ppo", DOCUMENTED_INPUTS["ppo"])
    clipped_away = RATIOS > 1.2 if advantage > 0 else RATIOS < 0.8
    grad = _grad("ppo", target, inputs, config)[:, 0]
    np.testing.assert_allclose(grad, np.where(clipped_away, 0.0, -RATIOS * advantage), rtol=1e-5)
    loss, _ = losses.ppo(jnp.asarray(target), inputs, config)
    expected = -np.minimum(RATIOS * advantage, np.clip(RATIOS, 0.8, 1.2) * advantage)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_default_cispo_clip_range_is_tinkers() -> None:
    """With no loss_fn_config, the (stop-gradient) coefficient on log p is the ratio clipped to [0, 4]: small
    ratios are kept as they are, large ones capped at 4."""
    target, inputs = _one_token_rows(RATIOS, 1.0)
    config = losses.check_loss_inputs("cispo", DOCUMENTED_INPUTS["cispo"])
    np.testing.assert_allclose(_grad("cispo", target, inputs, config)[:, 0], -np.minimum(RATIOS, 4.0), rtol=1e-5)
    loss, _ = losses.cispo(jnp.asarray(target), inputs, config)
    np.testing.assert_allclose(loss, -np.minimum(RATIOS, 4.0) * target[:, 0], rtol=1e-5)


def test_a_config_overrides_only_the_keys_it_gives() -> None:
    """A PPO config with only clip_high_threshold moves the upper bound and keeps the default lower one; DRO's
    beta may be an int."""
    target, inputs = _one_token_rows(RATIOS, 1.0)
    config = losses.check_loss_inputs("ppo", DOCUMENTED_INPUTS["ppo"], {"clip_high_threshold": 3.0})
    grad = _grad("ppo", target, inputs, config)[:, 0]
    np.testing.assert_allclose(grad, np.where(RATIOS > 3.0, 0.0, -RATIOS), rtol=1e-5)
    target, inputs = _one_token_rows(RATIOS, -1.0)
    grad = _grad("ppo", target, inputs, config)[:, 0]
    np.testing.assert_allclose(grad, np.where(RATIOS < 0.8, 0.0, RATIOS), rtol=1e-5)
    as_int = losses.check_loss_inputs("dro", DOCUMENTED_INPUTS["dro"], {"beta": 1})
    as_float = losses.check_loss_inputs("dro", DOCUMENTED_INPUTS["dro"], {"beta": 1.0})
    np.testing.assert_array_equal(losses.dro(jnp.asarray(target), inputs, as_int)[0],
                                  losses.dro(jnp.asarray(target), inputs, as_float)[0])


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
