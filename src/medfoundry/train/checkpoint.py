"""Training checkpoints in ``torch.distributed.checkpoint`` (DCP) format: every process writes its own
shards in parallel, a run resumes exactly, on the same or another number of processes, even after SIGKILL.

The loop sees only the :class:`Checkpointer`: built with the run's stateful objects (model, optimizer,
scheduler, data reader) and its checkpoint folder, it saves a :class:`~medfoundry.train.state.TrainState`
(``checkpointer.save(state)``) and restores the newest intact checkpoint (``checkpointer.restore()``).
A single process, DDP and FSDP2 write the same format.

A checkpoint is a folder ``step-{step:08d}/`` holding

- ``.metadata`` and ``__{rank}_0.distcp``: DCP's index and each process's shards of the model weights
  (``model.NAME``, a tied output head once, under its first name) and of the optimizer state
  (``optim.NAME.exp_avg``...). Under FSDP2 each process writes its own shard; under DDP, DCP spreads
  the replicated tensors over the processes. Nothing is gathered: no process ever holds the whole
  optimizer state.
- ``trainer_state.json``: the step, the counters, the data reader's position (a global position, the
  same on every process), the scheduler's state, the optimizer's param groups, and the world size.
- ``rng-{rank:05d}.pt``: each process's own Python, NumPy, torch CPU and device generator states
  (loaded with ``torch.load(weights_only=True)``).
- ``hf/``: the model's ``config.json``, ``generation_config.json`` and tokenizer (no weights), so that
  ``medfoundry export`` turns any saved step into a Hugging Face folder by itself.
- ``manifest.json``: the size and xxh3-128 checksum of every other file (written last).

Writing. Process 0 makes a hidden temporary folder beside the final one, claimed while it is written
(:func:`medfoundry.io.claimed_dir`: no other process cleans it away); every process writes its
shards and RNG state into it and checksums what it wrote; process 0 gathers the checksums, writes the
trainer state and the manifest, fsyncs and renames the folder into place, so a ``step-*`` folder is
complete or does not exist. A write that fails on any process (disk full, file size limit, quota)
fails the save on every process with :class:`CheckpointWriteError` naming the file and the cause; the
previous checkpoint stays intact. With ``async_save`` the shards are written in the background
(``dcp.async_save``) while training goes on; the save is finished (checksums, manifest, rename) at the
next save or at the end of the run.

Reading. Process 0 chooses the checkpoint: the newest whose files all match their manifest (a damaged
one is reported, naming the file, and the one before it used), and broadcasts its choice; every
process checks it can read it, and all fail together otherwise. DCP reads each process's slices of
the saved tensors, whatever the number of processes that wrote them (resharding); the data reader
continues at the global position. RNG states are restored per process when the number of processes
is the same (dropout masks continue exactly on every process), else every process takes process 0's.

DCP's index and its non-tensor items are pickles: the index is read with an unpickler that accepts
only DCP's own metadata classes, and checkpoints hold tensors only (no pickled objects are loaded).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import resource
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from medfoundry.errors import FolderBusy, MedfoundryError
from medfoundry.io import CHECKSUM, DISK_FULL, claim, claimed_dir, file_checksum, fsync_dir, replace_dir
from medfoundry.train import distributed
from medfoundry.train.state import Stateful, TrainState, get_rng_state, set_rng_state

METADATA = ".metadata"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DESCRIPTION = "hf"  # the model's config, generation config and tokenizer: `medfoundry export` needs no run folder
_STEP_DIR = re.compile(r"step-(\d{8})")
_LEFTOVER = re.compile(r"\.(step-\d{8})\.")  # .step-N.saving, .step-N.old, .step-N.deleting


class CheckpointWriteError(MedfoundryError):
    """A checkpoint could not be written (disk full, file size limit...); the previous one is intact."""


class DamagedCheckpoint(MedfoundryError):
    """A checkpoint's files are missing, truncated or do not match the checksums of its manifest."""


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


# --- DCP's index, read without running code -------------------------------------------------------------

