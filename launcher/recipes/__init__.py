"""Training recipes over the client API: `rl`, `sl`, `dpo`, `distill` (see `launcher.recipes.base`)."""

from __future__ import annotations

from launcher.recipes.base import Context, Recipe
from launcher.recipes.distill import DistillRecipe
from launcher.recipes.dpo import DPORecipe
from launcher.recipes.rl import RLRecipe
from launcher.recipes.sl import SLRecipe

RECIPES: dict[str, type[Recipe]] = {
    "rl": RLRecipe,
    "sl": SLRecipe,
    "dpo": DPORecipe,
    "distill": DistillRecipe,
}

__all__ = ["RECIPES", "Context", "Recipe"]
