"""Pretraining throughput: medfoundry's loop vs Hugging Face Trainer vs a plain PyTorch loop.

The same models (GPT-2 presets gpt2-12m and gpt2-52m: vocabulary 28,896, context 256, dropout off), the same
data (windows of token shards built from the shared corpus's PubMed abstracts with a 28,896-token domain
tokenizer), the same precision (``--precision``, default auto: bf16 autocast where the CPU computes bf16,
AVX-512 BF16 or AMX, else fp32; fp32 weights and optimizer state), the same optimizer (AdamW lr 3e-4, betas
0.9/0.95, eps 1e-8, weight decay 0.1, clip 1.0, constant LR), the same batch (8 x 256 tokens per step) and the
same allocator (tcmalloc preloaded in every child when installed). Every run is its own subprocess (clean RSS
and allocator state), and runs are alternated: for each size, for each round, the three contenders in an order
rotated per round. Each run does W untimed warmup steps, then N timed steps; tokens/s = N x 2,048 / the wall
time from the end of step W to the end of step W+N (medfoundry: the ``time`` stamps of its own metrics.jsonl,
logged every step; HF Trainer: a callback's ``on_step_end``; plain loop: the loop itself), so data loading,
clipping, the optimizer and each framework's per-step overhead all count. The machine is measured in a child
too, with the same allocator and threads (``benchmarks/machine.py``, shared by the three benchmarks: the
JSON's ``machine``: CPU model, AMX and AVX-512 BF16, the bf16 and fp32 matmul peaks, square matmuls best of
several, and the memory read bandwidth). MFU = tokens/s x FLOPs per token (presets.flops_per_token, the PaLM
6N + 12LHT estimate) / the peak of the precision the step computes in (``precision``, ``mfu_peak_gflops``). A
CPU without AVX-512 BF16 or AMX emulates bf16 matmuls at a few GFLOP/s at most (hundreds of times slower than
fp32), so auto trains in fp32 there: the ``machine`` record says which kind of CPU it was.

HF Trainer and the plain loop use the model's own loss (``labels=input_ids``: 255 targets per
256-token window, vs medfoundry's 256 from a 257-token window); tokens/s counts the 2,048 input
tokens of each step for all three. HF Trainer keeps its defaults otherwise: its optimizer is torch's
fused AdamW (``optim=adamw_torch_fused``, the JSON says which), medfoundry's is fused AdamW too
(``optim.implementation: auto``), the plain loop's foreach AdamW. medfoundry runs with its defaults
(``training.attention``/``loss: auto``: eager attention at context 256 on CPU, the output layer fused
with the loss; the native GELU kernel; the JSON lists the kernels its run.json records). All read the
same windows in the same order (medfoundry's WindowReader, seed 0) and start from the same seeded
initialization. medfoundry runs with what ``training.compile: auto`` gives a run long enough to earn its
compile back (compiled blocks where inductor has a compiler; the benchmark's few steps would otherwise stay
eager, which no real run does); ``--medfoundry-compile MODE`` forces one, and the JSON's medfoundry_kernels
says which ran. ``--compile [MODE]`` adds a fourth contender,
medfoundry with ``training.compile: MODE`` (default ``model``). Compilation falls in the untimed warmup steps.

Other processes on the machine distort every timing (two busy cores make OpenMP steps several times
slower): the parent measures the share of the CPU that other processes used during each run and
measures a run again (``--retries``) when it is above 5%; the JSON says if any run stayed contended.

Prints progress lines, then one JSON object as its last line: machine, precision, peak_bf16_gflops, and
per size params, medfoundry_tok_s, hf_trainer_tok_s, plain_tok_s (medians over rounds), speedup_vs_hf_trainer,
speedup_vs_plain, mfu (medfoundry's) and mfu of each contender, peak_rss_mb of each contender (the
child's ru_maxrss, whole run), every run's tok/s, final_loss (HF Trainer: its mean training loss),
medfoundry_kernels (and with ``--compile``: medfoundry_compile_tok_s, compile_speedup_vs_hf_trainer);
the targets by machine kind (with AMX: >= 1.5x HF Trainer's tokens/s and >= 35% MFU for gpt2-52m;
without: >= 1.25x and >= 70%) and whether they are met. The
tokens are built once and cached in /tmp/medfoundry_train_bench (``--fresh`` rebuilds them); the
output says whether the cache was used. ``--quick`` (2 rounds, 8/5 timed steps) finishes in < 5
minutes with the data built from scratch (about 3 minutes on 2 idle cores); the default (3 rounds,
40/20 timed steps) in about 10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import machine
from timed_child import run_timed

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/medfoundry_train_bench")
SIZES = ("gpt2-12m", "gpt2-52m")
CONTENDERS = ("medfoundry", "hf_trainer", "plain")
COMPILED = "medfoundry_compile"  # --compile
BATCH, CONTEXT, SEED = 8, 256, 0
TOKENS_PER_STEP = BATCH * CONTEXT
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
OPTIM = {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "grad_clip": 1.0}
# issue 20's targets by machine kind: with AMX the matmuls are cheap and the rest of the step decides
TARGETS = {
    "amx": {"speedup_vs_hf_trainer": 1.5, "mfu_gpt2-52m": 0.35},
    "no_amx": {"speedup_vs_hf_trainer": 1.25, "mfu_gpt2-52m": 0.70},
}
# (warmup steps, timed steps) per size, and rounds; quick keeps the whole run (cold data included) < 5 min
PLANS = {
    "quick": {"rounds": 2, "steps": {"gpt2-12m": (3, 8), "gpt2-52m": (2, 5)}},
    "full": {"rounds": 3, "steps": {"gpt2-12m": (5, 40), "gpt2-52m": (3, 20)}},
}
CHILD_TIMEOUT_S = 1800
CONTENDED = 0.05  # a run during which other processes used more than this share of the CPU is measured again


# -- data ----------------------------------------------------------------------------------------


def _data_ready(root: Path) -> bool:
    tokens = root / "tokens"
    try:
        return (root / "tokenizer" / "tokenizer.json").is_file() and all(
            json.loads((tokens / split / "index.json").read_text()).get("complete") for split in ("train", "val")
        )
    except (OSError, ValueError):
        return False


def prepare_data(fresh: bool) -> dict:
    """Corpus (the shared abstracts), 28,896-token tokenizer, token shards: built once into CACHE."""
    start = time.perf_counter()
    if not fresh and _data_ready(CACHE):
        return {
            "dir": str(CACHE),
            "cached": True,
            "prep_s": round(time.perf_counter() - start, 2),
            **_data_stats(CACHE),
        }
    from corpus_bench import DATA, corpus_config
    from medfoundry.config import validate
    from medfoundry.corpus.build import build_corpus
    from medfoundry.corpus.config import CorpusConfig
    from medfoundry.tokenizer.config import TokenizerTrainConfig
    from medfoundry.tokenizer.shards import tokenize_corpus
    from medfoundry.tokenizer.train import train_tokenizer

    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared data folder)")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=CACHE.name + ".partial-", dir=CACHE.parent))
    try:
        cfg = corpus_config(work, 0)  # the corpus benchmark's config, abstracts only (the fast, large source)
        cfg["sources"] = [s for s in cfg["sources"] if s["name"] == "abstracts"]
        cfg["dedup"]["precedence"] = ["abstracts"]
        build_corpus(validate(CorpusConfig, cfg, "train_bench"), force=True)
        print(f"data: corpus built ({time.perf_counter() - start:.0f} s)", flush=True)
        train_tokenizer(
            validate(
                TokenizerTrainConfig,
                {"corpus_dir": str(work / "corpus"), "output_dir": str(work / "tokenizer"), "vocab_size": 28_896},
            )
        )
        print(f"data: tokenizer trained ({time.perf_counter() - start:.0f} s)", flush=True)
        tokenize_corpus(work / "corpus", work / "tokenizer", work / "tokens")
        shutil.rmtree(work / "corpus")  # only the shards and the tokenizer are needed
        shutil.rmtree(CACHE, ignore_errors=True)
        work.rename(CACHE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # index.json holds the tokenizer's absolute path, which moved with the rename: only its fingerprint is checked
    return {"dir": str(CACHE), "cached": False, "prep_s": round(time.perf_counter() - start, 2), **_data_stats(CACHE)}


def _data_stats(root: Path) -> dict:
    index = {s: json.loads((root / "tokens" / s / "index.json").read_text()) for s in ("train", "val")}
    return {
        "train_tokens": index["train"]["tokens"],
        "val_tokens": index["val"]["tokens"],
        "vocab_size": index["train"]["vocab_size"],
    }


# -- children --------------------------------------------------------------------------------------


def child_env(allocator: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator:
        env["LD_PRELOAD"] = allocator
        env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)  # no "large alloc" lines for the logits
    env["MEDFOUNDRY_NO_TCMALLOC"] = "1"  # the parent decides; never re-exec
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_child(spec: dict, env: dict) -> dict:
    """Run one measurement in a fresh interpreter. Also reports ``foreign_cpu``: the share of the machine's
    CPU time that other processes used meanwhile (other jobs on the box distort every timing)."""
    proc, _, foreign = run_timed([sys.executable, __file__, "--child", json.dumps(spec)], env, CHILD_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"child {spec['kind']} failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    result["foreign_cpu"] = foreign
    return result


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _allocator_mapped() -> str:
    with open("/proc/self/maps") as fh:
        return "tcmalloc" if "tcmalloc" in fh.read() else "glibc"


def _model(spec: dict):
    """The contenders' model: the preset at the tokenizer's vocabulary, context 256, no dropout, seeded init."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medfoundry.model.presets import model_config

    vocab = len(AutoTokenizer.from_pretrained(str(Path(spec["data"]) / "tokenizer")))
    torch.manual_seed(SEED)
    config = model_config(spec["size"], vocab_size=vocab, context=CONTEXT, overrides=NO_DROPOUT)
    return AutoModelForCausalLM.from_config(config)