_INDEX_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
}


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: accept its own metadata classes and torch's dtypes and layouts only."""

    def find_class(self, module: str, name: str):
        allowed = module == "torch.distributed.checkpoint.metadata" or (module, name) in _INDEX_CLASSES
        if module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with the index read by :class:`_IndexUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _IndexUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"not a checkpoint index but a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnly(DefaultLoadPlanner):
    """Loads tensors; a pickled object where a tensor belongs is refused, never unpickled."""

    def load_bytes(self, read_item, value) -> None:
        raise DamagedCheckpoint(f"{read_item.dest_index.fqn}: a pickled object where the checkpoint holds tensors")


def read_index(path: str | os.PathLike) -> Metadata:
    """DCP's index of the checkpoint at ``path`` (:class:`DamagedCheckpoint` when unreadable)."""
    try:
        return _Reader(path).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise DamagedCheckpoint(f"{Path(path) / METADATA}: unreadable checkpoint index ({exc})") from None


def _load(path: Path, target: dict, *, no_dist: bool = False) -> None:
    """Fill the tensors of ``target`` (nested dicts of tensors or DTensors) from the checkpoint, in place."""
    try:
        with _single_process_quiet():
            dcp.load(target, storage_reader=_Reader(path), planner=_TensorsOnly(), no_dist=no_dist)
    except MedfoundryError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP wraps every rank's failure in a CheckpointException
        _, cause = _dcp_failure(exc, path)
        if isinstance(cause, MedfoundryError):
            raise cause from None
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint shards ({_first_line(cause)})") from None


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it saves "in a single process" when no process group is up: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


# --- files, checksums and failures ----------------------------------------------------------------------


def _entry(path: Path) -> dict:
    """A file's manifest entry, after flushing it to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}


def _write_failure(exc: BaseException, path: Path | None) -> str:
    """Why writing ``path`` failed, in words: a full disk, quota or file size limit when the error says
    so or, for writers that drop errno (torch.save's C++ writer), when the half-written file (still
    there) and the state of the machine do."""
    code = getattr(exc, "errno", None)
    if code in DISK_FULL:
        return DISK_FULL[code]
    text = " ".join(str(exc).split())
    for code, reason in DISK_FULL.items():
        if os.strerror(code) in text or f"os error {code})" in text or f"Errno {code}]" in text:
            return reason
    detail = f"{type(exc).__name__}: {text[:300]}"
    if path is None:
        return detail
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return f"{DISK_FULL[errno.ENOSPC]} ({detail})"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError):
            if path.stat().st_size >= soft - max(1 << 16, soft // 100):
                return f"{DISK_FULL[errno.EFBIG]}: {soft:,} bytes ({detail})"
        return f"{detail}; a file size limit of {soft:,} bytes is set (RLIMIT_FSIZE, `ulimit -f`)"
    return detail


def _dcp_failure(exc: BaseException, directory: Path) -> tuple[Path, BaseException]:
    """The file and the error of the first process whose shard could not be written, from DCP's exception."""
    failures = getattr(exc, "failures", None) or {}
    for rank, failure in sorted(failures.items()):
        inner = getattr(failure, "exc", failure)
        return directory / f"__{rank}_0.distcp", inner
    return directory / METADATA, exc


def _shard_failure(exc: BaseException, directory: Path) -> tuple[str, str]:
    """(file, cause) of a failed DCP save, for :class:`CheckpointWriteError`."""
    file, cause = _dcp_failure(exc, directory)
    return file.name, _write_failure(cause, file)


def _say(message: str) -> None:
    """A notice on stderr, from one process only."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _step_dirs(directory: Path) -> list[Path]:
    """``step-*`` folders, oldest first."""
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _previous(directory: Path, final: Path) -> str:
    complete = [p for p in _step_dirs(directory) if p != final and is_complete(p)]
    return f"the previous checkpoint {complete[-1]} is intact" if complete else "there is no earlier checkpoint"


def _prune(directory: Path, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest step folders up to ``step`` (0 keeps all). Folders of later steps
    (damaged ones resumed before) are left alone: training replaces them in turn."""
    if keep_last <= 0:
        return
    older = [p for p in _step_dirs(directory) if int(p.name[5:]) < step]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        trash = path.with_name(f".{path.name}.deleting")  # renamed first: never a half-deleted step-* folder
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _remove_abandoned_saves(directory: Path) -> None:
    """Remove the hidden leftovers (``.step-N.*``) of killed saves and deletions, step by step, after undoing a
    replacement killed between its two renames; a step that a live process is saving (it claims
    ``.step-N.saving``, :meth:`Checkpointer._staging`) is left alone."""
    steps = {m.group(1) for p in directory.glob(".step-*") if (m := _LEFTOVER.match(p.name))}
    for step in sorted(steps):
        with claim(directory / f".{step}.saving") as abandoned:
            if not abandoned:
                continue
            _restore_replaced(directory / step)
            for leftover in directory.glob(f".{step}.*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover.suffix != ".claim":  # the claim is this process's: removed as it lets go
                    leftover.unlink(missing_ok=True)


def _restore_replaced(final: Path) -> None:
    """Undo a replacement interrupted between :func:`medfoundry.io.replace_dir`'s two renames."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        with contextlib.suppress(OSError):  # another process may have done it already
            old.rename(final)


# --- verification -----------------------------------------------------------------------------------------


def _manifest(path: Path) -> dict:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("no file list")
    return manifest


def _missing(path: Path) -> str | None:
    """What a checkpoint folder lacks, or None: its manifest, or a file the manifest lists."""
    if not (path / MANIFEST).is_file():
        return f"{path}: incomplete checkpoint: no {MANIFEST}, so its files cannot be verified (move the folder away)"
    try:
        files = _manifest(path)["files"]
    except (OSError, ValueError) as exc:
        return f"{path / MANIFEST}: unreadable checkpoint manifest ({exc})"
    missing = [name for name in files if not (path / name).is_file()]
    return f"{path}: incomplete checkpoint, missing {', '.join(missing)}" if missing else None


def is_complete(path: str | os.PathLike) -> bool:
    return _missing(Path(path)) is None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder, naming the file at fault, or None when every file is
    there and matches the size and checksum its manifest records. Hashes every file (a read of the
    whole checkpoint)."""
    path = Path(path)
    missing = _missing(path)
    if missing:
        return missing
    manifest = _manifest(path)
    if manifest.get("checksum") != CHECKSUM:
        return f"{path / MANIFEST}: unknown checksum {manifest.get('checksum')!r} (this version checks {CHECKSUM})"
    if _STEP_DIR.fullmatch(path.name) and manifest.get("step") != int(path.name[5:]):
        return f"{path / MANIFEST}: the manifest is for step {manifest.get('step')!r}, not {int(path.name[5:])}"
    files = manifest["files"]
    world = manifest.get("world_size")
    required = [METADATA, TRAINER_STATE] + ([rng_file(r) for r in range(world)] if isinstance(world, int) else [])
    unlisted = [name for name in required if name not in files]
    if unlisted or not isinstance(world, int):
        return f"{path / MANIFEST}: no checksum recorded for {', '.join(unlisted) or 'the world size'}"
    for name, expected in files.items():
        parts = name.split("/")
        if (
            not isinstance(expected, dict)
            or len(parts) > 2
            or ".." in parts
            or (len(parts) == 2 and parts[0] != DESCRIPTION)
        ):
            return f"{path / MANIFEST}: malformed entry for {name}"
        size = (path / name).stat().st_size
        if size != expected.get("bytes"):
            recorded = expected.get("bytes")
            recorded = f"{recorded:,}" if isinstance(recorded, int) else repr(recorded)
            return (
                f"{path / name}: truncated or damaged: {size:,} bytes where the checkpoint manifest records {recorded}"
            )
        digest = file_checksum(path / name)
        if digest != expected.get(CHECKSUM):
            return (
                f"{path / name}: corrupted: its {CHECKSUM} checksum is {digest}, the checkpoint manifest "
                f"records {expected.get(CHECKSUM)}"
            )
    return None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedCheckpoint` naming the file at fault unless every file of the checkpoint at
    ``path`` matches its manifest."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(problem)


