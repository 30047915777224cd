"""Training checkpoints that resume bit-identically, even after SIGKILL.

A checkpoint is a folder ``step-{step:08d}/`` holding

- ``model.safetensors``: the model weights on CPU (a tensor shared by several names, such as a tied
  output head, is stored once; the other names are listed in the file's ``aliases`` metadata),
- ``optim.pt``: optimizer and scheduler state dicts (``torch.save``; loaded with ``weights_only=True``),
- ``rng.pt``: Python ``random``, NumPy global, torch CPU and (when present) CUDA generator states,
- ``trainer_state.json``: ``{"step", "reader_state", "extra"}``,
- ``manifest.json``: the size and xxh3-128 checksum of each of those four files (written last).

The folder is built under a hidden temporary name beside its final place, every file is fsynced
and the folder is renamed into place, so a ``step-*`` folder either is complete or does not exist.
:func:`latest_checkpoint` ignores (and removes) the hidden leftovers of an interrupted save.

Faults. A save that cannot write (disk full, file size limit, quota) raises :class:`CheckpointWriteError`
naming the file, the cause and the previous checkpoint, which stays intact (the unfinished folder is
removed). A checkpoint whose files no longer match their manifest (truncated, corrupted, missing) is
reported by :func:`checkpoint_problem` / :func:`verify_checkpoint` with the file at fault;
:func:`latest_checkpoint` skips it, says so on stderr and returns the newest intact one, and
:func:`read_checkpoint` refuses it. Checkpoints written before manifests existed load unverified.

Distributed use: only rank 0 writes (other ranks return at once). With FSDP2, gather full state
dicts on every rank first (a collective; see :mod:`medfoundry.train.distributed`) and pass them in::

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    save_checkpoint(..., model_state=model_state, optim_state=optim_state)  # rank 0 writes

``optim.pt`` always holds the optimizer state in ``optimizer.state_dict()``'s form (state keyed by
the parameter's position over the param groups): a name-keyed state dict from
``get_optimizer_state_dict`` is converted (:func:`optim_state_by_index`). :func:`load_checkpoint`
takes a plain, DDP-unwrapped or FSDP2-sharded model alike: for a sharded one every rank reads the
folder and applies it with ``set_model_state_dict`` / ``set_optimizer_state_dict`` (full state dicts,
a collective: call it on every rank). A checkpoint written by one process, DDP or FSDP therefore
loads in any of them (the data reader's state still needs the same number of processes).
The RNG states saved are rank 0's: that is exact for every rank as long as all ranks are seeded
alike and draw the same random numbers (as under DDP and FSDP).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medfoundry.errors import MedfoundryError
from medfoundry.io import DISK_FULL, atomic_dir, fsync_dir

FILES = ("model.safetensors", "optim.pt", "rng.pt", "trainer_state.json")
MANIFEST = "manifest.json"
CHECKSUM = "xxh3_128"
_STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointWriteError(MedfoundryError):
    """A checkpoint could not be written (disk full, file size limit...); the previous one is intact."""


class DamagedCheckpoint(MedfoundryError):
    """A checkpoint's files are missing, truncated or do not match the checksums of its manifest."""


