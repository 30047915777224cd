"""The machine a benchmark ran on: one record, measured the same way for ``train_bench``, ``eval_bench`` and
``serve_bench`` (each puts it in its JSON under ``machine``).

What it holds:

* ``cpu_model`` (``/proc/cpuinfo``'s model name), ``cpus`` (this process's affinity), ``llc_mb`` (the last-level
  cache of CPU 0, from sysfs);
* ``amx`` (the CPU flags ``amx_bf16`` and ``amx_tile`` both, and torch agreeing: ``torch.cpu._is_amx_tile_supported``),
  ``avx512_bf16`` (the flag), ``bf16_native`` (either: where medfoundry's ``precision: auto`` picks bf16),
  ``cpu_capability`` (``torch.backends.cpu.get_cpu_capability()``: the kernels torch dispatches to, e.g. AVX2,
  AVX512);
* measured with the benchmark's threads and allocator (``threads``, ``allocator``):
  ``peak_bf16_gflops`` and ``peak_fp32_gflops``, square matmuls, best of several: sizes grow from 256 while one
  matmul takes under a cap (0.5 s quick, 3 s full), so a machine that emulates bf16 (hundreds of times slower)
  is measured in seconds too, at the sizes it can afford; and ``read_bandwidth_gbs``, the memory read bandwidth:
  GB/s of bytes read by ``torch.sum`` over a float32 tensor of max(1 GiB, 8 x the last-level cache), best of
  several passes. A sum, not a copy: what bounds a decode step is streaming the weights once, read-only, and a sum
  is exactly a read-only stream (one add per 4 bytes, vectorized on every thread: far below any CPU's compute);
  a copy would add the writes and the write-allocate reads that decoding never does;
* ``foreign_cpu``: the share of the machine's CPU that other processes used while it was measured (the
  bandwidth and both peaks are only the machine's when that is near 0); ``measure_s``.

The measurement runs in a fresh interpreter (``record``), started with the environment the benchmark gives its
own children (``LD_PRELOAD``, ``OMP_NUM_THREADS``), so it sees the same threads and allocator. Run alone,
``python benchmarks/machine.py [--quick]`` prints the record as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from timed_child import run_timed

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
# per mode: matmul sizes tried (ascending), a matmul longer than cap_s ends the growth, each timing lasts about
# target_s, best of repeats; a dtype's sizes stop once budget_s is spent; bandwidth: best of passes
PLANS = {
    "quick": {
        "sizes": (256, 512, 1024, 2048, 3072),
        "cap_s": 0.5,
        "target_s": 0.1,
        "repeats": 3,
        "budget_s": 3.0,
        "passes": 5,
        "min_bytes": GIB,
        "llc_factor": 8,
    },
    "full": {
        "sizes": (256, 512, 1024, 2048, 3072, 4096),
        "cap_s": 3.0,
        "target_s": 0.3,
        "repeats": 5,
        "budget_s": 20.0,
        "passes": 10,
        "min_bytes": GIB,
        "llc_factor": 8,
    },
}
CHILD_TIMEOUT_S = 600


# -- static facts ----------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def llc_mb() -> float | None:
    """The largest cache of CPU 0 (sysfs), in MiB; None when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 / 1024, "M": 1, "G": 1024}.get(text[-1:].upper())
        sizes.append(float(text[:-1]) * scale if scale else float(text) / (1 << 20))
    return max(sizes) if sizes else None


def _allocator_mapped() -> str:
    with open("/proc/self/maps") as fh:
        return "tcmalloc" if "tcmalloc" in fh.read() else "glibc"


# -- measurements (in the child) ---------------------------------------------------------------------


def peak_gflops(dtype, plan: dict) -> tuple[float, int]:
    """(best GFLOP/s of square matmuls, the size it came from)."""
    import torch

    best, best_n, spent = 0.0, 0, time.perf_counter()
    for n in plan["sizes"]:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        start = time.perf_counter()
        c = a @ b  # warm-up (packing, the output's allocation); timed as a fallback figure
        single = time.perf_counter() - start
        flops = 2 * n**3
        if single > plan["cap_s"]:  # too slow to repeat: this one call is the figure at this size, and the last
            if flops / single > best:
                best, best_n = flops / single, n
            break
        reps = max(1, int(plan["target_s"] / max(single, 1e-6)))
        for _ in range(plan["repeats"]):
            start = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            rate = flops * reps / (time.perf_counter() - start)
            if rate > best:
                best, best_n = rate, n
        if time.perf_counter() - spent > plan["budget_s"]:
            break
    return round(best / 1e9, 2), best_n


