"""`medfoundry pretrain` end to end on a tiny GPT-2: learning, validation, export, exact resume after
SIGKILL, 2-process DDP equal to 1 process, non-finite steps, TensorBoard scalars, and config errors
before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_torchrun
from medfoundry.config import validate
from medfoundry.errors import ConfigError, InputError, MedfoundryError
from medfoundry.train.config import PretrainConfig
from medfoundry.train.loop import pretrain

ENV = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> dict:
    """A real-abstract corpus, a 2,000-token BPE and its token shards."""
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.shards import tokenize_corpus
    from medfoundry.tokenizer.train import train_tokenizer
    from test_tokenizer_train import write_corpus

    root = tmp_path_factory.mktemp("pretrain_data")
    corpus = write_corpus(root / "corpus", 1200, 150)
    train_tokenizer(
        validate(
            TokenizerTrainConfig,
            {
                "corpus_dir": str(corpus),
                "output_dir": str(root / "tok"),
                "vocab_size": 2000,
                "fertility": {"top_domain_words": 0},
            },
        )
    )
    tokenize_corpus(corpus, root / "tok", root / "tokens", workers=1)
    return {"tokens_dir": str(root / "tokens"), "tokenizer_dir": str(root / "tok")}


def _tree(tokens: dict, out: Path, **training) -> dict:
    return {
        "output_dir": str(out),
        "model": {"preset": "gpt2-tiny", "context": 64, "overrides": dict(NO_DROPOUT)},
        "data": tokens,
        "training": {"steps": 30, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32", **training},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 3},
        "checkpoint": {"every": 10},
        "eval": {"every": 15, "batches": 4},
        "log": {"every": 1},
    }


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tokens, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "pretrain"
    return out, pretrain(validate(PretrainConfig, _tree(tokens, out)))


def test_loss_falls_and_validation_is_reported(trained):
    out, summary = trained
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    evals = [r for r in _records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["initial_val_loss"] == evals[0]["val_loss"] > summary["val_loss"]
    assert summary["val_ppl"] == pytest.approx(torch.tensor(summary["val_loss"]).exp().item(), rel=1e-6)
    assert 0 < summary["val_bpb"] < summary["val_loss"]  # a token holds several bytes
    # MFU is tokens/s x FLOPs per token / one peak per run (its size depends on the machine's load: not tested)
    steps = [r for r in _records(out) if "loss" in r]
    assert summary["median_tok_s"] > 0 and summary["median_mfu"] > 0
    ratios = [r["mfu"] / r["tok_s"] for r in steps]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    assert (out / "plots" / "loss.png").stat().st_size > 5000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    kernels = json.loads((out / "run.json").read_text())["kernels"]
    # the CPU defaults (a run this short: training.compile auto stays eager)
    assert kernels == {"attention": "eager", "loss": "chunked", "compile": "off", "optimizer": "fused"}


def test_export_loads_in_transformers_with_the_same_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medfoundry.train.checkpoint import read_checkpoint

    out, _ = trained
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    reference = AutoModelForCausalLM.from_config(exported.config).eval()
    state = read_checkpoint(out / "checkpoints" / "step-00000030")["model"]
    reference.load_state_dict(state, strict=False)
    reference.tie_weights()
    ids = AutoTokenizer.from_pretrained(out / "model")("Immunohistochemistry of the tumour", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert (out / "model" / "generation_config.json").is_file()


def test_export_command_writes_any_saved_step(trained, tmp_path):
    """`medfoundry export` turns a checkpoint into the Hugging Face folder the run exported (the last
    step: the same files' tensors), in bf16 on request, streaming one tensor at a time into shards."""
    from safetensors.torch import load_file

    from medfoundry.model.export import export_hf
    from medfoundry.train.export_checkpoint import checkpoint_weights

    def export(checkpoint: Path, out_dir: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "medfoundry", "export", str(checkpoint), str(out_dir)]
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)

    out, _ = trained
    step = out / "checkpoints" / "step-00000030"
    done = export(step, tmp_path / "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_file(tmp_path / "fp32" / "model.safetensors").keys() == _weights(out).keys()
    assert all(torch.equal(v, _weights(out)[k]) for k, v in load_file(tmp_path / "fp32" / "model.safetensors").items())
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"  # the run's (fp32)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "fp32" / name).read_bytes() == (out / "model" / name).read_bytes()

    export_hf(checkpoint_weights(step), step / "hf", tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in _weights(out).items())

    damaged = tmp_path / "damaged"
    shutil.copytree(step, damaged)
    (damaged / "__0_0.distcp").write_bytes(b"")
    done = export(damaged, tmp_path / "never")
    assert done.returncode != 0 and "__0_0.distcp: truncated or damaged" in done.stderr
    assert not (tmp_path / "never").exists()


def _cli(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "medfoundry", "pretrain", str(cfg_path)]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model" / "model.safetensors")


def test_sigkill_then_resume_is_bit_identical(tokens, tmp_path):
    runs = {}
    for name in ("straight", "killed"):
        tree = _tree(tokens, tmp_path / name, steps=10)
        tree["model"]["overrides"] = {}  # dropout on: resume must restore the RNG too
        tree["checkpoint"] = {"every": 1, "keep_last": 2}
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        runs[name] = cfg
    subprocess.run(_cli(runs["straight"]), cwd=REPO, env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(
        _cli(runs["killed"]), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "killed" / "checkpoints" / "step-00000005").is_dir():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run(_cli(runs["killed"]), cwd=REPO, env=ENV, check=True, capture_output=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _records(tmp_path / "killed") if "loss" in r]
    assert steps == list(range(1, 11))  # the metrics log reads as one run


def test_two_processes_match_one(tokens, tmp_path):
    """torchrun with 2 gloo processes (micro 4 each) gives the losses of 1 process (micro 4, 2 accumulation steps)."""
    single = tmp_path / "single"
    pretrain(validate(PretrainConfig, _tree(tokens, single, steps=6)))
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tokens, tmp_path / "ddp", steps=6)))
    run_torchrun("pretrain", cfg, ENV)
    one = [r["loss"] for r in _records(single) if "loss" in r]
    two = [r["loss"] for r in _records(tmp_path / "ddp") if "loss" in r]
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-4)


def test_a_failed_save_stops_every_process(tokens, tmp_path):
    """Under torchrun, process 0 hitting the file size limit in a checkpoint save stops both processes with
    the checkpoint error (the other does not wait at the next collective), and leaves no partial folder."""
    import resource

    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(_tree(tokens, tmp_path / "ddp", steps=20)))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))  # noqa: E731
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "medfoundry",
            "pretrain",
            str(cfg),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert run.returncode != 0
    assert "checkpoint for step 10 not saved: writing __" in run.stderr  # a process's shard
    assert "file size limit" in run.stderr and "there is no earlier checkpoint" in run.stderr
    assert not any((tmp_path / "ddp" / "checkpoints").iterdir())


def test_a_corrupted_shard_is_named_before_any_step(tokens, tmp_path):
    copy = tmp_path / "tokens"
    shutil.copytree(tokens["tokens_dir"], copy)
    shard = sorted((copy / "train").glob("*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    tree = _tree({**tokens, "tokens_dir": str(copy)}, tmp_path / "run")
    with pytest.raises(InputError, match=rf"{shard.name}: corrupted: its xxh3_128 checksum"):
        pretrain(validate(PretrainConfig, tree))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    tree["data"]["verify_shards"] = False  # the user's choice: trained on, unchecked
    tree["training"]["steps"] = 4
    summary = pretrain(validate(PretrainConfig, tree))
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_non_finite_steps_are_skipped_then_the_run_stops(tokens, tmp_path):
    tree = _tree(tokens, tmp_path / "nan", steps=30, max_consecutive_skips=3)
    tree["optim"] = {"lr": 1e30, "grad_clip": 0}
    tree["checkpoint"] = {"every": 1, "keep_last": 1}
    with pytest.raises(MedfoundryError, match="3 steps in a row had a non-finite loss") as info:
        pretrain(validate(PretrainConfig, tree))
    assert "Last good checkpoint" in str(info.value)
    records = [r for r in _records(tmp_path / "nan") if "loss" in r]
    assert [r["skipped"] for r in records[-3:]] == [True, True, True]


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model": {"preset": "gpt5-huge"}}, MedfoundryError, "gpt5-huge"),
        ({"training": {"steps": 5, "micro_batch_size": 3, "global_batch_size": 8}}, ConfigError, "multiple of"),
        (
            {"model": {"preset": "gpt2-tiny", "context": 64, "overrides": {"vocab_size": 500}}},
            ConfigError,
            "2,000-token vocabulary",
        ),
        ({"data": {"tokens_dir": "/nonexistent/tokens", "tokenizer_dir": None}}, InputError, "/nonexistent/tokens"),
    ],
)
def test_config_errors_stop_before_any_work(tokens, tmp_path, change, error, message):
    tree = _tree(tokens, tmp_path / "bad")
    for key, value in change.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) else value
    if tree["data"]["tokenizer_dir"] is None:
        tree["data"]["tokenizer_dir"] = tokens["tokenizer_dir"]
    with pytest.raises(error, match=message):
        pretrain(validate(PretrainConfig, tree))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_match_the_metrics_and_survive_a_resume(tokens, tmp_path):
    from medfoundry.train.metrics import TENSORBOARD_TAGS

    out = tmp_path / "tb"
    tree = _tree(tokens, out, steps=6)
    tree.update(
        log={"every": 2, "tensorboard": True}, eval={"every": 2, "batches": 2}, checkpoint={"every": 2, "keep_last": 3}
    )
    pretrain(validate(PretrainConfig, tree))
    first = _scalars(out / "tensorboard")
    assert set(first) == set(TENSORBOARD_TAGS.values())
    records = _records(out)
    for key, tag in TENSORBOARD_TAGS.items():
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in first[tag]] == [s for s, _ in expected], tag
        assert [v for _, v in first[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in first["train/loss"]] == [1, 2, 4, 6] and [s for s, _ in first["val/loss"]] == [0, 2, 4, 6]

    # as after a crash past step 4: the run resumes from step 4, TensorBoard drops what it wrote after it
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "model")
    pretrain(validate(PretrainConfig, tree))
    again = _scalars(out / "tensorboard")
    assert [s for s, _ in again["train/loss"]] == [1, 2, 4, 6] and [s for s, _ in again["val/loss"]] == [0, 2, 4, 6]
    assert [v for _, v in again["train/loss"]] == pytest.approx([v for _, v in first["train/loss"]], rel=1e-6)


