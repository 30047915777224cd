"""`medfoundry pretrain` with ``distributed.strategy: fsdp`` under torchrun (2 gloo processes on CPU):
the losses of 1 process, an export that transformers loads, exact resume after SIGKILL, and
checkpoints in one format whatever wrote them (1 process, DDP or FSDP)."""

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

from conftest import REPO, descendants
from medfoundry.config import validate
from medfoundry.train.checkpoint import Checkpointer, latest_checkpoint, read_checkpoint
from medfoundry.train.config import PretrainConfig
from medfoundry.train.loop import pretrain
from test_pretrain import ENV, _records, _tree, tokens  # noqa: F401  (tokens: the shared data fixture)

TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "medfoundry",
    "pretrain",
]


def _fsdp_tree(tokens: dict, out: Path, steps: int, every: int) -> dict:
    tree = _tree(tokens, out, steps=steps)  # fp32, micro 4, global 8: 1 micro-batch per process under torchrun
    tree["distributed"] = {"strategy": "fsdp"}
    tree["checkpoint"] = {"every": every, "keep_last": 2}
    tree["eval"] = {"every": 4, "batches": 4}
    return tree


def _config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun job: the launcher and its workers (torchrun starts each worker in its own session)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optim_equal(a: dict, b: dict) -> bool:
    return (
        a["param_groups"] == b["param_groups"]
        and a["state"].keys() == b["state"].keys()
        and all(_tensors_equal(a["state"][i], b["state"][i]) for i in a["state"])
    )


