"""Training checkpoints that resume bit-identically, even after SIGKILL, and the :class:`Checkpointer`
that owns them.

The loop sees only the :class:`Checkpointer`: built with the run's stateful objects (model, optimizer,
scheduler, data reader) and its checkpoint folder, it saves a :class:`~medfoundry.train.state.TrainState`
(``checkpointer.save(state)``) and restores the newest intact checkpoint (``checkpointer.restore()``).
How and where the state is written (the files below, one writer or one shard per process) is its
business alone.

A checkpoint is a folder ``step-{step:08d}/`` holding

- ``model.safetensors``: the model weights on CPU (a tensor shared by several names, such as a tied
  output head, is stored once; the other names are listed in the file's ``aliases`` metadata),
- ``optim.pt``: optimizer and scheduler state dicts (``torch.save``; loaded with ``weights_only=True``),
- ``rng.pt``: Python ``random``, NumPy global, torch CPU and (when present) CUDA generator states,
- ``trainer_state.json``: ``{"step", "reader_state", "extra"}`` (``extra``: the loop's counters),
- ``manifest.json``: the size and xxh3-128 checksum of each of those four files (written last).

The folder is built under a hidden temporary name beside its final place, every file is fsynced
and the folder is renamed into place, so a ``step-*`` folder either is complete or does not exist.
:func:`latest_checkpoint` ignores (and removes) the hidden leftovers of an interrupted save.

Faults. A save that cannot write (disk full, file size limit, quota) raises :class:`CheckpointWriteError`
naming the file, the cause and the previous checkpoint, which stays intact (the unfinished folder is
removed). A checkpoint whose files no longer match their manifest (truncated, corrupted, missing), or
that has no manifest, is reported by :func:`checkpoint_problem` / :func:`verify_checkpoint` with the
file at fault; :func:`latest_checkpoint` skips it, says so on stderr and returns the newest intact one,
and :func:`read_checkpoint` refuses it.

Distributed use: every process calls :meth:`Checkpointer.save` (under FSDP2 the full state dicts are
gathered first, a collective); process 0 writes, and all processes then agree on whether it could, so
that they stop together. ``optim.pt`` always holds the optimizer state in ``optimizer.state_dict()``'s
form (state keyed by the parameter's position over the param groups): the name-keyed state dict
gathered under FSDP2 is converted (:func:`optim_state_by_index`). :meth:`Checkpointer.load` takes a
plain, DDP-wrapped or FSDP2-sharded model alike: for a sharded one every process reads the folder
and applies it with ``set_model_state_dict`` / ``set_optimizer_state_dict``. A checkpoint written by
one process, DDP or FSDP therefore loads in any of them (the data reader's state still needs the same
number of processes). The RNG states saved are process 0's: that is exact for every process as long as
all are seeded alike and draw the same random numbers (as under DDP and FSDP).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medfoundry.errors import MedfoundryError
from medfoundry.io import DISK_FULL, atomic_dir, fsync_dir
from medfoundry.train import distributed
from medfoundry.train.state import Stateful, TrainState, get_rng_state, set_rng_state

FILES = ("model.safetensors", "optim.pt", "rng.pt", "trainer_state.json")
MANIFEST = "manifest.json"
CHECKSUM = "xxh3_128"
_STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointWriteError(MedfoundryError):
    """A checkpoint could not be written (disk full, file size limit...); the previous one is intact."""


class DamagedCheckpoint(MedfoundryError):
    """A checkpoint's files are missing, truncated or do not match the checksums of its manifest."""