def latest_checkpoint(directory: str | os.PathLike, clean: bool = True, verify: bool = True) -> Path | None:
    """The newest intact ``step-*`` folder, or None when there is none at all. With ``clean``, hidden
    leftovers of interrupted saves and deletions (``.step-*``) are removed first, except those of a save
    that a live process is making (:func:`_remove_abandoned_saves`): call it before training starts. With
    ``verify`` every file is checked against the folder's manifest: a damaged checkpoint (file missing,
    truncated, corrupted) is reported on stderr, naming the file, and the previous intact one is returned
    instead; when every checkpoint is damaged, :class:`DamagedCheckpoint` lists them (move them away to
    start over). Without it, the newest complete folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if clean:
        _remove_abandoned_saves(directory)
    folders = _step_dirs(directory)
    if not verify:
        complete = [p for p in folders if is_complete(p)]
        return complete[-1] if complete else None
    damaged = []
    for path in reversed(folders):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                _say(f"checkpoint: using {path}, the newest intact checkpoint")
            return path
        damaged.append(problem)
        _say(f"checkpoint: damaged, skipped: {problem}")
    if damaged:
        raise DamagedCheckpoint(
            f"{directory}: no intact checkpoint: {'; '.join(damaged)}. Move these folders away to start training over."
        )
    return None


# --- reading whole tensors (tests, the export) -------------------------------------------------------------


def read_trainer_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of a checkpoint: step, counters, reader position, scheduler, param groups."""
    file = Path(path) / TRAINER_STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not {"step", "reader_state", "extra", "scheduler", "param_groups"} <= set(
            state
        ):
            raise ValueError("not a training state")
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{file}: unreadable training state ({exc})") from None
    return state


def saved_tensors(path: str | os.PathLike, section: str = "model") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the tensors a checkpoint saved in ``section`` (``model``: by parameter
    name; ``optim``: ``NAME/exp_avg``...), in the order they were saved."""
    index = read_index(path)
    found = {}
    for key, meta in index.state_dict_metadata.items():
        where = (index.planner_data or {}).get(key, tuple(key.split(".", 1)))
        if where[0] == section and isinstance(meta, TensorStorageMetadata):
            found["/".join(where[1:])] = (tuple(meta.size), meta.properties.dtype)
    return found


def _nested(section: str, name: str, tensor: torch.Tensor) -> dict:
    keys = [section, *name.split("/")] if section == "optim" else [section, name]
    target: dict = {}
    inner = target
    for key in keys[:-1]:
        inner = inner.setdefault(key, {})
    inner[keys[-1]] = tensor
    return target


def read_tensor(path: str | os.PathLike, name: str, section: str = "model") -> torch.Tensor:
    """One whole tensor of a checkpoint, on CPU, read without a process group (whatever wrote it)."""
    shape, dtype = saved_tensors(path, section)[name]
    tensor = torch.empty(shape, dtype=dtype)
    _load(Path(path), _nested(section, name, tensor), no_dist=True)
    return tensor


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Everything a checkpoint holds, whole and on CPU (for tests and inspection; the export reads one
    tensor at a time): ``model`` ``{name: tensor}``, ``optimizer`` (``state`` by parameter name and
    ``param_groups``), ``scheduler``, ``rng`` (a list, by process) and ``trainer_state``."""
    path = Path(path)
    problem = checkpoint_problem(path) if verify else _missing(path)
    if problem is not None:
        raise DamagedCheckpoint(problem)
    trainer = read_trainer_state(path)
    model = {name: read_tensor(path, name) for name in saved_tensors(path, "model")}
    optim: dict = {}
    for name in saved_tensors(path, "optim"):
        param, key = name.rsplit("/", 1)
        optim.setdefault(param, {})[key] = read_tensor(path, name, "optim")
    rng = [_read_rng(path, rank) for rank in range(trainer["world_size"])]
    return {
        "model": model,
        "optimizer": {"state": optim, "param_groups": trainer["param_groups"]},
        "scheduler": trainer["scheduler"],
        "rng": rng,
        "trainer_state": {k: trainer[k] for k in ("step", "reader_state", "extra")},
    }


def _read_rng(path: Path, rank: int) -> dict:
    file = path / rng_file(rank)
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # torch.load's zip and unpickler errors alike
        raise DamagedCheckpoint(f"{file}: unreadable RNG state ({_first_line(exc)})") from None


# --- the checkpointer --------------------------------------------------------------------------------------


