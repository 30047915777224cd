"""Atomic file and folder writes, folder locks, and gzip-aware reads.

Every artifact is written under a temporary name in its final directory, flushed, fsynced and
renamed, so an interrupted run never leaves a half-written file under a name that looks done. A run
holds its folder's lock (:func:`folder_lock`) and a writer claims its temporary folder (:func:`claimed_dir`),
so that a second process neither writes the same folder nor removes a folder still being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import xxhash

from medfoundry import limits
from medfoundry.errors import FolderBusy, InputError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

# the write errors that say the disk (or the process's share of it) is full, in words
DISK_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached (RLIMIT_FSIZE, `ulimit -f`)",
}


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files: give outputs the usual permissions
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_full_disk(final):
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """A full disk (:data:`DISK_FULL`) met while writing ``path`` says so: ``write()`` raises it without a
    file name, and "error: [Errno 28] No space left on device" alone does not tell the user which output."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL and exc.filename is None:
            exc.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", compresslevel: int = 6) -> Iterator[IO[Any]]:
    """Open ``path`` for writing atomically; ``.gz`` names are gzip-compressed."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):
            # no file name and a zero mtime in the gzip header: the same content gives the same bytes
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0) as gz,
            ):
                if "b" in mode:
                    yield gz
                else:
                    with io.TextIOWrapper(gz, encoding="utf-8") as fh:
                        yield fh
        else:
            with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
                yield fh


CHECKSUM = "xxh3_128"  # the checksum recorded for files whose integrity is checked later (token shards, checkpoints)


def file_checksum(path: str | os.PathLike) -> str:
    """The :data:`CHECKSUM` of a file's bytes (hex), read in 4 MiB blocks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for binary reading, transparently decompressing ``.gz``."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Read a JSONL(.gz) file we wrote ourselves (trusted: no error recovery)."""
    with open_binary(path) as fh:
        for line in io.BufferedReader(fh):  # type: ignore[arg-type]
            if line.strip():
                yield json.loads(line)


def read_lines(fh: IO[bytes]) -> Iterator[bytes | None]:
    """Each line of a binary file (with its newline), or None for a line of more than
    :data:`~medfoundry.limits.MAX_LINE_BYTES` (the newline not counted), as soon as it is over: the rest of it
    is read through when the next line is asked for, and never held, so a 2 GB line costs no more memory than
    the limit. Lines are cut from blocks read here (``readline`` took seconds to get through a gigabyte), each
    from one read of the file or gzip stream (``read1``), so that a truncated gzip stream loses no line before
    the fault."""
    limit = limits.MAX_LINE_BYTES
    parts: list[bytes] = []  # the start of a line that runs past the block
    size, over = 0, False  # the length of that start; whether it is over the limit (then reported, not kept)
    while block := fh.read1(1 << 20):  # type: ignore[attr-defined]
        start = 0
        while end := block.find(b"\n", start) + 1:
            piece, start = block[start:end], end
            if not over:
                yield None if size + len(piece) - 1 > limit else b"".join([*parts, piece])
            parts, size, over = [], 0, False
        size += len(block) - start
        if over or start == len(block):
            continue
        if size > limit:
            parts, over = [], True
            yield None
        else:
            parts.append(block[start:])
    if size and not over:
        yield b"".join(parts)


