"""`medfoundry pretrain` on CUDA: one run of a tiny GPT-2 takes the same steps as on the CPU (fp32) and runs in
bf16 with an MFU against the GPU's published peak; on two GPUs, FSDP2 over NCCL resumes exactly where it stopped.

Mirrors ``tests/test_pretrain.py`` (data, tiny configuration) and ``tests/test_pretrain_fsdp.py`` (torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ci_skips import MACHINE
from conftest import REPO, run_torchrun
from medfoundry.config import validate
from medfoundry.train.config import PretrainConfig
from medfoundry.train.loop import pretrain
from test_pretrain import ENV, NO_DROPOUT, _records, _tree, tokens  # noqa: F401  (tokens: the shared data fixture)

from .conftest import needs_gpus

pytestmark = pytest.mark.gpu

# torchrun's workers and the CPU reference run in their own processes; a run on the CPU hides every GPU
CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def base(tokens, tmp_path_factory) -> Path:
    """A random gpt2-tiny (no dropout) saved as a Hugging Face folder: the CPU and GPU runs start from the same
    weights, whatever device each would initialize on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medfoundry.model.presets import model_config

    vocab = len(AutoTokenizer.from_pretrained(tokens["tokenizer_dir"]))
    torch.manual_seed(0)
    config = model_config("gpt2-tiny", vocab_size=vocab, context=64, overrides=dict(NO_DROPOUT))
    directory = tmp_path_factory.mktemp("gpu_base") / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _one_step_tree(tokens: dict, out: Path, base: Path, precision: str) -> dict:
    tree = _tree(tokens, out, steps=1, precision=precision, attention="eager")  # 2 micro-batches of 4
    tree["model"]["init_from"] = str(base)
    tree["eval"] = {"every": 1, "batches": 2}
    tree["checkpoint"] = {"every": 1}
    tree["schedule"] = {"kind": "constant"}  # no room for warm-up and decay in one step
    return tree


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


def test_a_pretraining_step_on_cuda_matches_the_cpu(tokens, base, tmp_path):
    """fp32 on the GPU (TF32 off, torch's default) takes the CPU's step: same loss, same validation loss."""
    gpu = tmp_path / "gpu"
    pretrain(validate(PretrainConfig, _one_step_tree(tokens, gpu, base, "fp32")))
    run = json.loads((gpu / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] == "fp32"

    cpu = tmp_path / "cpu"
    config = tmp_path / "cpu.yaml"
    config.write_text(yaml.safe_dump(_one_step_tree(tokens, cpu, base, "fp32")))
    done = subprocess.run(
        [sys.executable, "-m", "medfoundry", "pretrain", str(config)],
        cwd=REPO,
        env=CPU_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((cpu / "run.json").read_text())["device"] == "cpu"

    assert len(_losses(gpu)) == 1 and _losses(gpu) == pytest.approx(_losses(cpu), rel=1e-4)
    val = [[r["val_loss"] for r in _records(out) if "val_loss" in r] for out in (gpu, cpu)]
    assert len(val[0]) == 2 and val[0] == pytest.approx(val[1], rel=1e-4)
    assert (gpu / "model" / "model.safetensors").is_file()


@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason=MACHINE + "needs a GPU with bf16"
)
def test_a_bf16_step_on_cuda_with_mfu_against_the_published_peak(tokens, base, tmp_path):
    out = tmp_path / "bf16"
    summary = pretrain(validate(PretrainConfig, _one_step_tree(tokens, out, base, "auto")))
    run = json.loads((out / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] == "bf16"  # auto: bf16 where the GPU has it
    (step,) = [r for r in _records(out) if "loss" in r]
    assert 5 < step["loss"] < 10 and not step["skipped"]  # a random model: about ln(2000) = 7.6 nats
    # a tiny model uses a sliver of a GPU: far below the peak, which for a known GPU is its datasheet's
    assert 0 < step["mfu"] < 0.5
    assert summary["steps"] == 1


def _fsdp_tree(tokens: dict, out: Path, steps: int) -> dict:
    """FSDP2 over NCCL on 2 GPUs, 1 micro-batch of 4 per process and step. Dropout on, so that each process's
    CUDA generator must come back on resume; fp32 and eager attention, whose kernels are deterministic; a
    constant learning rate, so that a run of 4 steps continued to 8 takes the steps of a run of 8."""
    tree = _tree(tokens, out, steps=steps, precision="fp32", attention="eager")
    tree["model"]["overrides"] = {}  # gpt2-tiny's dropout
    tree["distributed"] = {"strategy": "fsdp", "backend": "nccl"}
    tree["schedule"] = {"kind": "constant", "warmup_steps": 2}
    tree["checkpoint"] = {"every": 2, "keep_last": 2}
    tree["eval"] = {"every": 4, "batches": 2}
    return tree


def _torchrun(tree: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(tree))
    run_torchrun("pretrain", path, {**ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, processes=2)


@needs_gpus(2)
def test_fsdp_on_two_gpus_resumes_with_the_losses_of_an_uninterrupted_run(tokens, tmp_path):
    _torchrun(_fsdp_tree(tokens, tmp_path / "straight", 8), tmp_path / "straight.yaml")
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["world_size"] == 2 and run["device"].startswith("cuda")

    resumed = tmp_path / "resumed"
    _torchrun(_fsdp_tree(tokens, resumed, 4), tmp_path / "first.yaml")
    assert len(_losses(resumed)) == 4
    started = time.time()
    _torchrun(_fsdp_tree(tokens, resumed, 8), tmp_path / "extended.yaml")  # same folder: resumes at step 4

    records = _records(resumed)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # one run's log
    assert all(r["time"] < started for r in records if "loss" in r and r["step"] <= 4)  # it did resume
    assert _losses(resumed) == pytest.approx(_losses(tmp_path / "straight"), rel=1e-6, abs=0)
    val = [[r["val_loss"] for r in _records(out) if "val_loss" in r] for out in (resumed, tmp_path / "straight")]
    assert val[0] == pytest.approx(val[1], rel=1e-6, abs=0)
    assert (resumed / "model" / "model.safetensors").is_file()
