"""Every shipped recipe is a valid config."""

from __future__ import annotations

import pytest

from conftest import REPO
from medfoundry.config import load_config
from medfoundry.corpus.config import CorpusConfig

RECIPES = sorted((REPO / "recipes").glob("*corpus*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_corpus_recipe_validates(recipe):
    cfg = load_config(CorpusConfig, recipe)
    assert cfg.sources and cfg.output_dir.startswith("runs/")


def test_there_are_recipes():
    assert len(RECIPES) >= 2
