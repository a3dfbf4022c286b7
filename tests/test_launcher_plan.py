"""`python -m launcher ... plan_only=true`: the per-device memory plan, printed; a plan that cannot fit
(or a mesh that does not match the devices) ends in exit status 2 with what to change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "launcher", "plan_only=true", "logger=jsonl", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_plan_only_prints_the_plan(tmp_path):
    out = launch(tmp_path, "+experiment=sl_chat", "sl.batch_size=8", "model.remat=full")
    assert out.returncode == 0, out.stderr
    assert "memory plan per device (mesh data=1 x fsdp=1 x tp=1, float32 params; train batch 8" in out.stdout
    assert "remat=full" in out.stdout
    for component in ("params", "adapters", "gradients", "optimizer", "kv_cache", "activations", "total"):
        assert f"  {component}" in out.stdout
    assert ": fits" in out.stdout
    assert not list(tmp_path.glob("runs/*/*/metrics.jsonl"))  # nothing ran


def test_plan_that_cannot_fit_says_what_to_change(tmp_path):
    out = launch(tmp_path, "model.max_seq_len=2000000")
    assert out.returncode == 2
    assert "DOES NOT FIT" in out.stdout
    assert out.stderr.startswith("error: ") and "activations" in out.stderr and "remat" in out.stderr


def test_mesh_that_does_not_match_the_devices_is_named(tmp_path):
    out = launch(tmp_path, "mesh.fsdp=2")
    assert out.returncode == 2
    assert "mesh:" in out.stderr and "needs 2 devices but 1" in out.stderr
