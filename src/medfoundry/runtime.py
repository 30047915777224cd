"""Threads, allocator and precision, decided in one place.

Every entry point calls :func:`configure` before heavy work. The allocator cannot be swapped
inside a running process, so when tcmalloc is installed but not preloaded the CLI re-executes
itself once with ``LD_PRELOAD`` set (glibc malloc costs 30-55% of CPU training throughput).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

_TCMALLOC_GLOBS = (
    "/usr/lib/*/libtcmalloc_minimal.so.4",
    "/usr/lib/*/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
_REEXEC_FLAG = "MEDFOUNDRY_ALLOCATOR_CHECKED"


def peak_rss() -> int | None:
    """Peak resident memory of this process since the last :func:`reset_peak_rss` (or its start), in
    bytes: Linux's ``VmHWM`` (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Start a new peak (writing ``5`` to ``/proc/self/clear_refs``); a no-op where that is unavailable."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def release_free_memory() -> None:
    """Hand memory freed by Python back to the operating system (tcmalloc and glibc keep it for reuse), so
    that a stage run after a bigger one in the same process starts small and its peak is its own."""
    for name, symbol in ((None, "MallocExtension_ReleaseFreeMemory"), ("libc.so.6", "malloc_trim")):
        try:
            function = getattr(ctypes.CDLL(name), symbol)
        except (OSError, AttributeError):
            continue
        function(*(() if symbol.startswith("Malloc") else (0,)))


def cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks and cgroup-pinned sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def find_tcmalloc() -> str | None:
    for pattern in _TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def tcmalloc_loaded() -> bool:
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def maybe_reexec_with_tcmalloc(argv: list[str]) -> None:
    """Re-run this command with tcmalloc preloaded when it is installed and not yet loaded.

    Set ``MEDFOUNDRY_NO_TCMALLOC=1`` to opt out.
    """
    if os.environ.get("MEDFOUNDRY_NO_TCMALLOC") or os.environ.get(_REEXEC_FLAG) or tcmalloc_loaded():
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env[_REEXEC_FLAG] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "medfoundry", *argv], env)


@dataclass(frozen=True)
class Runtime:
    threads: int
    allocator: str

    def describe(self) -> dict:
        return {"threads": self.threads, "allocator": self.allocator}


def configure(threads: int = 0) -> Runtime:
    """Set the thread count for every math library.

    0 = the user's ``OMP_NUM_THREADS`` when set, else all CPUs this process may use. An explicit
    count wins over the environment. The count returned is the one actually in effect.
    """
    explicit = threads > 0
    if not explicit:
        preset = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(preset) if preset.isdigit() and int(preset) > 0 else cpu_count()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if explicit or not os.environ.get(var, "").strip():
            os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return Runtime(threads, "tcmalloc" if tcmalloc_loaded() else "glibc")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device_precision(device: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """'auto' picks CUDA when present, and bf16 where the hardware computes it natively
    (CUDA with bf16, CPUs with AVX-512 BF16 or AMX); fp16 on older GPUs; fp32 otherwise."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    return device, precision
