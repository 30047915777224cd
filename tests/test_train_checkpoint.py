"""Checkpoints: bit-identical resume (in process and after SIGKILL), pruning, completeness."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from medfoundry.errors import MedfoundryError
from medfoundry.train.checkpoint import Checkpointer, is_complete, latest_checkpoint, read_checkpoint
from medfoundry.train.optim import OptimConfig, build_optimizer, clip_grads, grad_norm
from medfoundry.train.schedules import ScheduleConfig, build_scheduler
from medfoundry.train.state import TrainState

TOTAL = 10
DATA = torch.randint(0, 64, (TOTAL, 2, 12), generator=torch.Generator().manual_seed(7))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int):
    """A tiny GPT-2 (tied head, dropout 0.1 everywhere) with its optimizer and schedule."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    return model, optimizer, build_scheduler(optimizer, TOTAL, ScheduleConfig(warmup_steps=3))


def train(model, optimizer, scheduler, start: int, stop: int) -> None:
    for step in range(start, stop):
        ids = DATA[step].clone()
        ids[:, np.random.randint(ids.shape[1])] = random.randrange(64)  # Python and NumPy RNGs matter too
        model(input_ids=ids, labels=ids).loss.backward()
        clip_grads(model.parameters(), 1.0, grad_norm(model.parameters()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def checkpointer(directory, model, optimizer, scheduler, keep_last=3) -> Checkpointer:
    return Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=keep_last)


def save(directory, step, model, optimizer, scheduler, keep_last=3, tokens=0):
    state = TrainState(step=step, tokens=tokens, reader_state={"position": step * 2})
    return checkpointer(directory, model, optimizer, scheduler, keep_last).save(state)


def test_resume_is_bit_identical(tmp_path):
    seed_all(0)
    model, optimizer, scheduler = setup(0)
    train(model, optimizer, scheduler, 0, TOTAL)
    expected, expected_lr = model.state_dict(), optimizer.param_groups[0]["lr"]

    seed_all(0)
    model, optimizer, scheduler = setup(0)
    train(model, optimizer, scheduler, 0, 4)
    path = save(tmp_path, 4, model, optimizer, scheduler, tokens=96)
    assert path == tmp_path / "step-00000004" and latest_checkpoint(tmp_path) == path

    for control in (False, True):
        model, optimizer, scheduler = setup(1)  # a different init, and the RNGs have moved on
        random.random(), np.random.rand()
        state = checkpointer(tmp_path, model, optimizer, scheduler).restore()
        assert state == TrainState(step=4, tokens=96, reader_state={"position": 8})
        assert read_checkpoint(path)["trainer_state"] == {
            "step": 4,
            "reader_state": {"position": 8},
            "extra": {"tokens": 96, "targets": 0, "skipped": 0, "skipped_in_a_row": 0},
        }
        if control:
            torch.rand(1)  # one stray random draw after loading changes the dropout masks
        train(model, optimizer, scheduler, 4, TOTAL)
        if not control:
            assert_same(model.state_dict(), expected)
            assert optimizer.param_groups[0]["lr"] == expected_lr
        else:
            assert not all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_tied_weights_stored_once_and_loaded_strictly(tmp_path):
    model, optimizer, scheduler = setup(0)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    with safe_open(path / "model.safetensors", framework="pt") as fh:
        keys = set(fh.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert_same(read_checkpoint(path)["model"], model.state_dict())
    other = nn.Linear(2, 2)
    with pytest.raises(MedfoundryError, match="does not fit this model"):
        checkpointer(tmp_path, other, torch.optim.AdamW(other.parameters()), scheduler).load(path)


def small():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer, build_scheduler(optimizer, 10, ScheduleConfig())


def test_keep_last_prunes_older_folders(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, *small(), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    for step in range(6, 9):
        save(tmp_path, step, *small(), keep_last=0)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 5
    save(tmp_path, 9, *small(), keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000009"]


def test_latest_ignores_incomplete_and_temporary_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None and latest_checkpoint(tmp_path) is None
    good = save(tmp_path, 5, *small())
    temp = tmp_path / ".step-00000009.x1y2.tmp"  # an interrupted save: all files, but never renamed
    shutil.copytree(good, temp)
    broken = tmp_path / "step-00000007"
    shutil.copytree(good, broken)
    (broken / "rng.pt").unlink()
    assert is_complete(good) and not is_complete(broken)
    assert latest_checkpoint(tmp_path) == good
    assert not temp.exists() and broken.exists()
    with pytest.raises(MedfoundryError, match="missing rng.pt"):
        read_checkpoint(broken)


SCRIPT = r"""
import random, sys, time
import numpy as np, torch
import torch.nn.functional as F
from torch import nn
from medfoundry.train.checkpoint import Checkpointer
from medfoundry.train.optim import OptimConfig, build_optimizer, clip_grads, grad_norm
from medfoundry.train.schedules import ScheduleConfig, build_scheduler

out, total, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.drop = nn.Embedding(32, 16), nn.Dropout(0.2)
        self.mlp, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.drop(torch.relu(self.mlp(self.drop(self.emb(ids)))))))

random.seed(0); np.random.seed(0); torch.manual_seed(0)
model = Tiny()
optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
scheduler = build_scheduler(optimizer, total, ScheduleConfig(warmup_steps=3))
data = torch.randint(0, 32, (total * 4, 9), generator=torch.Generator().manual_seed(1))
class Reader:
    position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

reader = Reader()
checkpointer = Checkpointer(out, model=model, optimizer=optimizer, scheduler=scheduler, reader=reader, keep_last=2)
state = checkpointer.restore()
print("start", state.step, flush=True)
while state.step < total:
    batch = data[reader.position : reader.position + 4].clone()
    reader.position += 4
    batch[:, np.random.randint(9)] = random.randrange(32)
    loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    clip_grads(model.parameters(), 0.5, grad_norm(model.parameters()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state.record_step(36, 32, finite=True)
    checkpointer.save(state)
    time.sleep(pause)
"""


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    total = 30

    def run(out, pause):
        return subprocess.Popen(
            [sys.executable, str(script), str(out), str(total), str(pause)], stdout=subprocess.PIPE, text=True
        )

    straight = run(tmp_path / "straight", 0)
    killed = run(tmp_path / "killed", 0.03)
    deadline = time.monotonic() + 60
    while (latest := latest_checkpoint(tmp_path / "killed", clean=False)) is None or int(latest.name[5:]) < 8:
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / f"step-{total:08d}").exists()

    resumed = run(tmp_path / "killed", 0)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and straight.wait(timeout=120) == 0
    assert 8 <= int(out.split()[1]) < total  # it did resume mid-way
    a = read_checkpoint(tmp_path / "straight" / f"step-{total:08d}")
    b = read_checkpoint(tmp_path / "killed" / f"step-{total:08d}")
    assert_same(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same(sa, sb)
    assert a["trainer_state"] == b["trainer_state"]
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [f"step-{s:08d}" for s in (total - 1, total)]