def _base_model(tokens: dict, directory: Path) -> Path:
    """A from-scratch gpt2-tiny as a Hugging Face folder: both runs continue from it (FSDP2 initializes
    from scratch per shard, so only a loaded start is the same for 1 and 2 processes)."""
    from transformers import AutoTokenizer

    from medfoundry.train.model_setup import build_model

    torch.manual_seed(0)
    cfg = validate(PretrainConfig, _tree(tokens, directory, steps=1))
    build_model(cfg, len(AutoTokenizer.from_pretrained(tokens["tokenizer_dir"]))).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runs(tokens, tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps by 1 process (in this one) and by 2 FSDP processes (torchrun), without dropout,
    from the same checkpoint (loaded shard by shard under FSDP2)."""
    root = tmp_path_factory.mktemp("fsdp")
    base = _base_model(tokens, root / "base")
    trees = {name: _fsdp_tree(tokens, root / name, 6, 3) for name in ("fsdp", "single")}
    for tree in trees.values():
        tree["model"]["init_from"] = str(base)
    proc = subprocess.Popen(
        TORCHRUN + [str(_config(trees["fsdp"], root / "fsdp.yaml"))],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pretrain(validate(PretrainConfig, trees["single"]))  # strategy ignored: 1 process
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return {"single": root / "single", "fsdp": root / "fsdp"}


def test_fsdp_matches_one_process_and_exports(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one, two = _records(runs["single"]), _records(runs["fsdp"])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for key in ("loss", "val_loss"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-4)
    assert len([r for r in two if "loss" in r]) == 6
    kernels = json.loads((runs["fsdp"] / "run.json").read_text())["kernels"]
    # all of them under FSDP2 too (a run this short: training.compile auto stays eager)
    assert kernels == {"attention": "eager", "loss": "chunked", "compile": "off", "optimizer": "fused"}

    out = runs["fsdp"]
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert exported.config.architectures == ["GPT2LMHeadModel"]  # not the FSDP wrapper class
    reference = AutoModelForCausalLM.from_config(exported.config).eval()
    loaded = reference.load_state_dict(read_checkpoint(out / "checkpoints" / "step-00000006")["model"], strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys  # tied: stored once
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    ids = tokenizer("Immunohistochemistry of the tumour", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    single = AutoModelForCausalLM.from_pretrained(runs["single"] / "model").state_dict()
    assert all(torch.allclose(v, single[k], atol=1e-4) for k, v in exported.state_dict().items())


def _optim_by_name(model, optimizer) -> dict:
    """``optimizer.state_dict()`` keyed by parameter names, the form checkpoints hold."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    return {
        "state": {params[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [params[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def test_checkpoints_have_one_format(runs):
    """An FSDP checkpoint (2 processes) has the tensors of a 1-process one (optimizer state by parameter
    name, tied head stored once), loads into a plain model (resharded 2 -> 1), and a 1-process
    checkpoint loaded into an FSDP2 model (a 1-process group here) and saved again comes out identical."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from medfoundry.train import distributed
    from medfoundry.train.accel import HiddenStatesLM
    from medfoundry.train.optim import OptimConfig, build_optimizer
    from medfoundry.train.schedules import ScheduleConfig, build_scheduler

    fsdp_path = runs["fsdp"] / "checkpoints" / "step-00000006"
    fsdp = read_checkpoint(fsdp_path)
    assert json.loads((fsdp_path / "manifest.json").read_text())["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt"} <= {p.name for p in fsdp_path.iterdir()}
    single_path = runs["single"] / "checkpoints" / "step-00000006"
    single = read_checkpoint(single_path)
    assert fsdp["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    assert "transformer.wte.weight" in fsdp["optimizer"]["state"]
    assert fsdp["model"].keys() == single["model"].keys() and fsdp["trainer_state"]["step"] == 6
    assert "lm_head.weight" not in fsdp["model"]

    def build(model, directory):
        optimizer = build_optimizer(distributed.unwrap(model), OptimConfig(lr=3e-3))  # as the training loop does
        scheduler = build_scheduler(optimizer, 6, ScheduleConfig(kind="cosine", warmup_steps=3))
        return (
            model,
            optimizer,
            Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=1),
        )

    model, optimizer, checkpointer = build(
        AutoModelForCausalLM.from_pretrained(runs["single"] / "model"), runs["single"].parent / "unused"
    )
    checkpointer.load(fsdp_path)  # FSDP on 2 processes -> 1 process
    plain = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert _tensors_equal(plain, fsdp["model"]) and _optim_equal(_optim_by_name(model, optimizer), fsdp["optimizer"])

    store = dist.FileStore(str(runs["single"].parent / "store"), 1)  # 1 process -> FSDP2 and back
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from torch.distributed.fsdp import fully_shard

        model = HiddenStatesLM(AutoModelForCausalLM.from_pretrained(runs["single"] / "model"))
        for block in distributed.transformer_blocks(model):  # as distributed.wrap_model does under torchrun
            fully_shard(block)
        fully_shard(model)
        model, optimizer, checkpointer = build(model, runs["single"].parent / "again")
        assert distributed.is_sharded(model)
        state = checkpointer.load(single_path)
        again = checkpointer.save(state)
    finally:
        dist.destroy_process_group()
    again = read_checkpoint(again)
    assert _tensors_equal(again["model"], single["model"]) and _optim_equal(again["optimizer"], single["optimizer"])
    assert again["scheduler"] == single["scheduler"] and again["trainer_state"] == single["trainer_state"]


def test_fsdp_sigkill_then_resume_past_a_damaged_shard_is_bit_identical(tokens, tmp_path):
    """A whole torchrun job (launcher and both workers) killed with SIGKILL after its second checkpoint, whose
    shard file of process 1 is then damaged, and started again: process 0 (which verifies the checkpoint for
    all) names the file once, every process resumes from the checkpoint before it, and the run ends with the
    weights, optimizer state and metrics of an uninterrupted run. (One job tests both: each torchrun job costs
    about 25 s of start-up here.)"""
    steps, cfgs = 9, {}
    for name in ("straight", "killed"):
        tree = _fsdp_tree(tokens, tmp_path / name, steps, 3)
        tree["model"]["overrides"] = {}  # dropout on: every process must get the RNG state back
        cfgs[name] = _config(tree, tmp_path / f"{name}.yaml")
    straight = subprocess.Popen(
        TORCHRUN + [str(cfgs["straight"])], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed = subprocess.Popen(
        TORCHRUN + [str(cfgs["killed"])], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while killed.poll() is None and time.monotonic() < deadline:
        newest = latest_checkpoint(ckpts, clean=False)
        if newest is not None and newest.name == "step-00000006":
            _kill_job(killed)
            break
        time.sleep(0.01)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert straight.wait(timeout=300) == 0
    assert latest_checkpoint(ckpts, clean=False).name == "step-00000006"
    assert not (tmp_path / "killed" / "model").exists()
    damaged = ckpts / "step-00000006" / "__1_0.distcp"
    with open(damaged, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))

    started = time.time()
    resumed = subprocess.run(
        TORCHRUN + [str(cfgs["killed"])], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint: damaged, skipped: {damaged}: corrupted" in resumed.stderr
    assert resumed.stderr.count("damaged, skipped") == 1  # said once, by process 0

    for step in (6, steps):
        a = read_checkpoint(tmp_path / "straight" / f"checkpoints/step-{step:08d}")
        b = read_checkpoint(ckpts / f"step-{step:08d}")
        assert _tensors_equal(a["model"], b["model"]) and _optim_equal(a["optimizer"], b["optimizer"])
        assert len(a["rng"]) == len(b["rng"]) == 2 and a["trainer_state"] == b["trainer_state"]
        assert all(ra["torch"].equal(rb["torch"]) for ra, rb in zip(a["rng"], b["rng"]))
    from safetensors.torch import load_file

    assert _tensors_equal(
        load_file(tmp_path / "straight" / "model" / "model.safetensors"),
        load_file(tmp_path / "killed" / "model" / "model.safetensors"),
    )
    records = _records(tmp_path / "killed")
    assert [r["step"] for r in records] == [r["step"] for r in _records(tmp_path / "straight")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # one run's log
    trained = {r["step"]: r["time"] for r in records if "loss" in r}
    assert all(trained[s] < started for s in (1, 2, 3)) and all(trained[s] > started for s in (4, 5, 6))


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    """Resharding 2 -> 1: the FSDP run's step-3 checkpoint continued by one process reads on at the global
    data position and gives the FSDP run's losses at steps 4..6 (the same windows, summed in another order)."""
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs["fsdp"] / "checkpoints" / "step-00000003", one / "checkpoints" / "step-00000003")
    tree = yaml.safe_load((runs["fsdp"].parent / "fsdp.yaml").read_text())
    tree["output_dir"] = str(one)
    pretrain(validate(PretrainConfig, tree))
    resumed = {r["step"]: r["loss"] for r in _records(one) if "loss" in r}
    fsdp = {r["step"]: r["loss"] for r in _records(runs["fsdp"]) if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([fsdp[s] for s in (4, 5, 6)], rel=1e-5)
