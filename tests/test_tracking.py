"""framework.tracking: metrics.jsonl rows, the restart of a resumed run, the PNG curves, W&B offline."""

from __future__ import annotations

import math

import numpy as np

from framework.tracking import LoggerConfig, Tracker, WandbConfig, read_metrics


def _tracker(run_dir, start_step=0, mode="disabled", plot_every=2):
    return Tracker(run_dir, config={"lr": 1e-3}, logger_cfg=LoggerConfig(wandb=WandbConfig(mode=mode),
                                                                         plot_every=plot_every, progress=False),
                   name="t", total_steps=6, start_step=start_step, plot_keys=("loss", "reward/mean", "absent"))


def test_rows_plots_and_a_resumed_run_drops_later_rows(tmp_path):
    tracker = _tracker(tmp_path)
    for step in range(5):
        tracker.log(step, {"loss": np.float32(1.0 / (step + 1)), "reward/mean": math.nan if step == 1 else step,
                           "datums": 3})
    tracker.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[1]["reward/mean"] is None and rows[2]["reward/mean"] == 2.0  # NaN is written as null
    assert isinstance(rows[0]["loss"], float) and rows[0]["datums"] == 3
    assert (tmp_path / "metrics.png").stat().st_size > 5_000

    resumed = _tracker(tmp_path, start_step=3)  # as if the last checkpoint was after step 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(tmp_path):
    tracker = _tracker(tmp_path, mode="offline")
    tracker.log(0, {"loss": 1.0})
    tracker.close()
    run_id = (tmp_path / "wandb_id").read_text()
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb"))
    tracker = _tracker(tmp_path, start_step=1, mode="offline")
    tracker.log(1, {"loss": 0.5})
    tracker.close()
    assert (tmp_path / "wandb_id").read_text() == run_id