def _live_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, list]:
    """This process's view of the model and optimizer states (shards under FSDP2, no copies): the DCP
    state ``{"model": ..., "optim": ...}`` (a tied weight under its first name only), the model state
    dict with every name (for ``set_state_dict``) and the optimizer's param groups."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    lm = distributed.unwrap(model)
    model_state, optim_state = get_state_dict(lm, optimizer)
    aliases = distributed.tied_names(lm)
    for name, values in optim_state["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise MedfoundryError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a tensor")
    tensors = {"model": {k: v for k, v in model_state.items() if k not in aliases}, "optim": optim_state["state"]}
    return tensors, model_state, optim_state["param_groups"]


def _check_fits(path: Path, tensors: dict) -> None:
    """Same names and (global) shapes as the model: DCP would load a partial checkpoint silently."""
    saved = {name: shape for name, (shape, _) in saved_tensors(path, "model").items()}
    expected = {name: tuple(t.shape) for name, t in tensors["model"].items()}
    if saved == expected:
        return
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k}: {saved[k]} saved, {s} here" for k, s in expected.items() if k in saved and saved[k] != s]
    raise MedfoundryError(
        f"{path}: the checkpoint does not fit this model: {'; '.join(problems[:5])}"
        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    )


def _param_groups(path: Path, saved: list, current: list) -> list:
    """The saved param groups, checked against the optimizer's (same parameters, in the same groups)."""
    names = [list(group["params"]) for group in current]
    if [list(group["params"]) for group in saved] != names:
        raise MedfoundryError(
            f"{path}: the optimizer state does not fit this model: param groups of "
            f"{[len(g['params']) for g in saved]} parameters saved, {[len(g) for g in names]} here, or other names"
        )
    return saved


@dataclass
class _Save:
    """A save under way: its folder, its staging folder and what process 0 writes when the shards are in."""

    final: Path
    tmp: Path
    trainer_state: dict
    claim: contextlib.ExitStack  # process 0's claim on ``tmp``, released once it is in place or removed
    future: object | None = None  # dcp.async_save's future
    error: tuple[str, str] | None = None  # (file, cause) of this process's failed write


