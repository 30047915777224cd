"""Training telemetry: ``metrics.jsonl``, optional TensorBoard scalars and Weights & Biases run, a progress bar
with tokens/s, MFU and ETA, the loss-curve PNG."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from medfoundry.extras import pyplot, require
from medfoundry.io import atomic_path, write_json
from medfoundry.train.config import WandbConfig

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


def _tflops(bf16: float, tf32: float, fp32: float) -> dict[str, float]:
    """FLOP/s per precision from a datasheet's dense TFLOP/s (fp16 runs at the bf16 rate on all of these)."""
    return {"bf16": bf16 * 1e12, "fp16": bf16 * 1e12, "tf32": tf32 * 1e12, "fp32": fp32 * 1e12}


# Published dense (no 2:4 sparsity) tensor-core peaks, FLOP/s, from the vendors' datasheets. ``tf32`` is what fp32
# matmuls reach when torch lets them run in TF32 (``torch.set_float32_matmul_precision("high")``), ``fp32`` the
# plain one. First match of the pattern in ``torch.cuda.get_device_name()`` wins: variants with other clocks or
# power limits (H100 NVL, H200 NVL, A10G, L40, MI300A, ...) are left out on purpose and get the measured peak.
PUBLISHED_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    # (accelerator, pattern of its torch.cuda.get_device_name(), dense peaks)
    ("NVIDIA A100 (SXM4, PCIe)", r"\bA100\b", _tflops(312, 156, 19.5)),
    ("NVIDIA H100 PCIe", r"\bH100\b.*\bPCIe\b", _tflops(756, 378, 51.2)),
    ("NVIDIA H100 SXM", r"\bH100\b(?!.*\b(PCIe|NVL)\b)", _tflops(989.4, 494.7, 66.9)),
    ("NVIDIA H200 SXM", r"\bH200\b(?!.*\bNVL\b)", _tflops(989.4, 494.7, 66.9)),
    ("AMD Instinct MI300X", r"\bMI300X\b", _tflops(1307.4, 653.7, 163.4)),
    ("NVIDIA L4", r"\bL4\b", _tflops(121, 60, 30.3)),
    ("NVIDIA A10", r"\bA10\b", _tflops(125, 62.5, 31.2)),
    ("NVIDIA L40S", r"\bL40S\b", _tflops(362.05, 183, 91.6)),
)


@dataclass(frozen=True)
class Peak:
    """The MFU denominator of one device in one precision: the ``published`` dense peak when the device is in
    :data:`PUBLISHED_PEAKS` (comparable with the MFU papers report), else the ``measured`` one (a timed matmul;
    on a CPU, the best of its first three timings here). ``flops`` is the one MFU divides by."""

    name: str  # the device's name (``torch.cuda.get_device_name``, or the CPU's)
    precision: str  # bf16, fp16, fp32 or tf32 (fp32 matmuls allowed to run in TF32)
    published: float | None
    measured: float | None

    @property
    def flops(self) -> float:
        return self.published if self.published is not None else self.measured

    @property
    def source(self) -> str:
        return "published" if self.published is not None else "measured"

    def to_dict(self) -> dict:
        """For ``run.json``: both peaks, and which one MFU uses."""
        return {**asdict(self), "flops": self.flops, "source": self.source}


def peak_flops(device: str, precision: str) -> float:
    """Dense matmul throughput (FLOP/s) of this device in the training precision: the MFU denominator
    (:attr:`Peak.flops` of :func:`device_peak`)."""
    return device_peak(device, precision).flops


PEAK_MEASUREMENTS = 3  # timings of a device's peak kept before it is only read (see _best_measured)


@lru_cache(maxsize=4)
def device_peak(device: str, precision: str) -> Peak:
    """The published and measured peaks of ``device`` in ``precision`` (bf16, fp16 or fp32). Once per process.

    A GPU of :data:`PUBLISHED_PEAKS` is not measured. Elsewhere (a CPU, another GPU) the peak is timed, and the
    best of the first three timings here for the same device, dtype and thread count is kept (in
    ``$MEDFOUNDRY_CACHE/peak_flops.json``, default ``~/.cache/medfoundry``): a measurement taken while other
    processes share the cores comes out several times too low and would report an MFU above 100%.
    """
    gpu = device.startswith("cuda")
    name = _device_name(device)
    matmul_precision = "tf32" if precision == "fp32" and gpu and _tf32_allowed() else precision
    published = published_peak(name, matmul_precision) if gpu else None
    measured = None if published is not None else _best_measured(device, name, precision)
    return Peak(name=name, precision=matmul_precision, published=published, measured=measured)


