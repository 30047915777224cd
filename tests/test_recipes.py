"""Every shipped recipe is a valid config for its stage."""

from __future__ import annotations

import pytest

from conftest import REPO
from medfoundry.config import load_config
from medfoundry.corpus.config import CorpusConfig
from medfoundry.eval.config import EvalConfig
from medfoundry.sft.config import FinetuneConfig
from medfoundry.tokenizer.config import ExtendConfig, TokenizeConfig, TokenizerTrainConfig
from medfoundry.train.config import PretrainConfig

STAGES = {"corpus": CorpusConfig, "tokenizer_extend": ExtendConfig, "tokenizer": TokenizerTrainConfig, "tokens": TokenizeConfig, "pretrain": PretrainConfig,
          "finetune": FinetuneConfig, "eval": EvalConfig}
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _stage(recipe) -> str:
    return next(stage for stage in STAGES if f"_{stage}" in recipe.stem)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_validates(recipe):
    cfg = load_config(STAGES[_stage(recipe)], recipe)
    assert cfg.output_dir.startswith("runs/")


def test_there_are_recipes_for_each_stage():
    assert {_stage(r) for r in RECIPES} == set(STAGES)
