"""Every shipped recipe is valid: a whole-pipeline recipe (it has ``stages``) wires into every stage's
config; a single-stage config validates for its stage (named in its file name)."""

from __future__ import annotations

import pytest

from conftest import REPO
from medfoundry.config import load_config, load_yaml
from medfoundry.corpus.config import CorpusConfig
from medfoundry.eval.config import EvalConfig
from medfoundry.recipe.config import wire
from medfoundry.recipe.runner import load_recipe
from medfoundry.sft.config import FinetuneConfig
from medfoundry.tokenizer.config import ExtendConfig, TokenizeConfig, TokenizerTrainConfig
from medfoundry.train.config import PretrainConfig

STAGES = {
    "corpus": CorpusConfig,
    "tokenizer_extend": ExtendConfig,
    "tokenizer": TokenizerTrainConfig,
    "tokens": TokenizeConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "eval": EvalConfig,
}
FILES = sorted((REPO / "recipes").glob("*.yaml"))
PIPELINES = [r for r in FILES if "stages" in load_yaml(r)]
SINGLE = [r for r in FILES if r not in PIPELINES]


def _stage(recipe) -> str:
    return next(stage for stage in STAGES if f"_{stage}" in recipe.stem)


@pytest.mark.parametrize("recipe", SINGLE, ids=[r.name for r in SINGLE])
def test_stage_config_validates(recipe):
    cfg = load_config(STAGES[_stage(recipe)], recipe)
    assert cfg.output_dir.startswith("runs/")


@pytest.mark.parametrize("recipe", PIPELINES, ids=[r.name for r in PIPELINES])
def test_pipeline_recipe_wires_every_stage(recipe):
    loaded = load_recipe(recipe)
    configs = wire(loaded)
    assert loaded.run_dir.startswith("runs/")
    assert set(configs) == set(loaded.present()) - {"card"}
    assert all(c.output_dir.startswith(loaded.run_dir) for c in configs.values() if hasattr(c, "output_dir"))


def test_there_are_configs_for_each_stage():
    assert {_stage(r) for r in SINGLE} == set(STAGES)
    assert any(r.stem == "quickstart" for r in PIPELINES)


def test_the_launch_matches_the_planned_gpus():
    """A recipe's `distributed:` section starts as many processes as its `plan:` section counts GPUs; the seeds
    that trained on a cluster have one."""
    launched = {}
    for recipe in PIPELINES:
        loaded = load_recipe(recipe)
        if loaded.distributed is not None:
            launched[recipe.name] = loaded.distributed.launcher, loaded.distributed.processes
            assert loaded.distributed.processes == (loaded.plan or {}).get("gpus", loaded.distributed.processes)
    assert launched["biomed-llama-7b.yaml"] == ("slurm", 32) and launched["biomedlm-2.7b.yaml"] == ("slurm", 128)
    assert launched["quickstart_distributed.yaml"] == ("torchrun", 2)