def get_rng_state() -> dict:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


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


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    reader_state: dict,
    extra: dict,
    keep_last: int,
    model_state: dict | None = None,
    optim_state: dict | None = None,
) -> Path:
    """Write ``directory/step-{step:08d}/`` atomically, then keep only the ``keep_last`` newest step folders
    up to this step (0 keeps all; the new one is never removed, later ones are left alone).
    ``model_state``/``optim_state`` replace ``model.state_dict()``/``optimizer.state_dict()`` when given (e.g. full state dicts gathered under
    FSDP2; ``model``/``optimizer`` may then be None; a name-keyed ``optim_state`` is stored position-keyed).
    ``reader_state`` and ``extra`` must be JSON-serializable.
    Returns the folder's path (on ranks other than 0 without writing anything).

    A write that fails (disk full, file size limit, quota...) raises :class:`CheckpointWriteError`
    naming the file and the cause; nothing is left behind and older checkpoints are untouched."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return final
    # a given (gathered) state dict is already a copy: no second one of every tensor in memory
    state = model.state_dict() if model_state is None else model_state
    tensors, aliases = _cpu_tensors(state, copy=model_state is None)
    trainer_state = {"step": step, "reader_state": reader_state, "extra": extra}
    writers = {
        "model.safetensors": lambda p: save_file(tensors, p, metadata={"aliases": json.dumps(aliases)}),
        "optim.pt": lambda p: torch.save(
            {
                "optimizer": optimizer.state_dict() if optim_state is None else optim_state_by_index(optim_state),
                "scheduler": scheduler.state_dict(),
            },
            p,
        ),
        "rng.pt": lambda p: torch.save(get_rng_state(), p),
        "trainer_state.json": lambda p: p.write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8"),
    }

    def failed(what: str, exc: BaseException, path: Path | None) -> CheckpointWriteError:
        return CheckpointWriteError(
            f"{final}: checkpoint for step {step} not saved: writing {what} failed: {_write_failure(exc, path)}. "
            f"The unfinished folder was removed and {_previous(directory, final)}; free some space (or raise the "
            "limit) and run again to resume from it."
        )

    try:
        with atomic_dir(final) as tmp:
            files = {}
            writers[MANIFEST] = lambda p: p.write_text(
                json.dumps({"step": step, "checksum": CHECKSUM, "files": files}, indent=2) + "\n", encoding="utf-8"
            )
            for name, write in writers.items():
                try:  # torch and safetensors raise RuntimeError / SafetensorError for I/O errors
                    write(tmp / name)
                    digest = _digest(tmp / name, fsync=True)
                except Exception as exc:
                    raise failed(name, exc, tmp / name) from exc
                if name != MANIFEST:
                    files[name] = {"bytes": (tmp / name).stat().st_size, CHECKSUM: digest}
            fsync_dir(tmp)
    except CheckpointWriteError:
        raise
    except OSError as exc:  # making the temporary folder, or renaming it into place
        _restore_replaced(final)  # failed between atomic_dir's two renames: put the replaced folder back
        raise failed("the checkpoint folder", exc, None) from exc
    if keep_last > 0:
        # folders of later steps (damaged ones resumed before) are left alone: training replaces them in turn
        older = [p for p in _step_dirs(directory) if int(p.name[5:]) < step]
        for path in older[: max(0, len(older) - (keep_last - 1))]:
            trash = path.with_name(f".{path.name}.deleting")  # renamed first: never a half-deleted step-* folder
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def _step_dirs(directory: Path) -> list[Path]:
    """``step-*`` folders, oldest first."""
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def is_complete(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in FILES)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder, naming the file at fault, or None when every file is
    there and matches the size and checksum its manifest records. Hashes every file (a read of the
    whole checkpoint)."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"{path}: incomplete checkpoint, missing {', '.join(missing)}"
    if not (path / MANIFEST).is_file():
        return None  # written before checkpoints had manifests: nothing to check against
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        algorithm = manifest.get("checksum", CHECKSUM)
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
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
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


def _is_sharded(model) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler, verify: bool = True) -> dict:
    """Restore model weights (strictly), optimizer, scheduler and RNG states from ``path``; return the
    trainer state ``{"step", "reader_state", "extra"}``. Call it after building the model, optimizer
    and scheduler, and draw no random numbers between this call and the first training step.

    ``model`` is a plain module (unwrap DDP first) or an FSDP2-sharded one; then every rank must call this
    (it reads the folder on every rank and scatters the tensors). ``verify=False`` skips the checksums, for a
    folder :func:`latest_checkpoint` has just verified."""
    ckpt = read_checkpoint(path, verify=verify)
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if _is_sharded(model):
        _load_sharded(path, ckpt, model, optimizer)
    else:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as exc:
            raise MedfoundryError(f"{path}: the checkpoint does not fit this model: {exc}") from None
        optimizer.load_state_dict(optim_state_by_index(ckpt["optimizer"]))
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt["trainer_state"]
