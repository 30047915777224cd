"""Atomic file writes and gzip-aware reads.

Every artifact is written under a temporary name in its final directory, flushed, fsynced and
renamed, so an interrupted run never leaves a half-written file under a name that looks done.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from medfoundry.errors import InputError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


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
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", compresslevel: int = 6) -> Iterator[IO[Any]]:
    """Open ``path`` for writing atomically; ``.gz`` names are gzip-compressed."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):
            # no file name and a zero mtime in the gzip header: the same content gives the same bytes
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0) as gz:
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
    JSON is an :class:`InputError` naming the file and line."""
    for line_no, line in iter_lines(path):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(str(path), f"invalid JSON: {exc.msg}", line_no) from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
