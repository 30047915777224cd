"""Training telemetry: ``metrics.jsonl``, optional TensorBoard scalars, a progress bar with tokens/s, MFU
and ETA, the loss-curve PNG."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch

from medfoundry.errors import ConfigError
from medfoundry.io import atomic_path, write_json

# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tok_s": "train/tokens_per_s",
    "mfu": "train/mfu",
    "grad_norm": "train/grad_norm",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "val_bpb": "val/bpb",
}


def require_tensorboard() -> None:
    """``log.tensorboard`` needs the tensorboard package (torch's SummaryWriter writes with it): say so
    before any work."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "log.tensorboard: the tensorboard package is not installed: pip install tensorboard "
            "(or pip install 'medfoundry[tensorboard]'), or set log.tensorboard: false"
        )


@lru_cache(maxsize=4)
def peak_flops(device: str, precision: str) -> float:
    """Dense matmul throughput (FLOP/s) of this device in the training precision: the MFU denominator.

    The highest ever measured here for the same device, dtype and thread count (kept in
    ``$MEDFOUNDRY_CACHE/peak_flops.json``, default ``~/.cache/medfoundry``): a measurement taken while other
    processes share the cores comes out several times too low and would report an MFU above 100%.
    Measured once per process.
    """
    from medfoundry.model.load import cache_root

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    key = f"{device}|{_device_name(device)}|{dtype}|{torch.get_num_threads()}"
    measured = _measure_matmul(device, dtype)
    path = cache_root() / "peak_flops.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > known.get(key, 0.0):
        try:
            write_json(path, {**known, key: best})
        except OSError:  # a read-only home: the measurement still serves this run
            pass
    return best


def _measure_matmul(device: str, dtype: torch.dtype) -> float:
    n = 2048
    generator = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG streams
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        a @ b
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


class MetricsLog:
    """Appends JSON lines (rank 0 only) and, with ``tensorboard`` (a folder), the same values as
    TensorBoard scalars (:data:`TENSORBOARD_TAGS`). On resume, lines past the checkpoint's step are
    dropped first, and TensorBoard is told to purge its events past it, so both read as one
    uninterrupted run. Call :meth:`close` at the end (it flushes the event file)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        self.writer = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = (
                [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
                if path.is_file()
                else []
            )
            path.write_text("".join(line + "\n" for line in kept))
            self.records = [json.loads(line) for line in kept]
            if tensorboard is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard), purge_step=resume_step + 1 if resume_step else None)

    @contextlib.contextmanager
    def progress(self, total: int, initial: int):
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, desc="pretrain", unit="step", disable=not self.enabled or None) as bar:
            yield bar

    def _write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], record["step"], walltime=record["time"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def step(self, step: int, bar, *, every: int, skipped: bool, **values) -> None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{values['loss']:.3f}",
            tok_s=f"{values['tok_s']:,.0f}",
            mfu=f"{100 * values['mfu']:.1f}%",
            refresh=False,
        )
        if step % every == 0 or skipped or step == 1:
            self._write({"step": step, "skipped": skipped, **values, "time": time.time()})

    def eval(self, step: int, values: dict) -> None:
        self._write({"step": step, **values, "time": time.time()})

    def summary(self) -> dict:
        train = [r for r in self.records if "loss" in r and r["step"] > 1]
        evals = [r for r in self.records if "val_loss" in r]
        out = {"steps": max((r["step"] for r in self.records), default=0)}
        if train:
            out.update(
                final_loss=train[-1]["loss"],
                tokens=train[-1]["tokens"],
                targets=train[-1].get("targets"),
                median_tok_s=statistics.median(r["tok_s"] for r in train),
                median_mfu=statistics.median(r["mfu"] for r in train),
            )
        if evals:  # every validation metric (loss, ppl, bpb or per-source losses), last and first
            out.update(
                {k: v for k, v in evals[-1].items() if k.startswith("val_")},
                initial_val_loss=evals[0]["val_loss"],
                initial_val_ppl=evals[0]["val_ppl"],
            )
        return out


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
