"""`python -m launcher +experiment=rl_math [key=value ...]`: compose the Hydra config and run its recipe.

The config tree is the installed `conf` package (`pkg://conf`), so the command works from any
directory. Each run (and each job of a `--multirun` sweep) gets its own directory under `runs/`.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import launcher.config  # noqa: F401  (registers the schema and resolvers before Hydra composes)


@hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from launcher.jsonl import DataFileError
    from launcher.run import ConfigError, run
    from models import CheckpointError, UnsupportedModelError

    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, CheckpointError, UnsupportedModelError, DataFileError) as error:
        # A user's mistake (a missing path, a broken checkpoint or data file): one line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
