"""Checkpoints: bit-identical resume (in process and after SIGKILL), pruning, completeness."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from medfoundry.errors import MedfoundryError
from medfoundry.train.checkpoint import Checkpointer, is_complete, latest_checkpoint, read_checkpoint, saved_tensors
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
    keys = set(saved_tensors(path))
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_same(read_checkpoint(path)["model"], expected)
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
    (broken / "rng-00000.pt").unlink()
    assert is_complete(good) and not is_complete(broken)
    assert latest_checkpoint(tmp_path) == good
    assert not temp.exists() and broken.exists()
    with pytest.raises(MedfoundryError, match="missing rng-00000.pt"):
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


def test_an_asynchronous_save_is_the_synchronous_one_once_finished(tmp_path):
    """``async_save``: the shards are written in the background; the folder appears (verified, with its
    manifest) when the save is finished by :meth:`Checkpointer.wait` or the next save, and holds what a
    synchronous save of the same state holds."""
    seed_all(0)
    model, optimizer, scheduler = setup(0)
    train(model, optimizer, scheduler, 0, 3)
    sync = save(tmp_path / "sync", 3, model, optimizer, scheduler)
    background = Checkpointer(
        tmp_path / "async", model=model, optimizer=optimizer, scheduler=scheduler, keep_last=1, async_save=True
    )
    background.save(TrainState(step=3, reader_state={"position": 6}))
    background.wait()
    path = tmp_path / "async" / "step-00000003"
    assert latest_checkpoint(tmp_path / "async") == path
    a, b = read_checkpoint(sync), read_checkpoint(path)
    assert_same(a["model"], b["model"]) and a["trainer_state"] == b["trainer_state"]
    for name, state in a["optimizer"]["state"].items():
        assert_same(state, b["optimizer"]["state"][name])
    train(model, optimizer, scheduler, 3, 4)
    background.save(TrainState(step=4))  # finishes step 3's first (already done), then prunes it once 4 is in
    background.wait()
    assert [p.name for p in (tmp_path / "async").iterdir()] == ["step-00000004"]


AGREEMENT = r"""
import sys
import torch
import torch.distributed as dist
from torch import nn
from medfoundry.train import checkpoint, distributed
from medfoundry.train.checkpoint import Checkpointer, DamagedCheckpoint
from medfoundry.train.schedules import ScheduleConfig, build_scheduler
from medfoundry.train.state import TrainState

d = distributed.init_distributed("gloo", "cpu")
torch.manual_seed(d.rank)  # different weights on each process: DDP-style replicas need not agree to be saved
model = nn.Linear(8, 8)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = build_scheduler(optimizer, 10, ScheduleConfig())
model(torch.randn(2, 8)).sum().backward()
optimizer.step()
ckpt = Checkpointer(sys.argv[1], model=model, optimizer=optimizer, scheduler=scheduler, dist=d)
ckpt.save(TrainState(step=3))
assert ckpt.restore().step == 3
if d.rank == 1:  # this process's file system does not show the folder (no shared file system)
    def unreadable(path):
        raise DamagedCheckpoint(f"{path}/.metadata: No such file or directory")
    checkpoint.read_index = unreadable
try:
    ckpt.restore()
except DamagedCheckpoint as exc:
    print(f"rank {d.rank}: {exc}", flush=True)
    sys.exit(3)
"""


def test_every_process_agrees_on_the_checkpoint_or_all_stop(tmp_path):
    """Two processes: process 0 chooses and verifies the checkpoint, both load it; when one process cannot
    read it, both stop with the same error naming that process (none resumes alone from step 0)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        + [str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: process 1 cannot read the checkpoint: " in run.stdout, run.stdout + run.stderr[-2000:]
    assert "(every process must see the checkpoint folder: a shared file system)" in run.stdout
    manifest = (tmp_path / "ckpt" / "step-00000003" / "manifest.json").read_text()
    assert '"world_size": 2' in manifest and "rng-00001.pt" in manifest
