"""Where the time goes: torch.profiler's top operators by self CPU time, for (a) a training step of gpt2-52m as
medfoundry's training loop runs it and (b) a decode step of SmolLM2-135M at batch 1 and 8 in the generation engine.

(a) runs ``medfoundry.train.loop.pretrain`` on train_bench's setup (its cached token shards and tokenizer, its
config: context 256, batch 8 x 256, dropout off, AdamW, seed 0) with the loop's own ``_step`` wrapped: W untimed
warmup steps (compilation, if the config's defaults compile, falls there), then K steps under the profiler.
(b) loads SmolLM2-135M-Instruct (serve_bench's converted checkpoint) into ``Engine.load`` with its defaults, starts
B greedy requests (serve_bench's prompts, end-of-sequence ignored), runs the prefill step and W decode steps, then
profiles K decode steps (``Engine.step``, each one token per request).

Both run with whatever the code's defaults are (eager or compiled), in the precision ``auto`` picks (bf16 where the
CPU computes it, else fp32), each in a fresh interpreter with train_bench's child environment (tcmalloc preloaded
when installed, OMP_NUM_THREADS = the CPUs): ``--train-compile MODE`` forces ``training.compile``,
``--decode-compile auto|on|off`` the engine's ``compile``, ``--decode-precision`` its precision and
``--decode-linears kernel|torch`` its decode linears (the few-row CPU kernel, its default, or torch's). Compiled
graphs show each generated kernel as an op of its own (inductor's ``cpp.enable_kernel_profile``;
``--no-kernel-names``: one op per graph). Per table:
op, self CPU time per step (ms), its share of the step's wall time, calls per step; the last row, "(not in any
op)", is the wall time no operator accounts for (Python, the loop's own bookkeeping). Times are under the
profiler, which adds a little per op; ``foreign_cpu`` is the share of the machine's CPU other processes used.

Prints the markdown tables, then one JSON object as its last line: ``machine``, and per profile (``train``,
``decode_batch_1``, ``decode_batch_8``) its settings, ``step_ms``, ``rows`` and ``foreign_cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 3600


def top_ops(prof, wall_s: float, steps: int, top: int) -> dict:
    """The ``top`` operators by self CPU time, per step, with the step's wall time and what no op accounts for."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    step_ms = 1000 * wall_s / steps
    rows = [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1000 / steps, 3),
            "pct": round(100 * e.self_cpu_time_total / 1000 / steps / step_ms, 2),
            "calls": round(e.count / steps, 2),
        }
        for e in events[:top]
    ]
    in_ops = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    rows.append(
        {
            "op": "(not in any op)",
            "self_ms": round(max(0.0, step_ms - in_ops), 3),
            "pct": round(100 * max(0.0, step_ms - in_ops) / step_ms, 2),
            "calls": None,
        }
    )
    return {"step_ms": round(step_ms, 2), "steps": steps, "ops": len(events), "rows": rows}


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


# -- children ----------------------------------------------------------------------------------------


def child_train(spec: dict) -> dict:
    import torch

    import medfoundry.train.loop as loop
    from medfoundry.config import validate
    from medfoundry.train.config import PretrainConfig
    from train_bench import BATCH, CONTEXT, NO_DROPOUT, OPTIM, SEED

    warmup, steps = spec["warmup"], spec["steps"]
    data = Path(spec["data"])
    training = {
        "seed": SEED,
        "steps": warmup + steps,
        "micro_batch_size": BATCH,
        "global_batch_size": BATCH,
        "precision": "auto",
    }
    if spec["compile"] is not None:
        training["compile"] = spec["compile"]
    cfg = validate(
        PretrainConfig,
        {
            "output_dir": spec["out"],
            "model": {"preset": spec["size"], "context": CONTEXT, "overrides": NO_DROPOUT},
            "data": {"tokens_dir": str(data / "tokens"), "tokenizer_dir": str(data / "tokenizer")},
            "training": training,
            "optim": {k: OPTIM[k] for k in ("lr", "weight_decay", "betas", "eps", "grad_clip")},
            "schedule": {"kind": "constant"},
            "checkpoint": {"every": 10**9, "keep_last": 1},
            "eval": {"every": 10**9, "batches": 1},
            "log": {"every": 1},
        },
        "profile_ops",
    )
    original, seen, profiled = loop._step, [0], {}

    def step(run, state, bar):
        seen[0] += 1
        if seen[0] <= warmup:
            return original(run, state, bar)
        prof = profiled.setdefault("prof", _profiler())
        if seen[0] == warmup + 1:
            prof.__enter__()
            profiled["start"] = time.perf_counter()
        original(run, state, bar)
        if seen[0] == warmup + steps:
            profiled["wall"] = time.perf_counter() - profiled["start"]
            prof.__exit__(None, None, None)

    loop._step = step
    loop.pretrain(cfg)
    run = json.loads((Path(spec["out"]) / "run.json").read_text())
    table = top_ops(profiled["prof"], profiled["wall"], steps, spec["top"])
    return {
        **table,
        "size": spec["size"],
        "batch": [BATCH, CONTEXT],
        "precision": run["precision"],
        "compile": run["config"]["training"].get("compile"),
        "kernels": run.get("kernels"),
        "threads": torch.get_num_threads(),
        "warmup_steps": warmup,
    }