class Checkpointer:
    """A run's checkpoints: the folder ``directory`` (``step-*`` folders, the ``keep_last`` newest kept;
    0 keeps all) and the stateful objects they save and restore.

    ``model`` is the model as trained: plain, compiled, DDP-wrapped or FSDP2-sharded, with or without
    the hidden-states wrapper of the fused loss (the plain Hugging Face model's state dict is saved).
    ``reader``, the data reader, is optional: without one the :class:`TrainState`'s ``reader_state``
    is saved as it is. Under torchrun pass the run's ``dist`` and ``device``: :meth:`save`,
    :meth:`restore` and :meth:`wait` are collectives (every process calls them). With ``async_save``
    the shards are written in the background; :meth:`wait` (called by the next save) finishes them."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Stateful,
        reader: Stateful | None = None,
        keep_last: int = 0,
        dist: distributed.Dist | None = None,
        device: str = "cpu",
        async_save: bool = False,
        describe: Callable[[Path], None] | None = None,
    ):
        self.directory = Path(directory)
        self.model, self.optimizer, self.scheduler, self.reader = model, optimizer, scheduler, reader
        self.keep_last, self.dist, self.device = keep_last, dist or distributed.Dist(), device
        self.async_save, self.describe = async_save, describe
        self._pending: _Save | None = None
        self._async_group = distributed.new_group(self.dist) if async_save else None

    # saving

    def save(self, state: TrainState) -> Path:
        """Write ``step-{state.step:08d}/`` (the reader's position and the RNG states are recorded in
        ``state`` first), then prune older folders; returns the folder. When any process cannot write
        (disk full...) every process raises :class:`CheckpointWriteError`; the previous checkpoint is
        intact. With ``async_save`` it returns once the shards are staged; the folder appears at the
        next :meth:`wait`."""
        self.wait()
        if self.reader is not None:
            state.reader_state = self.reader.state_dict()
        state.rng = get_rng_state()
        final = self.directory / f"step-{state.step:08d}"
        tmp, claimed = self._staging(final)
        tensors, _, groups = _live_state(self.model, self.optimizer)
        saved = state.state_dict()
        rng = saved.pop("rng")
        trainer_state = {
            "step": saved.pop("step"),
            "reader_state": saved.pop("reader_state"),
            "extra": saved,
            "scheduler": self.scheduler.state_dict(),
            "param_groups": groups,
            "world_size": self.dist.world_size,
        }
        pending = _Save(final, tmp, json.loads(json.dumps(trainer_state)), claimed)  # tuples as lists, as loaded
        pending.error = self._write_rng(tmp, rng)
        try:  # every process takes part in DCP's collectives, even one whose RNG file failed
            writer = dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1)
            with _single_process_quiet():
                if self.async_save:
                    pending.future = dcp.async_save(
                        tensors, storage_writer=writer, process_group=self._async_group, no_dist=not self.dist.enabled
                    )
                    self._pending = pending
                    return final
                dcp.save(tensors, storage_writer=writer, no_dist=not self.dist.enabled)
        except (Exception, CheckpointException) as exc:  # DCP's (a BaseException) names the failed ranks
            pending.error = pending.error or _shard_failure(exc, tmp)
        self._finish(pending)
        return final

    def wait(self) -> None:
        """Finish a background save (a collective): checksums, manifest, the folder in place."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:
            pending.error = pending.error or _shard_failure(exc, pending.tmp)
        self._finish(pending)

    def _staging(self, final: Path) -> tuple[Path, contextlib.ExitStack]:
        """The hidden folder the processes write into, made empty and claimed by process 0 (a collective):
        the claim keeps other processes' :func:`latest_checkpoint` cleaning off it until it is in place."""
        tmp = final.with_name(f".{final.name}.saving")
        claimed = contextlib.ExitStack()
        problem = None
        if self.dist.is_main:
            try:
                claimed.enter_context(claimed_dir(tmp))
            except FolderBusy as exc:
                problem = str(exc)
            except OSError as exc:
                problem = self._failed(final, "the checkpoint folder", _write_failure(exc, None))
        problem = distributed.broadcast_object(problem, self.dist)
        if problem is not None:
            raise CheckpointWriteError(problem)
        return tmp, claimed

    def _write_rng(self, tmp: Path, rng: dict) -> tuple[str, str] | None:
        path = tmp / rng_file(self.dist.rank)
        try:
            torch.save(rng, path)
        except Exception as exc:
            return path.name, _write_failure(exc, path)
        return None

    def _own_files(self, tmp: Path) -> list[Path]:
        rank = self.dist.rank
        files = [tmp / rng_file(rank), *tmp.glob(f"__{rank}_*.distcp")]
        return files + ([tmp / METADATA] if self.dist.is_main else [])

    def _finish(self, pending: _Save) -> None:
        """Checksum each process's files, then on process 0 the trainer state, the manifest and the
        rename; every process raises the first failure (a collective)."""
        entries: dict = {}
        error = pending.error
        if error is None:
            try:
                entries = {p.name: _entry(p) for p in self._own_files(pending.tmp)}
            except OSError as exc:
                error = ("its files", _write_failure(exc, None))
        reports = distributed.gather_objects((error, entries), self.dist)
        problem = None
        if self.dist.is_main:
            failed = [(rank, e) for rank, (e, _) in enumerate(reports) if e is not None]
            if failed:
                rank, (file, cause) = failed[0]
                where = f" on process {rank}" if self.dist.enabled else ""
                problem = self._failed(pending.final, f"{file}{where}", cause)
            else:
                problem = self._publish(pending, {k: v for _, files in reports for k, v in files.items()})
            if problem is not None:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            pending.claim.close()
        problem = distributed.broadcast_object(problem, self.dist)
        if problem is not None:
            raise CheckpointWriteError(problem)

    def _publish(self, pending: _Save, files: dict) -> str | None:
        """Process 0: the trainer state and the manifest (last), the folder renamed into place, older
        folders pruned; the failure in words, or None."""
        path = pending.tmp / DESCRIPTION
        try:
            if self.describe is not None:
                self.describe(path)
                files.update({f"{DESCRIPTION}/{p.name}": _entry(p) for p in sorted(path.iterdir())})
            path = pending.tmp / TRAINER_STATE
            _write_json(path, pending.trainer_state)
            files[TRAINER_STATE] = _entry(path)
            step = pending.trainer_state["step"]
            manifest = {"step": step, "checksum": CHECKSUM, "world_size": self.dist.world_size, "files": files}
            path = pending.tmp / MANIFEST
            _write_json(path, manifest)
            _entry(path)
            fsync_dir(pending.tmp)
            path = None
            replace_dir(pending.tmp, pending.final)
            _prune(self.directory, step, self.keep_last)
        except Exception as exc:  # OSError, or the tokenizer's and transformers' writers' own errors
            _restore_replaced(pending.final)
            return self._failed(
                pending.final, path.name if path else "the checkpoint folder", _write_failure(exc, path)
            )
        return None

    def _failed(self, final: Path, what: str, cause: str) -> str:
        return (
            f"{final}: checkpoint for step {int(final.name[5:])} not saved: writing {what} failed: {cause}. "
            f"The unfinished folder was removed and {_previous(final.parent, final)}; free some space (or raise "
            "the limit) and run again to resume from it."
        )

    # reading

    def latest(self, clean: bool = False, verify: bool = True) -> Path | None:
        """The newest intact checkpoint (see :func:`latest_checkpoint`; ``verify=False``: the newest complete
        one, without reading every file)."""
        return latest_checkpoint(self.directory, clean=clean, verify=verify)

    def restore(self) -> TrainState:
        """Load the newest intact checkpoint (a damaged one is reported and the one before it used) and
        return its state; a fresh :class:`TrainState` when there is none. Process 0 chooses and verifies
        it, every process loads it. Call it after building the model, optimizer, scheduler and reader,
        and draw no random numbers between it and the first step."""
        choice = None
        if self.dist.is_main:
            try:
                choice = self.latest(clean=True)
            except DamagedCheckpoint as exc:
                choice = exc
        choice = distributed.broadcast_object(choice, self.dist)
        if isinstance(choice, DamagedCheckpoint):
            raise choice
        return TrainState() if choice is None else self.load(choice, verify=False)  # latest has just checked it

    def load(self, path: str | os.PathLike, verify: bool = True) -> TrainState:
        """Load the checkpoint at ``path`` into the objects (model weights strictly) and the RNGs, on
        every process; returns its state. ``verify=False`` skips the checksums, for a folder just
        verified. Every process must be able to read the folder; all fail together otherwise."""
        path = Path(path)
        problem = None
        if verify and self.dist.is_main:
            problem = checkpoint_problem(path)
        problem = distributed.broadcast_object(problem, self.dist)
        if problem is not None:
            raise DamagedCheckpoint(problem)
        trainer, rng = self._readable(path)
        tensors, model_state, groups = _live_state(self.model, self.optimizer)
        _check_fits(path, tensors)
        saved_groups = _param_groups(path, trainer["param_groups"], groups)
        _load(path, tensors, no_dist=not self.dist.enabled)
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            distributed.unwrap(self.model),
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict={"state": tensors["optim"], "param_groups": saved_groups},
        )
        self.scheduler.load_state_dict(trainer["scheduler"])
        set_rng_state(rng)
        state = _train_state(path, trainer, rng)
        if self.reader is not None:
            self.reader.load_state_dict(state.reader_state)
        return state

    def _readable(self, path: Path) -> tuple[dict, dict]:
        """This process's view of the checkpoint (its trainer state and RNG state), checked on every
        process; all raise when any cannot read it (no shared file system, permissions...)."""
        result = problem = None
        try:
            read_index(path)
            trainer = read_trainer_state(path)
            same_world = trainer.get("world_size") == self.dist.world_size
            result = trainer, _read_rng(path, self.dist.rank if same_world else 0)
        except DamagedCheckpoint as exc:
            problem = str(exc)
        problems = distributed.gather_objects(problem, self.dist, to_all=True)
        failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
        if failed:
            rank, text = failed[0]
            hint = " (every process must see the checkpoint folder: a shared file system)" if self.dist.enabled else ""
            raise DamagedCheckpoint(f"process {rank} cannot read the checkpoint: {text}{hint}")
        trainer, rng = result
        if trainer["world_size"] != self.dist.world_size:
            _say(
                f"checkpoint: {path} was written by {trainer['world_size']} processes, resumed on "
                f"{self.dist.world_size}: every process continues from process 0's random state"
            )
        return trainer, rng


def _train_state(path: Path, trainer: dict, rng: dict) -> TrainState:
    """The :class:`TrainState` of a checkpoint read: ``trainer_state.json`` (its ``extra``: the counters)
    and this process's RNG states."""
    state = TrainState()
    try:
        state.load_state_dict(
            {"step": trainer["step"], "reader_state": trainer["reader_state"], "rng": rng, **trainer["extra"]}
        )
    except (MedfoundryError, KeyError, TypeError) as exc:
        raise DamagedCheckpoint(f"{path / TRAINER_STATE}: not a training state ({exc})") from None
    return state
