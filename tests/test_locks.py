"""Two processes on one folder (issue 18): a second recipe run, corpus build, training run or conversion on a
folder another process holds fails at once, naming the holder (pid, host, command line, since when), and
a killed holder blocks nothing; a temporary folder being written (an atomic_dir's, a checkpoint save's) is
removed only once its writer is dead."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from medfoundry.cli import main
from medfoundry.errors import FolderBusy
from medfoundry.io import atomic_dir, folder_lock
from medfoundry.train.checkpoint import Checkpointer, latest_checkpoint

ENV = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1"}

# A process holding something while it sleeps: the folder lock of argv[1], or a folder being written
HOLD_LOCK = "from medfoundry.io import folder_lock as hold\nwith hold(sys.argv[1], 'a test holder'):\n"
WRITE_DIR = "from medfoundry.io import atomic_dir as hold\nwith hold(sys.argv[1]) as out:\n"
SAVE_DIR = "from medfoundry.io import claimed_dir as hold\nwith hold(sys.argv[1]) as out:\n"  # a checkpoint save's


@contextlib.contextmanager
def holder(prologue: str, path: Path) -> Iterator[subprocess.Popen]:
    """A Python process that runs ``prologue`` on ``path`` then sleeps (writing a file into ``out`` when the
    prologue names one); SIGKILLed at the end of the block if still alive."""
    body = "    (out / 'part').write_bytes(b'x')\n" if " as out" in prologue else ""
    code = f"import sys, time\n{prologue}{body}    print('held', flush=True)\n    time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_folder_fails_at_once_naming_the_holder_until_it_dies(tmp_path):
    run = tmp_path / "run"
    with holder(HOLD_LOCK, run) as proc:
        started = time.monotonic()
        with pytest.raises(FolderBusy) as busy, folder_lock(run, "a second run"):
            pass
        assert time.monotonic() - started < 1
        message = str(busy.value)
        for named in (str(run), "a test holder", f"pid {proc.pid} on {socket.gethostname()}", "since ", "-c"):
            assert named in message
        assert "\n" not in message
        proc.kill()  # SIGKILL: no clean-up of its own
        proc.wait()
        with folder_lock(run, "the next run"):  # the operating system let go of the dead holder's lock
            pass


def _configs(tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    """Each command with the folder it must hold: its argv and that folder."""
    (tmp_path / "s.jsonl").write_text('{"text": "Aspirin inhibits cyclooxygenase."}\n')
    source = {"name": "s", "kind": "jsonl", "paths": [str(tmp_path / "s.jsonl")], "fields": {"text": ["text"]}}
    corpus = {"output_dir": str(tmp_path / "corpus"), "sources": [source], "decontam": {"enabled": False}}
    pretrain = {
        "output_dir": str(tmp_path / "pretrain"),
        "model": {"preset": "gpt2-tiny", "context": 64},
        "data": {"tokens_dir": str(tmp_path / "tokens"), "tokenizer_dir": str(tmp_path / "tok")},
        "training": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 1},
    }
    recipe = {"name": "r", "run_dir": str(tmp_path / "run"), "stages": {"corpus": {"sources": [source]}}}
    files = {}
    for name, tree in (("corpus", corpus), ("pretrain", pretrain), ("recipe", recipe)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(tree))
    return {
        "run": (["run", str(files["recipe"])], tmp_path / "run"),
        "corpus build": (["corpus", "build", str(files["corpus"])], tmp_path / "corpus"),
        "corpus build, its work folder": (
            ["corpus", "build", str(files["corpus"]), "--set", f"work_dir={tmp_path / 'work'}"],
            tmp_path / "work",
        ),
        "pretrain": (["pretrain", str(files["pretrain"])], tmp_path / "pretrain"),
        "convert": (["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf")], tmp_path / "hf"),
    }


@pytest.mark.parametrize("command", ["run", "corpus build", "corpus build, its work folder", "pretrain", "convert"])
def test_a_second_command_on_a_held_folder_fails_at_once(tmp_path, capsys, command):
    """The command's own folder held by another process: exit code 2 and one line naming the holder, before
    any work (the tokens, tokenizer and GGUF file these configs name do not even exist)."""
    argv, folder = _configs(tmp_path)[command]
    with holder(HOLD_LOCK, folder) as proc:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder} is in use by another process (a test holder: pid {proc.pid} ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_atomic_dir_removes_a_dead_writers_folder_only(tmp_path):
    """A writer of the same folder in another process: its temporary folder is left alone while it lives
    (before, it was removed under it), and removed once it was killed."""
    final = tmp_path / "model"
    with holder(WRITE_DIR, final):
        (theirs,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        with atomic_dir(final) as mine:
            (mine / "config.json").write_text("{}")
        assert (theirs / "part").read_bytes() == b"x" and (final / "config.json").is_file()
    assert theirs.is_dir()  # killed: left behind
    with atomic_dir(final) as mine:
        (mine / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_latest_checkpoint_leaves_a_save_in_progress_alone(tmp_path):
    """``latest_checkpoint(clean=True)`` removes a killed save's leftovers, not the folder a live process is
    saving into (before, it removed it): claimed by the saver, in another process or through another
    handle (a flock is per open file) in this one."""
    saving = tmp_path / ".step-00000004.saving"
    with holder(SAVE_DIR, saving):
        assert latest_checkpoint(tmp_path) is None and (saving / "part").is_file()
    assert latest_checkpoint(tmp_path) is None and list(tmp_path.iterdir()) == []  # killed: cleaned

    staging, claimed = Checkpointer(tmp_path, model=None, optimizer=None, scheduler=None)._staging(
        tmp_path / "step-00000006"
    )
    latest_checkpoint(tmp_path)
    assert staging.is_dir()
    claimed.close()
    latest_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []
