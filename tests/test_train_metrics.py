"""The MFU denominator: a peak measured while other processes share the cores must not stick."""

from __future__ import annotations

import json

from medfoundry.train import metrics


def test_peak_flops_keeps_the_best_measurement_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path))
    measured = iter([800e9, 200e9, 900e9])  # quiet, contended, quieter
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: next(measured))

    def peak(precision: str) -> float:  # a new process each time: no in-process memo
        metrics.peak_flops.cache_clear()
        return metrics.peak_flops("cpu", precision)

    assert peak("bf16") == 800e9
    assert peak("bf16") == 800e9  # the contended 200 GFLOP/s is not used
    assert peak("bf16") == 900e9
    stored = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(stored.values()) == [900e9] and "bfloat16" in next(iter(stored))
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: 150e9)
    assert peak("fp32") == 150e9  # another dtype has its own entry
    metrics.peak_flops.cache_clear()  # later tests measure for real