def read_bandwidth(plan: dict) -> tuple[float, int]:
    """(best GB/s read by torch.sum over a float32 tensor much larger than the last-level cache, its bytes)."""
    import torch

    llc = llc_mb() or 32
    nbytes = max(plan["min_bytes"], int(plan["llc_factor"] * llc * (1 << 20)))
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: every page is resident before timing
    x.sum()
    best = 0.0
    for _ in range(plan["passes"]):
        start = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - start))
    return round(best / 1e9, 2), nbytes


def measure(quick: bool, overrides: dict | None = None) -> dict:
    """The record (all but ``foreign_cpu``), measured in this process (``overrides``: of the mode's plan)."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from medfoundry.runtime import configure

    configure()
    plan = {**PLANS["quick" if quick else "full"], **(overrides or {})}
    started = time.perf_counter()
    flags = cpu_flags()
    amx_torch = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    amx = {"amx_bf16", "amx_tile"} <= flags and amx_torch
    bandwidth, nbytes = read_bandwidth(plan)
    bf16, bf16_n = peak_gflops(torch.bfloat16, plan)
    fp32, fp32_n = peak_gflops(torch.float32, plan)
    return {
        "cpu_model": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "llc_mb": llc_mb(),
        "amx": amx,
        "avx512_bf16": "avx512_bf16" in flags,
        "bf16_native": amx or "avx512_bf16" in flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "allocator": _allocator_mapped(),
        "peak_bf16_gflops": bf16,
        "peak_fp32_gflops": fp32,
        "peak_matmul_sizes": {"bf16": bf16_n, "fp32": fp32_n},
        "read_bandwidth_gbs": bandwidth,
        "read_bandwidth_bytes": nbytes,
        "mode": "quick" if quick else "full",
        "measure_s": round(time.perf_counter() - started, 2),
    }


# -- the parent's side --------------------------------------------------------------------------------


def record(env: dict | None = None, quick: bool = True, overrides: dict | None = None) -> dict:
    """The machine record, measured in a fresh interpreter with ``env`` (default: this process's environment),
    with ``foreign_cpu`` added (``overrides``: of the mode's plan, for tests)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    argv = [sys.executable, __file__, "--child", json.dumps(overrides or {})] + (["--quick"] if quick else [])
    return child_result(argv, env, "machine measurement")


def child_result(argv: list[str], env: dict, what: str, timeout: float = CHILD_TIMEOUT_S) -> dict:
    """The JSON last line of a benchmark child, with the share of the CPU other processes used meanwhile."""
    proc, _, foreign = run_timed(argv, env, timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1]), "foreign_cpu": foreign}


def best_of(first: dict, second: dict) -> dict:
    """Two records of the same machine merged: the higher peaks and bandwidth, the larger foreign share."""
    merged = dict(first)
    for key in ("peak_bf16_gflops", "peak_fp32_gflops", "read_bandwidth_gbs"):
        merged[key] = max(first[key], second[key])
    merged["foreign_cpu"] = max(first["foreign_cpu"], second["foreign_cpu"])
    return merged


def describe(m: dict) -> str:
    """One progress line."""
    return (
        f"machine: {m['cpu_model']}, {m['threads']} threads ({m['allocator']}), {m['cpu_capability']}, "
        f"AMX {'yes' if m['amx'] else 'no'}, AVX-512 BF16 {'yes' if m['avx512_bf16'] else 'no'}; "
        f"bf16 {m['peak_bf16_gflops']:,.1f} GFLOP/s, fp32 {m['peak_fp32_gflops']:,.1f} GFLOP/s, "
        f"read {m['read_bandwidth_gbs']:.1f} GB/s (other processes used {m['foreign_cpu']:.0%} of the CPU)"
    )


def main() -> None:
    quick = "--quick" in sys.argv
    if "--child" in sys.argv:
        print(json.dumps(measure(quick, json.loads(sys.argv[sys.argv.index("--child") + 1]))))
        return
    print(json.dumps(record(quick=quick)))


if __name__ == "__main__":
    main()
