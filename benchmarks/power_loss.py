"""A power cut, simulated in this process: inside ``with PowerLoss(root) as cut``, ``os.fsync`` only records
what it was asked to flush (with ``cut_at=k``, the k-th call raises :class:`PowerCut` instead: the machine
stops there); then ``cut.lose(published)`` loses what a crash could lose on a journaling file system with
delayed allocation (ext4, XFS), where names reach the disk through the journal before the data:

- every file under ``root`` written during the block is cut back to the size it had when last fsynced:
  to nothing when it never was (its name survives, with empty contents);
- each folder of ``published`` (renamed into place during the block) whose parent folder was not fsynced
  after the rename loses that rename: the folder is gone.

Used by ``tests/test_io.py`` and the ``power_loss_folders`` scenario of ``reliability_faults.py``.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


class PowerCut(BaseException):
    """The power went at this fsync (a BaseException: no writer's ``except Exception`` carries on)."""


class PowerLoss:
    def __init__(self, root: Path, cut_at: int | None = None):
        self.root, self.cut_at, self.calls = Path(root), cut_at, 0
        self.before = self._files()  # what was on disk already: kept as it is
        self.synced: dict[tuple[int, int], int] = {}  # a file's (device, inode) -> its size when last fsynced
        self.listings: dict[tuple[int, int], dict[str, int]] = {}  # a folder's -> {entry: inode} when last fsynced

    def _files(self) -> set[tuple[int, int, int, int]]:
        """(device, inode, size, modification time) of every file under the root."""
        found = set()
        for path in self.root.rglob("*"):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found.add((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
        return found

    def __enter__(self) -> PowerLoss:
        self._fsync, os.fsync = os.fsync, self._record
        return self

    def __exit__(self, *exc) -> None:
        os.fsync = self._fsync

    def _record(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.cut_at:
            raise PowerCut(f"power cut at fsync {self.calls}")
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if stat.S_ISDIR(info.st_mode):
            self.listings[key] = {
                name: os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino for name in os.listdir(fd)
            }
        else:
            self.synced[key] = info.st_size

    def lose(self, published: list[Path] = ()) -> list[str]:
        """Lose what the cut would (see the module's docstring); returns what was lost, in words."""
        lost = []
        for folder in published:
            parent = os.stat(folder.parent)
            entries = self.listings.get((parent.st_dev, parent.st_ino), {})
            if folder.exists() and entries.get(folder.name) != os.stat(folder).st_ino:
                shutil.rmtree(folder)
                lost.append(f"{folder}: its rename (the parent folder was not fsynced after it)")
        for path in self.root.rglob("*"):
            info = path.lstat()
            if (
                not stat.S_ISREG(info.st_mode)
                or (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) in self.before
            ):
                continue
            kept = self.synced.get((info.st_dev, info.st_ino), 0)
            if info.st_size > kept:
                os.truncate(path, kept)
                lost.append(f"{path}: {info.st_size - kept:,} of its {info.st_size:,} bytes (not fsynced)")
        return lost
