"""The MFU denominator: the published dense peak of a known accelerator (never measured), else a measured peak,
and a peak measured while other processes share the cores must not stick."""

from __future__ import annotations

import json

import pytest
import torch

from medfoundry.train import metrics


@pytest.fixture
def fresh_peaks():
    """Each call measures anew (a new process each time: no in-process memo), and later tests measure for real."""
    metrics.device_peak.cache_clear()
    yield
    metrics.device_peak.cache_clear()


def test_peak_flops_keeps_the_best_of_three_measurements_per_device(tmp_path, monkeypatch, fresh_peaks):
    """Each run (a new process) times the peak until three timings are kept; then their best is read."""
    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path))
    measured = iter([800e9, 200e9, 900e9])  # quiet, contended, quieter; then no more timing
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: next(measured))

    def peak(precision: str) -> float:
        metrics.device_peak.cache_clear()
        return metrics.peak_flops("cpu", precision)

    assert peak("bf16") == 800e9
    assert peak("bf16") == 800e9  # the contended 200 GFLOP/s is not used
    assert peak("bf16") == 900e9
    assert peak("bf16") == 900e9  # read, not timed: the iterator is exhausted
    stored = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(stored.values()) == [{"flops": 900e9, "measurements": 3}] and "bfloat16" in next(iter(stored))
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: 150e9)
    assert peak("fp32") == 150e9  # another dtype has its own entry
    cpu = metrics.device_peak("cpu", "fp32")
    assert (cpu.published, cpu.measured, cpu.flops, cpu.source) == (None, 150e9, 150e9, "measured")


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312),
        ("NVIDIA A100-PCIE-40GB", "bf16", 312),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # the SXM part's name
        ("NVIDIA H100 PCIe", "bf16", 756),
        ("NVIDIA H200", "bf16", 989.4),
        ("AMD Instinct MI300X", "bf16", 1307.4),
        ("AMD Instinct MI300X VF", "fp16", 1307.4),
        ("NVIDIA L4", "bf16", 121),
        ("NVIDIA A10", "bf16", 125),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
    ],
)
def test_published_peaks_by_device_name(name, precision, tflops):
    assert metrics.published_peak(name, precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A10G", "NVIDIA L40", "Tesla T4", ""])
def test_other_accelerators_have_no_published_peak(name):
    """Variants at other clocks or power (and unknown parts) are measured: no neighbour's number is borrowed."""
    assert metrics.published_peak(name, "bf16") is None


def test_a_known_gpu_uses_its_published_peak_without_measuring(monkeypatch, fresh_peaks):
    monkeypatch.setattr(metrics, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: pytest.fail("a known GPU is not timed"))
    peak = metrics.device_peak("cuda", "bf16")
    assert (peak.name, peak.precision, peak.measured, peak.source) == (
        "NVIDIA H100 80GB HBM3",
        "bf16",
        None,
        "published",
    )
    assert metrics.peak_flops("cuda", "bf16") == peak.flops == peak.published == pytest.approx(989.4e12)
    assert peak.to_dict() == {
        "name": "NVIDIA H100 80GB HBM3",
        "precision": "bf16",
        "published": peak.published,
        "measured": None,
        "flops": peak.published,
        "source": "published",
    }
    fp32 = metrics.device_peak("cuda", "fp32")  # fp32 matmuls in full precision: torch's default
    assert (fp32.precision, fp32.flops) == ("fp32", pytest.approx(66.9e12))
    metrics.device_peak.cache_clear()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 allowed
    tf32 = metrics.device_peak("cuda", "fp32")
    assert (tf32.precision, tf32.flops) == ("tf32", pytest.approx(494.7e12))


def test_an_unknown_gpu_falls_back_to_the_measured_peak(tmp_path, monkeypatch, fresh_peaks):
    monkeypatch.setenv("MEDFOUNDRY_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    timed = []
    monkeypatch.setattr(metrics, "_measure_matmul", lambda device, dtype: timed.append((device, dtype)) or 150e12)
    peak = metrics.device_peak("cuda", "bf16")
    assert (peak.published, peak.measured, peak.flops, peak.source) == (None, 150e12, 150e12, "measured")
    assert timed == [("cuda", torch.bfloat16)]
    (key,) = json.loads((tmp_path / "peak_flops.json").read_text())
    assert "RTX 4090" in key and "synchronized" in key  # not mixed with the old, unsynchronized GPU timings


def test_measured_peak_is_a_real_matmul_rate():
    """The CPU measurement itself: a positive rate, best of several timed trials."""
    rate = metrics._measure_matmul("cpu", torch.float32, trials=2)
    assert 1e8 < rate < 1e14
