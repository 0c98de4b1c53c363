"""Staged training on accelerate (``unimoe.train``): stage and recipe configs, the loop, the recipe runner."""

from unimoe.train.config import RecipeConfig, StageConfig, list_recipes, list_stage_presets, load_recipe, load_stage
from unimoe.train.freeze import apply_trainable, part_of
from unimoe.train.loop import StageResult, train_stage
from unimoe.train.recipe import run_recipe

__all__ = [
    "RecipeConfig",
    "StageConfig",
    "StageResult",
    "apply_trainable",
    "list_recipes",
    "list_stage_presets",
    "load_recipe",
    "load_stage",
    "part_of",
    "run_recipe",
    "train_stage",
]