def _windows(spec: dict, steps: int):
    """The batches medfoundry reads (its WindowReader, same seed): steps x (8, 257) int64 arrays."""
    from medfoundry.tokenizer.reader import WindowReader
    from medfoundry.tokenizer.token_shards import TokenShards

    reader = WindowReader(TokenShards(Path(spec["data"]) / "tokens" / "train"), CONTEXT, BATCH, seed=SEED)
    return [next(reader) for _ in range(steps)]


def _timed(ends: list[float], warmup: int, steps: int) -> dict:
    """tokens/s over steps warmup+1 .. warmup+steps from the wall-clock end of every step (ends[i]: step i+1)."""
    wall = ends[warmup + steps - 1] - ends[warmup - 1]
    per_step = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup : warmup + steps])]
    return {"tok_s": steps * TOKENS_PER_STEP / wall, "timed_s": wall, "step_s_median": statistics.median(per_step)}


def child_medfoundry(spec: dict) -> dict:
    from medfoundry.config import validate
    from medfoundry.train.config import PretrainConfig
    from medfoundry.train.loop import pretrain

    warmup, steps, total = spec["warmup"], spec["steps"], spec["warmup"] + spec["steps"]
    out, data = Path(spec["out"]), Path(spec["data"])
    cfg = validate(
        PretrainConfig,
        {
            "output_dir": str(out),
            "model": {"preset": spec["size"], "context": CONTEXT, "overrides": NO_DROPOUT},
            "data": {"tokens_dir": str(data / "tokens"), "tokenizer_dir": str(data / "tokenizer")},
            "training": {
                "seed": SEED,
                "steps": total,
                "micro_batch_size": BATCH,
                "global_batch_size": BATCH,
                "precision": spec["precision"],
                **({"compile": spec["compile"]} if spec.get("compile") else {}),  # else the config's default
            },
            "optim": {k: OPTIM[k] for k in ("lr", "weight_decay", "betas", "eps", "grad_clip")},
            "schedule": {"kind": "constant"},
            "checkpoint": {"every": 10**9, "keep_last": 1},  # only the final one, after the timed steps
            "eval": {"every": 10**9, "batches": 1},  # only the final validation, after the timed steps
            "log": {"every": 1},
        },
        "train_bench",
    )
    start = time.perf_counter()
    pretrain(cfg)
    run_s = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    ends = [train[s]["time"] for s in range(1, total + 1)]
    timed = _timed(ends, warmup, steps)
    logged = statistics.median(train[s]["tok_s"] for s in range(warmup + 1, total + 1))
    run = json.loads((out / "run.json").read_text())
    kernels = run["kernels"]  # as the run resolved them (training.compile auto: off, blocks...)
    return {
        **timed,
        "logged_tok_s_median": logged,
        "final_loss": train[total]["loss"],
        "run_s": run_s,
        "kernels": kernels,
    }


