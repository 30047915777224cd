"""Atomic file writes and gzip-aware reads.

Every artifact is written under a temporary name in its final directory, flushed, fsynced and
renamed, so an interrupted run never leaves a half-written file under a name that looks done.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from medfoundry.errors import InputError


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


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, gzipped or not, from a user: an undecodable line or a
    truncated / corrupt gzip stream is an :class:`InputError` naming the file and line."""
    line_no = 0
    with open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(fh, 1):
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


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block: processes that would write the
    same artifact at the same time (torchrun ranks converting one GGUF file) take turns. The operating system
    releases it when the process dies, so a killed holder never blocks the next run."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole. Temporary
    directories that earlier, killed attempts at ``path`` left behind are removed first."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.tmp")  # the names mkdtemp gives below
    for leftover in final.parent.iterdir():
        if stale.fullmatch(leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
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
