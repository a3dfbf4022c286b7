"""Experiment tracking for training loops: `metrics.jsonl`, PNG curves, a W&B run and a progress bar.

`Tracker(run_dir, config=..., logger_cfg=LoggerConfig(), ...)` is what the launcher's driver uses, and
any hand-written loop can use it the same way: `tracker.log(step, metrics)` per step, `close()` at the end.

- `metrics.jsonl` holds one JSON object per step (`step`, then the recipe's metrics, `lr`, timings,
  `tokens/s`). A resumed run first drops the rows of steps after its checkpoint, so the file reads
  exactly like an uninterrupted run's.
- `metrics.png` redraws the recipe's main curves every `plot_every` steps (matplotlib, Agg backend:
  no display needed).
- W&B runs offline by default (`<run>/wandb/offline-run-*`, upload later with `wandb sync`); the mode
  comes from the config, or from `$WANDB_MODE` when the config's mode is null, so a user who has
  logged in and set `WANDB_MODE=online` logs live. The run id is kept in `<run>/wandb_id`, so a
  resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


@dataclass
class WandbConfig:
    mode: str | None = None  # offline | online | disabled; null: $WANDB_MODE if set, else offline
    project: str = "tinker-jax"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot_every: int = 5  # redraw the PNG curves every this many steps (and at the end)
    progress: bool = True  # progress bar with ETA on the terminal


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_mode(configured: str | None) -> str:
    """The W&B mode: the configured one, else `$WANDB_MODE`, else offline."""
    mode = configured or os.environ.get("WANDB_MODE") or "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
    return mode


class Tracker:
    """Log per-step metrics to every sink; `close()` at the end (also on errors)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, config: Mapping[str, Any], logger_cfg: LoggerConfig,
                 name: str, total_steps: int, start_step: int, plot_keys: Sequence[str],
                 progress_key: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plot_path = self.run_dir / PLOT_FILE
        self.plot_every = int(logger_cfg.plot_every)
        self.plot_keys = tuple(plot_keys)
        self.progress_key = progress_key
        self.rows = self._restart_at(start_step)
        self._wandb = self._init_wandb(logger_cfg.wandb, config, name)
        self._bar = None
        if logger_cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------ sinks
    def _restart_at(self, start_step: int) -> list[dict[str, Any]]:
        """Keep the rows of steps before `start_step` (a resumed run redoes the others)."""
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] < start_step] if self.metrics_path.is_file() \
            else []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _init_wandb(self, cfg: WandbConfig, config: Mapping[str, Any], name: str) -> Any:
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                          name=f"{name}/{self.run_dir.name}", id=run_id, resume="allow", dir=str(self.run_dir),
                          mode=mode, config=dict(config),
                          settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                  disable_git=True))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        if self.plot_every > 0 and (step + 1) % self.plot_every == 0:
            self.plot()
        if self._bar is not None:
            key = self.progress_key
            if key is not None and row.get(key) is not None:
                self._bar.set_postfix({key: f"{row[key]:.3f}"}, refresh=False)
            self._bar.n = min(step + 1, self._bar.total)
            self._bar.refresh()

    def plot(self) -> Path | None:
        """Redraw `metrics.png`: one panel per main metric that has values."""
        keys = [k for k in self.plot_keys if any(r.get(k) is not None for r in self.rows)]
        if not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(len(keys), 3)
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            points = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.2)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(self.run_dir.name, fontsize=9)
        fig.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.plot_path)
        return self.plot_path

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(dict(values))

    def close(self, *, finished: bool = True) -> None:
        self.plot()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if finished else 1)
            self._wandb = None


def _plain(value: Any) -> Any:
    """JSON-friendly: numpy/jax scalars become floats or ints, NaN becomes None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    value = float(value)
    return None if math.isnan(value) else value
