"""``benchmarks/machine.py``: the machine record every benchmark puts in its JSON under ``machine`` (measured
in a child process, here with a tiny plan so that it takes seconds)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark modules import each other by name
import machine

TYPES = {
    "cpu_model": str,
    "cpus": int,
    "amx": bool,
    "avx512_bf16": bool,
    "bf16_native": bool,
    "cpu_capability": str,
    "threads": int,
    "allocator": str,
    "peak_bf16_gflops": float,
    "peak_fp32_gflops": float,
    "read_bandwidth_gbs": float,
    "read_bandwidth_bytes": int,
    "foreign_cpu": float,
}


def test_record_fields_and_types():
    tiny = {"sizes": [64, 128], "repeats": 1, "target_s": 0.01, "passes": 2, "min_bytes": 1 << 26, "llc_factor": 0}
    record = machine.record(quick=True, overrides=tiny)
    for key, kind in TYPES.items():
        assert isinstance(record[key], kind), (key, record[key])
    assert record["cpu_model"]
    assert record["threads"] >= 1 and record["cpus"] >= 1
    assert record["read_bandwidth_gbs"] > 0 and record["read_bandwidth_bytes"] == 1 << 26
    assert record["peak_fp32_gflops"] > 0 and record["peak_bf16_gflops"] > 0
    assert record["peak_matmul_sizes"]["fp32"] in (64, 128)
    assert record["bf16_native"] == (record["amx"] or record["avx512_bf16"])
    assert 0 <= record["foreign_cpu"] <= 1
    assert record["allocator"] in ("tcmalloc", "glibc")
    assert machine.best_of(record, {**record, "read_bandwidth_gbs": 1e6})["read_bandwidth_gbs"] == 1e6
    assert "GFLOP/s" in machine.describe(record)


def test_static_facts():
    assert machine.cpu_model()
    assert isinstance(machine.cpu_flags(), set)
    llc = machine.llc_mb()
    assert llc is None or llc > 0
