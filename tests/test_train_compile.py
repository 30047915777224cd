"""``training.compile``: the transformer blocks compiled in place (the model stays a plain transformers model, its
state dict unchanged), losses within rounding of eager, exact resume with compiled blocks, what ``auto`` resolves
to, and the values it refuses. Compiling costs tens of seconds: the end-to-end runs share one
compiled graph (dynamo reuses it across blocks and models of the same code in this process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medfoundry.config import validate
from medfoundry.errors import ConfigError
from medfoundry.model.presets import model_config
from medfoundry.train import accel
from medfoundry.train.accel import check_compiler, compile_for, compile_min_run_flops, transformer_blocks
from medfoundry.train.config import PretrainConfig, TrainingConfig
from medfoundry.train.loop import pretrain
from medfoundry.train.model_setup import prepare_for_training
from test_pretrain import _records, _tree, tokens  # noqa: F401  (tokens: the shared data fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# compiled blocks fuse the elementwise work between the matmuls: fp32 sums in another order, nothing else
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("value", ["auto", "blocks", "model", "off"])
def test_compile_takes_its_choices(value):
    assert TrainingConfig(steps=1, compile=value).compile == value
    assert TrainingConfig(steps=1).compile == "auto"


@pytest.mark.parametrize("value", [True, False, "yes please"])
def test_compile_refuses_anything_else_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"training\.compile.*(auto|blocks)"):
        validate(PretrainConfig, {"output_dir": "x", "model": {"preset": "gpt2-tiny"}, "training": {"compile": value}})


def test_auto_compiles_the_blocks_of_long_runs_where_a_compiler_exists(monkeypatch):
    cpu = compile_min_run_flops("cpu")
    assert cpu == 600 * 2e12 and compile_min_run_flops("cuda:1") == 600 * 1e15  # 10 minutes on the fastest
    monkeypatch.setattr(accel, "inductor_available", lambda device_type: True)
    assert compile_for("auto", "cpu", lora=False, run_flops=cpu) == "blocks"
    assert compile_for("auto", "cuda:0", lora=False, run_flops=compile_min_run_flops("cuda")) == "blocks"
    assert compile_for("auto", "cuda:0", lora=False, run_flops=cpu) == "off"  # seconds on a GPU
    assert compile_for("auto", "cpu", lora=False, run_flops=cpu / 2) == "off"  # a test, a smoke run
    assert compile_for("auto", "cpu", lora=True, run_flops=cpu) == "off"
    assert compile_for("model", "cpu", lora=False, run_flops=1.0) == "model"  # an explicit choice is kept
    monkeypatch.setattr(accel, "inductor_available", lambda device_type: False)
    assert compile_for("auto", "cpu", lora=False, run_flops=cpu) == "off"
    assert compile_for("off", "cpu", lora=False, run_flops=cpu) == "off"
    assert compile_for("blocks", "cuda", lora=False, run_flops=cpu) == "blocks"  # the planner's GPU target
    check_compiler("off", "cpu")
    for choice in ("blocks", "model"):
        with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
            check_compiler(choice, "cpu")


def test_the_default_auto_stays_eager_for_a_short_run_and_compiles_a_long_one():
    prepared = _prepared(TrainingConfig(steps=30, precision="fp32"))
    assert prepared.kernels["compile"] == "off"
    assert all(block._compiled_call_impl is None for block in transformer_blocks(prepared.lm))
    long = _prepared(TrainingConfig(steps=10**9, precision="fp32"))  # 6.5e17 FLOPs: days at 2 TFLOP/s
    assert long.kernels["compile"] == ("blocks" if accel.inductor_available("cpu") else "off")


def test_blocks_are_compiled_in_place_and_the_state_dict_is_unchanged():
    eager, compiled = (
        _prepared(TrainingConfig(steps=1, compile="off")),
        _prepared(TrainingConfig(steps=1, compile="blocks")),
    )
    assert compiled.kernels["compile"] == "blocks"
    blocks = transformer_blocks(compiled.lm)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert type(compiled.lm) is type(eager.lm)  # a transformers model still: no OptimizedModule around it
    assert list(compiled.lm.state_dict()) == list(eager.lm.state_dict())
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())


def _prepared(training: TrainingConfig):
    torch.manual_seed(0)
    config = model_config("gpt2-tiny", vocab_size=96, context=32)
    return prepare_for_training(AutoModelForCausalLM.from_config(config), training, device="cpu", context=32)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


@pytest.fixture(scope="module")
def eager_and_compiled(tokens, tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps (no dropout), eager and with compiled blocks."""
    root = tmp_path_factory.mktemp("compile")
    outs = {}
    for choice in ("off", "blocks"):
        outs[choice] = root / choice
        tree = _tree(tokens, outs[choice], steps=6, compile=choice)
        tree["checkpoint"] = {"every": 3}
        tree["eval"] = {"every": 3, "batches": 2}
        pretrain(validate(PretrainConfig, tree))
    return outs


def test_compiled_blocks_give_the_eager_losses(eager_and_compiled):
    eager, compiled = (_losses(eager_and_compiled[k]) for k in ("off", "blocks"))
    assert list(compiled) == list(range(1, 7))
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=LOSS_RTOL)
    run = json.loads((eager_and_compiled["blocks"] / "run.json").read_text())
    assert run["kernels"]["compile"] == "blocks" and run["config"]["training"]["compile"] == "blocks"
    exported = load_file(eager_and_compiled["blocks"] / "model" / "model.safetensors")
    assert exported.keys() == load_file(eager_and_compiled["off"] / "model" / "model.safetensors").keys()


def test_resume_with_compiled_blocks_equals_the_uninterrupted_run(tokens, tmp_path):
    out = tmp_path / "run"
    tree = _tree(tokens, out, steps=6, compile="blocks")
    tree["model"]["overrides"] = {}  # dropout on: the compiled blocks' random masks must resume too
    tree["checkpoint"] = {"every": 3, "keep_last": 2}
    tree["eval"] = {"every": 6, "batches": 2}
    pretrain(validate(PretrainConfig, tree))
    straight, weights = _losses(out), load_file(out / "model" / "model.safetensors")
    # as after a crash past step 3: the run resumes from step 3's checkpoint
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "model")
    pretrain(validate(PretrainConfig, tree))
    assert _losses(out) == straight
    resumed = load_file(out / "model" / "model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_compiled_blocks_under_fsdp2_give_the_losses_of_one_eager_process(tokens, tmp_path):
    """torchtitan's order: the blocks compiled, then ``fully_shard`` on each of them and on the root."""
    from conftest import run_torchrun
    from test_pretrain import ENV
    from test_pretrain_fsdp import _base_model, _config, _fsdp_tree

    base = _base_model(tokens, tmp_path / "base")
    trees = {name: _fsdp_tree(tokens, tmp_path / name, 4, 4) for name in ("fsdp", "single")}
    for tree in trees.values():
        tree["model"]["init_from"] = str(base)
        tree["eval"] = {"every": 4, "batches": 2}
    trees["fsdp"]["training"]["compile"] = "blocks"
    run_torchrun("pretrain", _config(trees["fsdp"], tmp_path / "fsdp.yaml"), ENV)
    pretrain(validate(PretrainConfig, trees["single"]))
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["kernels"]["compile"] == "blocks"
    fsdp, single = _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    assert list(fsdp) == list(single) == [1, 2, 3, 4]
    assert list(fsdp.values()) == pytest.approx(list(single.values()), rel=LOSS_RTOL)