def child_decode(spec: dict) -> dict:
    import torch

    from medfoundry.generation.config import SamplingConfig
    from medfoundry.generation.engine import Engine
    from serve_bench import PROMPTS

    forced = {} if spec["compile"] is None else {"compile": spec["compile"]}
    engine = Engine.load(
        spec["model"],
        max_batch=max(spec["batches"]),
        precision=spec["precision"],
        few_row_linears=spec["linears"] == "kernel",
        **forced,
    )
    warmup, steps, out = spec["warmup"], spec["steps"], {}
    params = SamplingConfig(max_tokens=warmup + steps + 4, temperature=0, ignore_eos=True)

    def start(batch: int) -> list:
        requests = [engine.add_request(PROMPTS[i % len(PROMPTS)], params) for i in range(batch)]
        engine.step()  # the prefill (and the first decode)
        for _ in range(warmup):
            engine.step()
        return requests

    def drain(requests: list) -> None:
        for request in requests:
            engine.cancel(request)
        while engine.has_work:
            engine.step()

    for batch in spec["batches"]:
        requests = start(batch)  # a whole untimed pass first: every shape the profiled steps meet is compiled
        for _ in range(steps):
            engine.step()
        drain(requests)
        requests = start(batch)
        with _profiler() as prof:
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - started
        drain(requests)
        out[f"decode_batch_{batch}"] = {
            **top_ops(prof, wall, steps, spec["top"]),
            "batch": batch,
            "precision": engine.precision,
            "compiled": getattr(engine, "compiled", False),
            "linears": "kernel" if engine.kernel_linears else "torch",  # what ran, not what was asked
            "tok_s": round(batch * steps / wall, 1),
            "warmup_steps": warmup,
        }
    return {"profiles": out, "threads": torch.get_num_threads()}


def child_main(spec: dict) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from medfoundry.runtime import configure

    configure()
    if spec.get("kernel_names"):  # compiled code: each generated kernel is an op of its own in the profile
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True
    print(json.dumps({"train": child_train, "decode": child_decode}[spec["kind"]](spec)))


def run_child(spec: dict, env: dict) -> dict:
    argv = [sys.executable, __file__, "--child", json.dumps(spec)]
    return machine.child_result(argv, env, f"child {spec['kind']}", CHILD_TIMEOUT_S)


# -- parent ------------------------------------------------------------------------------------------


def markdown(title: str, table: dict) -> str:
    lines = [
        f"**{title}** ({table['step_ms']:,.1f} ms per step, {table['steps']} steps profiled)",
        "",
        "| op | self time ms | % of step | calls |",
        "|---|---:|---:|---:|",
    ]
    for row in table["rows"]:
        calls = "" if row["calls"] is None else f"{row['calls']:g}"
        op = row["op"] if len(row["op"]) <= 80 else row["op"][:77] + "..."  # inductor's kernel names run long
        lines.append(f"| `{op}` | {row['self_ms']:,.2f} | {row['pct']:.1f} | {calls} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=15, help="operators per table")
    parser.add_argument("--size", default="gpt2-52m", help="the GPT-2 preset trained")
    parser.add_argument("--train-warmup", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2, help="training steps profiled (the table: per step)")
    parser.add_argument("--decode-warmup", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps profiled")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument(
        "--train-compile",
        default="default",
        metavar="MODE",
        help="training.compile: the config's default, or a mode it takes (auto, blocks, model, off)",
    )
    parser.add_argument(
        "--decode-compile",
        choices=("default", "auto", "on", "off"),
        default="default",
        help="the engine's compile option: its default, or forced",
    )
    parser.add_argument("--decode-precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument(
        "--decode-linears",
        choices=("kernel", "torch"),
        default="kernel",
        help="the decode step's linears: medfoundry's few-row CPU kernel (the engine's default) or torch's",
    )
    parser.add_argument(
        "--no-kernel-names",
        action="store_true",
        help="leave compiled graphs as one op each (default: inductor's cpp.enable_kernel_profile names each kernel)",
    )
    parser.add_argument("--skip", nargs="+", default=[], choices=("train", "decode"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    from medfoundry.runtime import find_tcmalloc
    from serve_bench import smollm2
    from train_bench import child_env, prepare_data

    env = child_env(find_tcmalloc())
    box = machine.record(env, quick=True)
    print(machine.describe(box), flush=True)
    result: dict = {"machine": box, "profiles": {}}
    if "train" not in args.skip:
        data = prepare_data(False)
        with tempfile.TemporaryDirectory(prefix="profile_ops_") as tmp:
            compile_ = None if args.train_compile == "default" else args.train_compile
            spec = {
                "kind": "train",
                "size": args.size,
                "warmup": args.train_warmup,
                "steps": args.train_steps,
                "compile": compile_,
                "data": data["dir"],
                "out": str(Path(tmp) / "run"),
                "top": args.top,
                "kernel_names": not args.no_kernel_names,
            }
            train = run_child(spec, env)
        result["profiles"]["train"] = train
        title = (
            f"Training step, {args.size}, batch 8 x 256, {train['precision']}, compile {train['compile']} "
            f"(other processes used {train['foreign_cpu']:.0%} of the CPU)"
        )
        print(markdown(title, train) + "\n", flush=True)
    if "decode" not in args.skip:
        spec = {
            "kind": "decode",
            "model": str(smollm2()),
            "batches": args.batches,
            "warmup": args.decode_warmup,
            "steps": args.decode_steps,
            "top": args.top,
            "compile": None if args.decode_compile == "default" else args.decode_compile,
            "precision": args.decode_precision,
            "linears": args.decode_linears,
            "kernel_names": not args.no_kernel_names,
        }
        decode = run_child(spec, env)
        for name, table in decode["profiles"].items():
            table["foreign_cpu"] = decode["foreign_cpu"]
            result["profiles"][name] = table
            title = (
                f"Decode step, SmolLM2-135M, batch {table['batch']}, {table['precision']}, "
                f"{'compiled' if table['compiled'] else 'eager'}, {table['linears']} linears, {table['tok_s']} tok/s "
                f"(other processes used {decode['foreign_cpu']:.0%} of the CPU)"
            )
            print(markdown(title, table) + "\n", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
