"""YAML presets shipped with the package (models, stages, recipes, tasks)."""