def test_tensorboard_missing_is_a_config_error(tokens, tmp_path, monkeypatch):
    from medfoundry.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an uninstalled package looks like to import
    tree = _tree(tokens, tmp_path / "no_tb")
    tree["log"] = {"tensorboard": True}
    with pytest.raises(
        MissingExtra,
        match=r"log.tensorboard needs tensorboard, which is not installed: pip install 'medfoundry\[tracking\]'",
    ):
        pretrain(validate(PretrainConfig, tree))
    assert not (tmp_path / "no_tb").exists()


def test_the_logged_learning_rate_is_the_one_each_step_used(tokens, tmp_path):
    """Warmup 4 steps at lr 1e-3: the lr logged at steps 1..6 (metrics.jsonl, TensorBoard) is the one the optimizer
    held while it took that step, the schedule's 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, ... (not the next step's)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from medfoundry.train.schedules import ScheduleConfig, lr_at

    used: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    out = tmp_path / "lr"
    tree = _tree(tokens, out, steps=6)
    tree.update(
        optim={"lr": 1e-3},
        schedule={"kind": "cosine", "warmup_steps": 4},
        log={"every": 1, "tensorboard": True},
        eval={"every": 6, "batches": 1},
        checkpoint={"every": 6},
    )
    try:
        pretrain(validate(PretrainConfig, tree))
    finally:
        hook.remove()
    schedule = [lr_at(step, 1e-3, 6, ScheduleConfig(kind="cosine", warmup_steps=4)) for step in range(6)]
    assert schedule[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert used == pytest.approx(schedule, rel=1e-12)  # one optimizer step per training step (no accumulation steps)
    logged = [(r["step"], r["lr"]) for r in _records(out) if "lr" in r]
    assert logged == [(step, pytest.approx(lr, rel=1e-12)) for step, lr in enumerate(used, start=1)]
    scalars = _scalars(out / "tensorboard")["train/lr"]
    assert scalars == [(step, pytest.approx(lr, rel=1e-6)) for step, lr in logged]