def child_hf_trainer(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    warmup, steps, total = spec["warmup"], spec["steps"], spec["warmup"] + spec["steps"]
    windows = torch.from_numpy(np.concatenate(_windows(spec, total)))[:, :-1].contiguous()

    class Windows(torch.utils.data.IterableDataset):  # iterable: no sampler, medfoundry's window order
        def __iter__(self):
            for row in windows:
                yield {"input_ids": row, "labels": row}

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    model = _model(spec)
    args = TrainingArguments(
        output_dir=spec["out"],
        use_cpu=True,
        bf16=spec["precision"] == "bf16",
        per_device_train_batch_size=BATCH,
        max_steps=total,
        learning_rate=OPTIM["lr"],
        weight_decay=OPTIM["weight_decay"],
        adam_beta1=OPTIM["betas"][0],
        adam_beta2=OPTIM["betas"][1],
        adam_epsilon=OPTIM["eps"],
        max_grad_norm=OPTIM["grad_clip"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=SEED,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[StepClock()])
    start = time.perf_counter()
    output = trainer.train()
    run_s = time.perf_counter() - start
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        **_timed(ends, warmup, steps),
        "final_loss": output.training_loss,
        "run_s": run_s,  # HF: mean over the run
        "optimizer": f"{type(optimizer).__name__}(foreach={optimizer.defaults.get('foreach')}, "
        f"fused={optimizer.defaults.get('fused')})",
    }


def child_plain(spec: dict) -> dict:
    import torch

    warmup, steps, total = spec["warmup"], spec["steps"], spec["warmup"] + spec["steps"]
    batches = iter(_windows(spec, total))
    model = _model(spec)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIM["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=OPTIM["lr"],
        betas=OPTIM["betas"],
        eps=OPTIM["eps"],
        foreach=True,
    )
    ends, loss_value = [], float("nan")
    start = time.perf_counter()
    for _ in range(total):
        inputs = torch.from_numpy(next(batches))[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"], foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        ends.append(time.perf_counter())
    return {**_timed(ends, warmup, steps), "final_loss": loss_value, "run_s": time.perf_counter() - start}


def child_main(spec: dict) -> None:
    import torch

    from medfoundry.runtime import configure

    configure()
    result = {
        "medfoundry": child_medfoundry,
        COMPILED: child_medfoundry,
        "hf_trainer": child_hf_trainer,
        "plain": child_plain,
    }[spec["kind"]](spec)
    result.update(threads=torch.get_num_threads(), allocator=_allocator_mapped())
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    print(json.dumps(result))


# -- parent --------------------------------------------------------------------------------------


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit in this process, so subprocess.run kills the running child on its way out.
    Processes forked from this one (there are none after data preparation, but to be safe) keep the default."""
    parent = os.getpid()

    def handler(signum, frame):
        if os.getpid() != parent:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def long_run_compile() -> str:
    """What ``training.compile: auto`` resolves to on this CPU for a run long enough to compile."""
    from medfoundry.train.accel import compile_for

    return compile_for("auto", "cpu", lora=False, run_flops=float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds: < 5 minutes in all")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--rounds", type=int, default=0, help="override the mode's rounds")
    parser.add_argument("--fresh", action="store_true", help=f"rebuild the cached tokens in {CACHE}")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a run again (up to this many times) when other processes took > 5%% of the CPU",
    )
    parser.add_argument("--glibc", action="store_true", help="do not preload tcmalloc (the allocator ablation)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="model",
        metavar="MODE",
        help=f"add {COMPILED}: medfoundry with training.compile MODE (default model: the whole model)",
    )
    parser.add_argument(
        "--medfoundry-compile",
        metavar="MODE",
        help="training.compile of the medfoundry contender (default: what auto gives a long run on this CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast where the CPU computes bf16 (AVX-512 BF16 or AMX), else fp32",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    from medfoundry.model.presets import count_parameters, flops_per_token, model_config
    from medfoundry.runtime import find_tcmalloc, resolve_device_precision

    precision = resolve_device_precision("cpu", args.precision)[1]
    wall_start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    rounds = args.rounds or plan["rounds"]
    tcmalloc = None if args.glibc else find_tcmalloc()
    env = child_env(tcmalloc)
    contenders = CONTENDERS + ((COMPILED,) if args.compile else ())
    medfoundry_compile = args.medfoundry_compile or long_run_compile()
    print(
        f"train_bench ({mode}): sizes {', '.join(args.sizes)}, {rounds} rounds, contenders {', '.join(contenders)}, "
        f"allocator {'tcmalloc' if tcmalloc else 'glibc'}, {env['OMP_NUM_THREADS']} threads, {precision}",
        flush=True,
    )

    data = prepare_data(args.fresh)
    print(
        f"data: {'reused the cache in' if data['cached'] else 'built (and cached) in'} {data['dir']} "
        f"({data['train_tokens']:,} train tokens, vocabulary {data['vocab_size']:,}, {data['prep_s']:.0f} s)",
        flush=True,
    )

    _exit_on_sigterm()
    box = machine.record(env, quick=args.quick)  # the children's allocator and threads
    print(machine.describe(box), flush=True)

    runs: dict[str, dict[str, list[dict]]] = {s: {c: [] for c in contenders} for s in args.sizes}
    allocators, threads, repeated = set(), set(), 0
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        for size in args.sizes:
            warmup, steps = plan["steps"][size]
            for r in range(rounds):
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for contender in order:
                    out = Path(tmp) / f"{size}-{contender}-{r}"
                    spec = {
                        "kind": contender,
                        "size": size,
                        "warmup": warmup,
                        "steps": steps,
                        "data": data["dir"],
                        "out": str(out),
                        "precision": precision,
                        "compile": args.compile if contender == COMPILED else medfoundry_compile,
                    }
                    for attempt in range(args.retries + 1):
                        started = time.perf_counter()
                        result = run_child(spec, env)
                        shutil.rmtree(out, ignore_errors=True)
                        contended = result["foreign_cpu"] > CONTENDED
                        busy = f", OTHER PROCESSES USED {result['foreign_cpu']:.0%} OF THE CPU" if contended else ""
                        again = " - measuring again" if contended and attempt < args.retries else ""
                        print(
                            f"[{size} round {r + 1}/{rounds}] {contender:>18}: {result['tok_s']:8,.0f} tok/s "
                            f"(median step {result['step_s_median']:.3f} s, loss {result['final_loss']:.3f}, "
                            f"peak RSS {result['peak_rss_mb']:,.0f} MB, child {time.perf_counter() - started:.0f} s"
                            f"{busy}{again})",
                            flush=True,
                        )
                        if not again:
                            break
                        repeated += 1
                    runs[size][contender].append(result)
                    allocators.add(result["allocator"])
                    threads.add(result["threads"])

    if not args.quick:  # the machine once more at the end: best of both
        box = machine.best_of(box, machine.record(env, quick=False))
    peak_flops = box[f"peak_{precision}_gflops"] * 1e9  # the MFU denominator: the precision the step computes in

    sizes_out = {}
    for size in args.sizes:
        config = model_config(size, vocab_size=data["vocab_size"], context=CONTEXT, overrides=NO_DROPOUT)
        fpt = flops_per_token(config, CONTEXT)
        med = {c: statistics.median(r["tok_s"] for r in runs[size][c]) for c in contenders}
        sizes_out[size] = {
            "params": count_parameters(config),
            "flops_per_token": fpt,
            **{f"{c}_tok_s": round(med[c], 1) for c in contenders},
            "speedup_vs_hf_trainer": round(med["medfoundry"] / med["hf_trainer"], 3),
            "speedup_vs_plain": round(med["medfoundry"] / med["plain"], 3),
            **({"compile_speedup_vs_hf_trainer": round(med[COMPILED] / med["hf_trainer"], 3)} if args.compile else {}),
            "mfu": round(med["medfoundry"] * fpt / peak_flops, 4),
            "mfu_by_contender": {c: round(med[c] * fpt / peak_flops, 4) for c in contenders},
            "peak_rss_mb": {c: max(r["peak_rss_mb"] for r in runs[size][c]) for c in contenders},
            "runs_tok_s": {c: [round(r["tok_s"], 1) for r in runs[size][c]] for c in contenders},
            "medfoundry_logged_tok_s": round(
                statistics.median(r["logged_tok_s_median"] for r in runs[size]["medfoundry"]), 1
            ),
            "final_loss": {c: round(runs[size][c][-1]["final_loss"], 4) for c in contenders},
            "medfoundry_kernels": runs[size]["medfoundry"][-1]["kernels"],
            "hf_trainer_optimizer": runs[size]["hf_trainer"][-1]["optimizer"],
            "foreign_cpu_max": {c: max(r["foreign_cpu"] for r in runs[size][c]) for c in contenders},
            "warmup_steps": plan["steps"][size][0],
            "timed_steps": plan["steps"][size][1],
        }
    kind = "amx" if box["amx"] else "no_amx"
    targets = TARGETS[kind]
    met = {
        f"speedup_vs_hf_trainer_{s}": v["speedup_vs_hf_trainer"] >= targets["speedup_vs_hf_trainer"]
        for s, v in sizes_out.items()
    }
    if "gpt2-52m" in sizes_out:
        met["mfu_gpt2-52m"] = sizes_out["gpt2-52m"]["mfu"] >= targets["mfu_gpt2-52m"]
    result = {
        "mode": mode,
        "precision": precision,
        "mfu_peak_gflops": box[f"peak_{precision}_gflops"],
        "peak_bf16_gflops": box["peak_bf16_gflops"],
        "peak_fp32_gflops": box["peak_fp32_gflops"],
        "machine": box,
        "sizes": sizes_out,
        "targets": {"machine_kind": kind, **targets, "met": met},
        "allocator": "tcmalloc" if allocators == {"tcmalloc"} else "glibc" if allocators == {"glibc"} else "mixed",
        "threads": sorted(threads),
        "contended": any(r["foreign_cpu"] > CONTENDED for s in runs.values() for c in s.values() for r in c)
        or box["foreign_cpu"] > CONTENDED,
        "runs_repeated_for_contention": repeated,
        "batch": [BATCH, CONTEXT],
        "rounds": rounds,
        "data": data,
        "wall_s": round(time.perf_counter() - wall_start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