def _cpu_tensors(state: dict[str, torch.Tensor], copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of the tensors (``copy=False``: CPU tensors as they are), each storage once, and
    ``{alias name: stored name}`` for the repeats."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        if hasattr(tensor, "full_tensor"):
            raise MedfoundryError(
                f"checkpoint: {name} is a sharded DTensor; gather a full state dict first "
                "(get_model_state_dict with StateDictOptions(full_state_dict=True))"
            )
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        tensors[name] = tensor.detach().to("cpu", copy=copy).contiguous()
    return tensors, aliases


def _digest(path: Path, fsync: bool = False) -> str:
    """xxh3-128 of a file (hex), read in blocks; with ``fsync`` the file is also flushed to disk."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _write_failure(exc: BaseException, path: Path | None) -> str:
    """Why writing ``path`` failed, in words: a full disk, quota or file size limit when the error says
    so or, for the C++ writer of torch.save (which drops errno), when the half-written file (still there)
    and the state of the machine do."""
    code = getattr(exc, "errno", None)
    if code in DISK_FULL:
        return DISK_FULL[code]
    text = " ".join(str(exc).split())
    for code, reason in DISK_FULL.items():
        if os.strerror(code) in text or f"os error {code})" in text:
            return reason
    detail = f"{type(exc).__name__}: {text}"
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


def _previous(directory: Path, final: Path) -> str:
    complete = [p for p in _step_dirs(directory) if p != final and is_complete(p)]
    return f"the previous checkpoint {complete[-1]} is intact" if complete else "there is no earlier checkpoint"


def _say(message: str) -> None:
    """A notice on stderr, from one process only."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(message, file=sys.stderr, flush=True)


def _write(final: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write the folder ``final`` atomically: each file by its writer, fsynced and checksummed, then
    the manifest of their sizes and checksums. A failed write raises :class:`CheckpointWriteError`
    naming the file and the cause; nothing is left behind and older checkpoints are untouched."""
    step = int(final.name[5:])

    def failed(what: str, exc: BaseException, path: Path | None) -> CheckpointWriteError:
        return CheckpointWriteError(
            f"{final}: checkpoint for step {step} not saved: writing {what} failed: {_write_failure(exc, path)}. "
            f"The unfinished folder was removed and {_previous(final.parent, final)}; free some space (or raise "
            "the limit) and run again to resume from it."
        )

    files: dict[str, dict] = {}
    try:
        with atomic_dir(final) as tmp:
            for name, write in writers.items():
                files[name] = _written(tmp / name, write, failed)
            manifest = {"step": step, "checksum": CHECKSUM, "files": files}
            _written(tmp / MANIFEST, lambda p: _write_json(p, manifest), failed)
            fsync_dir(tmp)
    except CheckpointWriteError:
        raise
    except OSError as exc:  # making the temporary folder, or renaming it into place
        _restore_replaced(final)  # failed between atomic_dir's two renames: put the replaced folder back
        raise failed("the checkpoint folder", exc, None) from exc


def _written(path: Path, write: Callable[[Path], object], failed: Callable) -> dict:
    """Write one file of a checkpoint and flush it to disk; its manifest entry."""
    try:  # torch and safetensors raise RuntimeError / SafetensorError for I/O errors
        write(path)
        digest = _digest(path, fsync=True)
    except Exception as exc:
        raise failed(path.name, exc, path) from exc
    return {"bytes": path.stat().st_size, CHECKSUM: digest}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


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


def _step_dirs(directory: Path) -> list[Path]:
    """``step-*`` folders, oldest first."""
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def is_complete(path: str | os.PathLike) -> bool:
    return _missing(Path(path)) is None


def _missing(path: Path) -> str | None:
    """What a checkpoint folder lacks, or None. A folder without a manifest (written before checkpoints
    had one) cannot be verified: it is refused."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"{path}: incomplete checkpoint, missing {', '.join(missing)}"
    if not (path / MANIFEST).is_file():
        return f"{path}: no {MANIFEST}, so its files cannot be verified: not loaded (move the folder away)"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder, naming the file at fault, or None when every file is
    there and matches the size and checksum its manifest records. Hashes every file (a read of the
    whole checkpoint)."""
    path = Path(path)
    missing = _missing(path)
    if missing:
        return missing
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        algorithm = manifest["checksum"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{path / MANIFEST}: unreadable checkpoint manifest ({exc})"
    if algorithm != CHECKSUM:
        return f"{path / MANIFEST}: unknown checksum {algorithm!r} (this version checks {CHECKSUM})"
    if _STEP_DIR.fullmatch(path.name) and manifest.get("step") != int(path.name[5:]):
        return f"{path / MANIFEST}: the manifest is for step {manifest.get('step')!r}, not {int(path.name[5:])}"
    for name in FILES:
        expected = files.get(name) if isinstance(files, dict) else None
        if not isinstance(expected, dict):
            return f"{path / MANIFEST}: no checksum recorded for {name}"
        size = (path / name).stat().st_size
        if size != expected.get("bytes"):
            recorded = expected.get("bytes")
            recorded = f"{recorded:,}" if isinstance(recorded, int) else repr(recorded)
            return (
                f"{path / name}: truncated or damaged: {size:,} bytes where the checkpoint manifest records {recorded}"
            )
        digest = _digest(path / name)
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


def _restore_replaced(final: Path) -> None:
    """Undo a replacement interrupted between :func:`medfoundry.io.atomic_dir`'s two renames: the folder
    moved aside to ``.NAME.old`` goes back when nothing took its place."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        with contextlib.suppress(OSError):  # another process may have done it already
            old.rename(final)


def latest_checkpoint(directory: str | os.PathLike, clean: bool = True, verify: bool = True) -> Path | None:
    """The newest intact ``step-*`` folder, or None when there is none at all. With ``clean``, hidden
    leftovers of interrupted saves and deletions (``.step-*``) are removed first: call it before
    training starts. With ``verify`` every file is checked against the folder's manifest: a damaged
    checkpoint (file missing, truncated, corrupted) is reported on stderr, naming the file, and the
    previous intact one is returned instead; when every checkpoint is damaged, :class:`DamagedCheckpoint`
    lists them (move them away to start over). Without it, the newest complete folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if clean:
        for old in directory.glob(".step-*.old"):
            _restore_replaced(old.with_name(old.name[1:].removesuffix(".old")))
        for leftover in directory.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
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


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """The raw contents of a checkpoint folder (all on CPU): ``model``, ``optimizer``, ``scheduler``, ``rng``
    state dicts and ``trainer_state``. With ``verify`` (see :func:`verify_checkpoint`) a damaged
    checkpoint raises :class:`DamagedCheckpoint` naming the file; an unreadable file always does."""
    path = Path(path)
    missing = _missing(path)
    if missing:
        raise DamagedCheckpoint(missing)
    if verify:
        verify_checkpoint(path)
    name = "model.safetensors"
    try:
        with safe_open(path / "model.safetensors", framework="pt") as fh:
            aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
        model_state = load_file(path / "model.safetensors")
        for alias, stored in aliases.items():
            model_state[alias] = model_state[stored]
        name = "optim.pt"
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        name = "rng.pt"
        rng = torch.load(path / "rng.pt", weights_only=True)
        name = "trainer_state.json"
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        name = "optim.pt"
        optimizer, scheduler = optim["optimizer"], optim["scheduler"]
    except MedfoundryError:
        raise
    except Exception as exc:  # safetensors, torch.load (zip, unpickler) and json errors alike
        raise DamagedCheckpoint(f"{path / name}: unreadable checkpoint file ({type(exc).__name__}: {exc})") from None
    return {
        "model": model_state,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": rng,
        "trainer_state": trainer_state,
    }


def optim_state_by_index(state: dict) -> dict:
    """An optimizer state dict in ``optimizer.state_dict()``'s form: parameters numbered by their position
    over all param groups. The name-keyed form of ``get_optimizer_state_dict`` (state and ``params``
    keyed by parameter names) is converted; a position-keyed one is returned as it is."""
    groups = state["param_groups"]
    if all(isinstance(p, int) for group in groups for p in group["params"]):
        return state
    index: dict[str, int] = {}
    for group in groups:
        for name in group["params"]:
            index.setdefault(name, len(index))
    unknown = [name for name in state["state"] if name not in index]
    if unknown:
        raise MedfoundryError(f"optimizer state for parameters in no param group: {', '.join(map(str, unknown[:5]))}")
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in groups],
    }


def optim_state_by_name(state: dict, model, optimizer) -> dict:
    """``state`` (either form) keyed by the names ``model`` gives the parameters of ``optimizer``, the form
    ``set_optimizer_state_dict`` takes. Parameters are matched by position within each param group;
    the groups' ``param_names``, when saved, must be the model's."""
    state = optim_state_by_index(state)
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its first name, as torch does
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = state["param_groups"]
    sizes = [len(group["params"]) for group in saved]
    if sizes != [len(group) for group in current]:
        raise MedfoundryError(
            f"the optimizer state does not fit this model: param groups of {sizes} parameters "
            f"saved, {[len(group) for group in current]} here"
        )
    for group, here in zip(saved, current):
        if "param_names" in group and list(group["param_names"]) != here:
            wrong = next((a, b) for a, b in zip(group["param_names"], here) if a != b)
            raise MedfoundryError(
                f"the optimizer state does not fit this model: parameter {wrong[0]!r} "
                f"saved where this model has {wrong[1]!r}"
            )
    position = {i: k for k, i in enumerate(i for group in saved for i in group["params"])}
    flat = [name for group in current for name in group]
    return {
        "state": {flat[position[i]]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": here} for group, here in zip(saved, current)],
    }


def _check_fits(path, saved: dict, model) -> None:
    """Same names and (global) shapes as ``model.state_dict()``: the FSDP2 loader would silently keep
    the current values of missing tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if expected == got:
        return
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: {got[k]} saved, {shape} here" for k, shape in expected.items() if k in got and got[k] != shape]
    raise MedfoundryError(
        f"{path}: the checkpoint does not fit this model: {'; '.join(problems[:5])}"
        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    )


def _load_sharded(path, ckpt: dict, model, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    _check_fits(path, ckpt["model"], model)
    options = StateDictOptions(full_state_dict=True, strict=True)
    optim_state = optim_state_by_index(ckpt["optimizer"])
    if optim_state["state"]:
        # first: torch takes a zero step (lr 0) to create the optimizer state before filling it in
        set_optimizer_state_dict(model, optimizer, optim_state_by_name(optim_state, model, optimizer), options=options)
        for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):  # torch's round trip
            group.update({k: v for k, v in saved.items() if k != "params"})  # turns tuples (betas) into lists
    else:  # saved before any step: no tensors to shard
        optimizer.load_state_dict(optim_state)
    set_model_state_dict(model, ckpt["model"], options=options)


def _load_plain(path, ckpt: dict, model, optimizer) -> None:
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise MedfoundryError(f"{path}: the checkpoint does not fit this model: {exc}") from None
    optimizer.load_state_dict(optim_state_by_index(ckpt["optimizer"]))


class Checkpointer:
    """A run's checkpoints: the folder ``directory`` (``step-*`` folders, the ``keep_last`` newest kept;
    0 keeps all) and the stateful objects they save and restore.

    ``model`` is the model as trained: plain, compiled, DDP-wrapped or FSDP2-sharded, with or without
    the hidden-states wrapper of the fused loss (the plain Hugging Face model's state dict is saved).
    ``reader``, the data reader, is optional: without one the :class:`TrainState`'s ``reader_state``
    is saved as it is. Under torchrun pass the run's ``dist`` and ``device``: :meth:`save` and
    :meth:`restore` are then collectives (every process calls them)."""

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
    ):
        self.directory = Path(directory)
        self.model, self.optimizer, self.scheduler, self.reader = model, optimizer, scheduler, reader
        self.keep_last, self.dist, self.device = keep_last, dist or distributed.Dist(), device

    def save(self, state: TrainState) -> Path:
        """Write ``step-{state.step:08d}/`` (the reader's position and the RNG states are recorded in
        ``state`` first), then prune older folders; returns the folder. When process 0 cannot write
        (disk full...) every process raises :class:`CheckpointWriteError`; the previous checkpoint is intact."""
        if self.reader is not None:
            state.reader_state = self.reader.state_dict()
        state.rng = get_rng_state()
        final = self.directory / f"step-{state.step:08d}"
        writers = self._writers(state)  # under FSDP2 a collective: every process gathers
        error = None
        if self.dist.is_main:
            try:
                _write(final, writers)
                _prune(self.directory, state.step, self.keep_last)
            except CheckpointWriteError as exc:
                error = exc
        if distributed.any_failed(self.dist, error is not None, self.device):
            raise error or CheckpointWriteError(
                f"step {state.step}: process 0 could not write the checkpoint (see its error)"
            )
        return final

    def _writers(self, state: TrainState) -> dict[str, Callable[[Path], object]]:
        """How to write each file (on process 0), from the states gathered now (on every process under FSDP2)."""
        model = distributed.unwrap(self.model)
        sharded = distributed.is_sharded(model)
        if sharded:  # a collective: process 0 gets whole tensors (copies already)
            model_state = distributed.full_model_state(model)
            optim_state = distributed.full_optim_state(model, self.optimizer)
        else:
            model_state, optim_state = model.state_dict(), self.optimizer.state_dict()
        if not self.dist.is_main:
            return {}
        tensors, aliases = _cpu_tensors(model_state, copy=not sharded)
        optim = {"optimizer": optim_state_by_index(optim_state), "scheduler": self.scheduler.state_dict()}
        saved = state.state_dict()
        rng = saved.pop("rng")
        trainer_state = {"step": saved.pop("step"), "reader_state": saved.pop("reader_state"), "extra": saved}
        return {
            "model.safetensors": lambda p: save_file(tensors, p, metadata={"aliases": json.dumps(aliases)}),
            "optim.pt": lambda p: torch.save(optim, p),
            "rng.pt": lambda p: torch.save(rng, p),
            "trainer_state.json": lambda p: _write_json(p, trainer_state),
        }

    def latest(self, clean: bool = False) -> Path | None:
        """The newest intact checkpoint (see :func:`latest_checkpoint`)."""
        return latest_checkpoint(self.directory, clean=clean)

    def restore(self) -> TrainState:
        """Load the newest intact checkpoint (a damaged one is reported and the one before it used) and
        return its state; a fresh :class:`TrainState` when there is none. Call it after building the
        model, optimizer, scheduler and reader, and draw no random numbers between it and the first step."""
        latest = self.latest(clean=True)
        # every process reads it; under FSDP2 the tensors are scattered to the shards (a collective)
        return TrainState() if latest is None else self.load(latest, verify=False)  # latest has just checked it

    def load(self, path: str | os.PathLike, verify: bool = True) -> TrainState:
        """Load the checkpoint at ``path`` into the objects (model weights strictly) and the RNGs; returns
        its state. ``verify=False`` skips the checksums, for a folder just verified."""
        ckpt = read_checkpoint(path, verify=verify)
        model = distributed.unwrap(self.model)
        if distributed.is_sharded(model):
            _load_sharded(path, ckpt, model, self.optimizer)
        else:
            _load_plain(path, ckpt, model, self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        state = _train_state(path, ckpt)
        if self.reader is not None:
            self.reader.load_state_dict(state.reader_state)
        return state


def _train_state(path, ckpt: dict) -> TrainState:
    """The :class:`TrainState` of a checkpoint read: ``trainer_state.json`` (its ``extra``: the counters)
    and the RNG states."""
    saved, state = ckpt["trainer_state"], TrainState()
    try:
        state.load_state_dict(
            {"step": saved["step"], "reader_state": saved["reader_state"], "rng": ckpt["rng"], **saved["extra"]}
        )
    except (MedfoundryError, KeyError, TypeError) as exc:
        raise DamagedCheckpoint(f"{Path(path) / 'trainer_state.json'}: not a training state ({exc})") from None
    return state