def published_peak(name: str, precision: str) -> float | None:
    """The datasheet's dense peak (FLOP/s) of the accelerator called ``name`` in ``precision``, or None."""
    for _, pattern, peaks in PUBLISHED_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return peaks.get(precision)
    return None


def _tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def _best_measured(device: str, name: str, precision: str) -> float:
    """The best of the first :data:`PEAK_MEASUREMENTS` timings of this device, dtype and thread count (kept in
    ``peak_flops.json``): the best of three shrugs off one taken while other processes shared the cores, and after
    them a run starts without the timing (2 s of a CPU's start-up, on one thread)."""
    from medfoundry.model.load import cache_root

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    key = f"{device}|{name}|{dtype}|{torch.get_num_threads()}"
    if device.startswith("cuda"):  # entries of the old, unsynchronized GPU timing (too high) must not count
        key += f"|synchronized|{torch.get_float32_matmul_precision()}"
    path = cache_root() / "peak_flops.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    entry = known.get(key)
    if not isinstance(entry, dict):  # absent, or another version's entry: measured anew
        entry = {"flops": 0.0, "measurements": 0}
    if entry["measurements"] >= PEAK_MEASUREMENTS:
        return entry["flops"]
    entry = {"flops": max(entry["flops"], _measure_matmul(device, dtype)), "measurements": entry["measurements"] + 1}
    try:
        write_json(path, {**known, key: entry})
    except OSError:  # a read-only home: the measurement still serves this run
        pass
    return entry["flops"]


def _measure_matmul(device: str, dtype: torch.dtype, trials: int = 3) -> float:
    """Best of ``trials`` timings of square matmuls (FLOP/s), each one started after, and stopped after, the
    device has finished all earlier work (CUDA runs asynchronously: without that the clock would stop while
    the GPU still computes)."""
    gpu = device.startswith("cuda")
    n, reps = (4096, 10) if gpu else (2048, 2)  # one 2048-matmul takes ~20 us on an H100: too short to time
    generator = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG streams
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: kernel selection, allocation, clocks
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


WANDB_RUN = "wandb.json"  # in the output folder: the id of the W&B run that a resume continues


class WandbLog:
    """The metrics as a Weights & Biases run: the :data:`TENSORBOARD_TAGS` scalars at the training step, the
    config, and the summary at the end. Its id is kept in ``<output_dir>/wandb.json``: a run resumed from a
    checkpoint continues the same W&B run (``resume="allow"``), one that starts at step 0 is a new one. Steps a
    killed run logged after its last checkpoint are logged again on resume, and W&B keeps the first values
    (the resume is bit-identical: the same losses)."""

    def __init__(self, settings: WandbConfig, out: Path, config: dict, resume_step: int):
        wandb = require("wandb", "log.wandb")
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name,
            mode=settings.mode,
            id=_wandb_run_id(out, resume_step),
            resume="allow",
            config=config,
            dir=None if "WANDB_DIR" in os.environ else str(out),
        )

    def log(self, record: dict) -> None:
        values = {tag: record[key] for key, tag in TENSORBOARD_TAGS.items() if key in record}
        if values:
            self.run.log(values, step=record["step"])

    def finish(self, summary: dict | None) -> None:
        """End the run with ``summary`` (:meth:`MetricsLog.summary`), or as failed when it is None."""
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary is not None else 1)


def _wandb_run_id(out: Path, resume_step: int) -> str:
    """The recorded run id when training resumes from a checkpoint; else a new one, recorded."""
    path = out / WANDB_RUN
    if resume_step and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["id"]
    run_id = secrets.token_hex(6)
    write_json(path, {"id": run_id})
    return run_id


class MetricsLog:
    """Appends JSON lines (rank 0 only) and, with ``tensorboard`` (a folder), the same values as
    TensorBoard scalars (:data:`TENSORBOARD_TAGS`); with ``wandb``, to a W&B run as well (:class:`WandbLog`,
    given ``config``). On resume, lines past the checkpoint's step are dropped first, and TensorBoard is
    told to purge its events past it, so both read as one uninterrupted run. Call :meth:`close` at the end
    (it flushes the event file and ends the W&B run)."""

    def __init__(
        self,
        path: Path,
        enabled: bool,
        resume_step: int = 0,
        tensorboard: Path | None = None,
        wandb: WandbConfig | None = None,
        config: dict | None = None,
    ):
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        self.writer = None
        self.wandb = None
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
            if wandb is not None:
                self.wandb = WandbLog(wandb, path.parent, config or {}, resume_step)

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
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish(None if failed else self.summary())

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
    plt = pyplot("the loss plot")
    if plt is None:
        return
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
