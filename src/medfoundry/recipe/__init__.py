"""Recipes: one YAML file runs the whole pipeline, stage by stage, cached by content hash."""
