"""Kill a run mid-way, resume it, and get the metrics and adapter of an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
from launcher_utils import (  # noqa: F401  (fixtures)
    _restore_jax_cache_config,
    compose_config,
    model_path,
    run_overrides,
    xla_cache,
)
from safetensors.numpy import load_file

from framework.tracking import read_metrics
from launcher.run import run

# kl_coef > 0 gives every sampled token a training signal, so the adapter changes at every step even
# when every sample of a group earns the same reward (zero advantage).
SETTINGS = ["max_steps=6", "save_every=2", "eval_every=3", "rl.kl_coef=0.1"]


def _timing(key: str) -> bool:
    return key.startswith("time/") or key == "tokens/s"


def test_resumed_run_equals_uninterrupted_run(model_path, xla_cache, tmp_path):  # noqa: F811
    def config(*extra):
        return compose_config(run_overrides("rl_math", model_path, xla_cache, *SETTINGS, *extra))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(config(), whole)
    run(config("stop_after=5"), killed)  # steps 0-4 ran; the last checkpoint is after step 3
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 3, 4]
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["completed_steps"] == 4
    assert not (killed / "final_adapter").exists()

    run(config("resume=true"), killed)
    expected, got = read_metrics(whole), read_metrics(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(7))
    for a, b in zip(expected, got, strict=True):
        assert {k for k in a if not _timing(k)} == {k for k in b if not _timing(k)}
        for key in a:
            if not _timing(key):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=f"step {a['step']} {key}")
    assert any(r["datums"] > 0 for r in expected)  # the adapter was trained

    adapter_a = load_file(whole / "final_adapter" / "adapter_model.safetensors")
    adapter_b = load_file(killed / "final_adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    for name in adapter_a:
        np.testing.assert_allclose(adapter_b[name], adapter_a[name], rtol=1e-5, atol=1e-6, err_msg=name)