def line_too_long() -> str:
    """The reason given for a line :func:`read_lines` did not read."""
    return (
        f"a line of more than {limits.mib(limits.MAX_LINE_BYTES)} (medfoundry.limits.MAX_LINE_BYTES): "
        "refused without reading it whole"
    )


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, gzipped or not, from a user: an undecodable line, a line over
    :data:`~medfoundry.limits.MAX_LINE_BYTES` or a truncated / corrupt gzip stream is an :class:`InputError`
    naming the file and line."""
    line_no = 0
    with open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(read_lines(fh), 1):
                if raw is None:
                    raise InputError(str(path), line_too_long(), line_no)
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(str(path), f"not UTF-8 text ({exc.reason})", line_no) from None
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(str(path), f"unreadable ({exc})", line_no + 1) from None


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL(.gz) file from a user, strictly: invalid
    JSON, or a string that is not Unicode text (a lone surrogate escape), is an :class:`InputError`
    naming the file and line."""
    for line_no, line in iter_lines(path):
        if line.strip():
            value = json_value(line, str(path), line_no)
            yield line_no, value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # how a surrogate gets into a JSON string
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_value(text: str, path: str, line: int | None) -> Any:
    """One JSON document from a user, or an :class:`InputError` naming ``path`` and ``line``.

    Besides syntax errors this refuses what :func:`json.loads` raises other exceptions for (an integer of
    more than 4300 digits, nesting deeper than the interpreter's recursion limit) and strings holding a
    lone UTF-16 surrogate (``"\\ud800"``): valid JSON syntax, but not text, so it could be neither
    tokenized nor written out as UTF-8 later.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON: {exc.msg}", line) from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError(path, f"invalid JSON: {exc}", line) from None
    except RecursionError:
        raise InputError(path, "invalid JSON: nested too deeply", line) from None
    if may_hold_surrogates(text):
        surrogate = lone_surrogate(value)
        if surrogate is not None:
            raise InputError(
                path,
                f"invalid JSON: the string escape \\u{ord(surrogate):04x} is a lone UTF-16 "
                "surrogate, not a character (a string cut inside a surrogate pair?)",
                line,
            )
    return value


def may_hold_surrogates(json_text: str) -> bool:
    """Whether JSON text has a ``\\uD800``-``\\uDFFF`` escape (the only way a surrogate gets into it): a quick
    test that spares :func:`lone_surrogate` a walk over every value of clean files."""
    return _SURROGATE_ESCAPE.search(json_text) is not None


def lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string (key or value) of a decoded JSON value, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


# ---------------------------------------------------------------------------------------------- locks


def _lock(path: Path, wait: bool = False) -> IO[str] | None:
    """``path`` (created if missing) open and exclusively locked (``flock``): the handle to keep open while the
    lock is held, or None when another process holds it (unless ``wait``). The lock belongs to the open file,
    so the operating system releases it when its holder dies: a killed run never blocks the next. A lock file
    that its last holder removed meanwhile (a claim's) is not the one at ``path`` any more: locked again."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open by the caller: it is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()


def lock_file(folder: str | os.PathLike) -> Path:
    """The lock file of a folder, hidden beside it: it needs no folder yet and stays when the folder is
    replaced whole."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock of the folder ``path`` for the block: two processes writing one folder (two runs on the
    same run or output folder) would delete and overwrite each other's files. A process that finds it held
    gets :class:`FolderBusy` at once, naming the holder (``what`` it does, its pid, host, command line and
    start time, which the holder writes into the lock file). With ``wait`` it waits for its turn instead:
    processes of one job that share a folder (torchrun ranks converting one GGUF file into the cache)."""
    path = Path(path)
    lock = lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = _lock(lock, wait)
    if handle is None:
        raise FolderBusy(_busy(path, lock))
    with handle:
        handle.truncate(0)
        handle.write(json.dumps(_holder(what)) + "\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # no stale holder named to a process that finds the lock taken by the next one


def _holder(what: str) -> dict:
    return {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(sys.orig_argv).replace("\n", "\\n"),  # one line, for a one-line error
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _busy(path: Path, lock: Path) -> str:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        who = f"{holder['what']}: pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # taken this instant, not written yet
        who = "which has not recorded itself yet"
    return (
        f"{path} is in use by another process ({who}); two runs on one folder would overwrite each other's "
        f"files: wait for it to end or stop it (its lock, {lock}, is released when it exits)"
    )


@contextlib.contextmanager
def claim(folder: str | os.PathLike) -> Iterator[bool]:
    """Whether the temporary folder ``folder`` is this process's to write or remove (no live process claims
    it: its writer, if any, died), holding the claim for the block when it is: the lock of ``FOLDER.claim``
    beside it, removed at the end, when the folder is gone (renamed into place or removed)."""
    path = Path(folder).with_name(f"{Path(folder).name}.claim")
    handle = _lock(path)
    if handle is None:
        yield False
        return
    with handle:
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def claimed_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Make the temporary folder ``folder`` afresh (removing an abandoned one of that name) and claim it while
    the block writes it, so that cleaners in other processes (:func:`remove_abandoned`) leave it alone. The
    block renames it into place or removes it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with claim(folder) as mine:
        if not mine:
            raise FolderBusy(f"{folder}: another process is writing this folder")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder


def remove_abandoned(folder: str | os.PathLike) -> None:
    """Remove the temporary folder ``folder``, left by a killed writer, unless a live process claims it."""
    with claim(folder) as abandoned:
        if abandoned:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- folders


def sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, and ``root``. A rename publishes a folder's new name at
    once, but the contents of its files reach the disk later: without this, a power cut could leave the
    folder under its final name with empty files."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success everything in it is fsynced and it replaces
    ``path`` whole, so that even after a power cut ``path`` is the old folder or the complete new one.
    Temporary folders of earlier attempts at ``path`` are removed first, unless their writer is alive: each
    is claimed (:func:`claimed_dir`) while written."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = re.compile(rf"(\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.tmp)(\.claim)?")  # and their claims
    for name in {m.group(1) for p in final.parent.iterdir() if (m := temporary.fullmatch(p.name))}:
        remove_abandoned(final.parent / name)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    with claimed_dir(tmp):
        try:
            yield tmp
            sync_tree(tmp)
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing what is there: the old folder is set
    aside as ``.NAME.old`` first (a kill between the two renames leaves it there, to put back) and
    removed after."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
