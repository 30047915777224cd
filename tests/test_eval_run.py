"""`evaluate` end to end on tiny random GPT-2 models with the real GPT-2 tokenizer and the official
benchmark files: results independent of batch size, lm-eval-shaped outputs, side-by-side comparison,
resumption from per-task caches, chain-of-thought with self-consistency and chat templates, and
held-out perplexity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import shared
from medfoundry.config import validate
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.run import evaluate
from medfoundry.model.export import export_hf
from medfoundry.model.presets import model_config

MMLU = [
    "mmlu_anatomy",
    "mmlu_clinical_knowledge",
    "mmlu_college_biology",
    "mmlu_college_medicine",
    "mmlu_medical_genetics",
    "mmlu_professional_medicine",
]


def tiny_model(directory: Path, seed: int) -> Path:
    """A tiny random GPT-2 with GPT-2's 50,257-token tokenizer and a 1,024-token context."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=50257, context=1024))
    return export_hf(model, shared("tokenizers/gpt2"), directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    shared("benchmarks")
    root = tmp_path_factory.mktemp("eval_models")
    return [tiny_model(root / f"tiny{seed}", seed) for seed in (0, 1)]


def config(out: Path, models, **fields) -> EvalConfig:
    return validate(
        EvalConfig,
        {
            "output_dir": str(out),
            "models": [str(m) for m in models],
            "tasks": ["pubmedqa"],
            "benchmarks_dir": str(shared("benchmarks")),
            "threads": 1,
            "precision": "fp32",
            "bootstrap_iters": 200,
            **fields,
        },
    )


def samples(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]


def test_batch_size_never_changes_the_results(models, tmp_path):
    tasks = ["pubmedqa", "medqa_4options", "medqa_5options", "medmcqa", "mmlu_medical"]
    one = evaluate(config(tmp_path / "b1", models[:1], tasks=tasks, limit=4, batch_size=1))
    many = evaluate(config(tmp_path / "b32", models[:1], tasks=tasks, limit=4, batch_size=32))
    a, b = samples(tmp_path / "b1" / "tiny0"), samples(tmp_path / "b32" / "tiny0")
    assert len(a) == len(b) == 4 * (4 + 6)
    assert [s["prediction"] for s in a] == [s["prediction"] for s in b]
    for x, y in zip(a, b):
        assert x["context"] == y["context"] and x["loglik"] == pytest.approx(y["loglik"], abs=1e-4)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("config", "date", "total_evaluation_time_seconds")}  # noqa: E731
    assert strip(one["models"][0]["results"]) == strip(many["models"][0]["results"])


@pytest.fixture(scope="module")
def two_models_run(models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval_two")
    heldout = out / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in (
                "Aspirin irreversibly inhibits cyclooxygenase.",
                "Metformin lowers hepatic glucose output.",
                "Statins inhibit HMG-CoA reductase and lower LDL cholesterol.",
            )
        )
    )
    cfg = config(
        out,
        models,
        limit=5,
        tasks=["pubmedqa", "medqa_4options", "mmlu_medical", {"task": "heldout", "perplexity": {"path": str(heldout)}}],
    )
    return out, evaluate(cfg)


def test_results_json_follows_lm_eval(two_models_run):
    out, summary = two_models_run
    results = json.loads((out / "tiny0" / "results.json").read_text())
    assert results == summary["models"][0]["results"]
    assert list(results["results"]) == ["pubmedqa", "medqa_4options", "mmlu_medical", *MMLU, "heldout"]
    pubmedqa = results["results"]["pubmedqa"]
    assert pubmedqa["alias"] == "pubmedqa" and results["results"]["mmlu_anatomy"]["alias"] == "anatomy"
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert {f"{metric},none", f"{metric}_stderr,none", f"{metric}_bootstrap_stderr,none"} <= set(pubmedqa)
    group = results["groups"]["mmlu_medical"]
    assert group["acc,none"] == pytest.approx(sum(results["results"][t]["acc,none"] for t in MMLU) / 6)  # equal sizes
    assert results["group_subtasks"]["mmlu_medical"] == MMLU and results["group_subtasks"]["pubmedqa"] == []
    assert results["n-samples"]["pubmedqa"] == {"original": 500, "effective": 5}
    assert results["n-samples"]["heldout"] == {"original": 3, "effective": 3}
    assert results["n-shot"]["pubmedqa"] == 0 and results["versions"]["mmlu_medical"] == 1
    assert results["higher_is_better"]["heldout"]["word_perplexity"] is False
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(results["results"]["heldout"])
    assert results["configs"]["pubmedqa"]["prompt_style"] == "lm_eval"
    assert results["config"]["model_args"] == f"pretrained={summary['models'][0]['path']}"
    assert len(results["config"]["model_files_hash"]) == 32
    from lm_eval.utils import make_table  # lm-eval's own table reads our file

    assert "| - professional_medicine|" in make_table(results) and "|mmlu_medical|" in make_table(results, "groups")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["stage"] == "eval"
        and manifest["details"]["models"]["tiny1"]["model_files_hash"]
        == summary["models"][1]["results"]["config"]["model_files_hash"]
    )


def test_samples_record_every_question(two_models_run):
    out, _ = two_models_run
    lines = samples(out / "tiny1")
    assert len(lines) == 5 + 5 + 6 * 5
    first = lines[0]
    assert first["task"] == "pubmedqa" and first["continuations"] == [" yes", " no", " maybe"]
    assert first["context"].startswith("Abstract: ") and first["context"].endswith("\nAnswer:")
    assert len(first["loglik"]) == len(first["is_greedy"]) == len(first["tokens"]) == 3
    assert first["prediction"]["acc"] == max(range(3), key=lambda i: first["loglik"][i])
    assert first["correct"]["acc"] == (first["prediction"]["acc"] == first["target"])


def test_reports_compare_models_side_by_side(two_models_run):
    out, summary = two_models_run
    assert summary["table"]["header"] == ["Model", "PubMedQA", "MedQA (4 opt.)", "MMLU-medical", "heldout", "Avg"]
    assert [row[0] for row in summary["table"]["rows"]] == ["tiny0", "tiny1"]
    report = (out / "results.md").read_text()
    assert "| Model | PubMedQA | MedQA (4 opt.) | MMLU-medical | heldout | Avg |" in report
    assert "(word perplexity)" in report and "[tiny1](tiny1/results.md)" in report
    detail = (out / "tiny0" / "results.md").read_text()
    assert "| pubmedqa | 1 | 5 | 0 | acc |" in detail and "|  |  |  |  | acc_norm |" in detail
    assert "|   - anatomy | 1 | 5 | 0 | acc |" in detail
    assert "acc_norm: log-likelihood divided by the choice's length in characters" in detail


def test_a_rerun_reuses_finished_tasks(models, tmp_path, monkeypatch):
    import medfoundry.eval.loglik as loglik
    import medfoundry.model.load as model

    cfg = config(tmp_path, models[:1], tasks=["pubmedqa", "mmlu_anatomy"], limit=3)
    first = evaluate(cfg)["models"][0]["results"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every task is cached")

    monkeypatch.setattr(model, "load_model", no_model)
    again = evaluate(cfg.model_copy(update={"batch_size": 2, "bootstrap_iters": 50}))["models"][0]["results"]
    assert again["results"]["pubmedqa"]["acc,none"] == first["results"]["pubmedqa"]["acc,none"]
    monkeypatch.undo()

    calls = []
    real = loglik.score_requests
    monkeypatch.setattr(
        loglik, "score_requests", lambda lm, requests, **kw: calls.append(len(requests)) or real(lm, requests, **kw)
    )
    (tmp_path / "tiny0" / "cache" / "mmlu_anatomy.json").unlink()  # as if the run had been killed during this task
    evaluate(cfg)
    assert calls == [3]
    evaluate(cfg.model_copy(update={"prompt_style": "meditron"}))  # other prompts: both tasks run again
    assert calls == [3, 3, 3]


def test_fewshot_source_is_reported(models, tmp_path):
    cfg = config(
        tmp_path,
        models[:1],
        tasks=["medqa_4options"],
        limit=2,
        num_fewshot=1,
        fewshot_source="mmlu_professional_medicine:dev",
    )
    results = evaluate(cfg)["models"][0]["results"]
    note = "1-shot demonstrations from mmlu_professional_medicine:dev, not medqa_4options's own"
    assert results["notes"]["medqa_4options"][0].startswith(note)
    assert results["configs"]["medqa_4options"]["fewshot"] == {
        "source": "mmlu_professional_medicine:dev",
        "sampler": "first_n",  # the lender's (MMLU's)
        "seed": 1234,
    }
    assert note in (tmp_path / "tiny0" / "results.md").read_text()

    drawn = evaluate(cfg.model_copy(update={"fewshot_sampler": "per_question", "output_dir": str(tmp_path / "pq")}))
    results = drawn["models"][0]["results"]
    assert results["configs"]["medqa_4options"]["fewshot"]["sampler"] == "per_question"
    assert results["notes"]["medqa_4options"][0].endswith("(fewshot.sampler per_question), not lm-eval's draws")


def test_chain_of_thought_with_self_consistency(models, tmp_path):
    generation = {"max_tokens": 6, "temperature": 0.9, "samples": 3}
    runs = [
        evaluate(
            config(
                tmp_path / f"b{b}",
                models[:1],
                tasks=["pubmedqa", "medqa_4options"],
                limit=3,
                mode="cot",
                prompt_style="meditron",
                generation=generation,
                batch_size=b,
            )
        )
        for b in (1, 4)
    ]
    a, b = samples(tmp_path / "b1" / "tiny0"), samples(tmp_path / "b4" / "tiny0")
    assert [s["completions"] for s in a] == [s["completions"] for s in b]
    assert all(len(s["completions"]) == 3 == len(s["answers"]) for s in a)
    assert a[0]["prompt"].endswith("\nLet’s think step by step.\n") and a[3]["prompt"].endswith(
        "\nLet's think step by step.\n"
    )
    results = runs[0]["models"][0]["results"]
    assert {"acc,none", "unparsed,none", "unparsed_stderr,none"} <= set(results["results"]["pubmedqa"])
    assert results["higher_is_better"]["pubmedqa"] == {"acc": True, "unparsed": False}
    assert results["config"]["gen_kwargs"]["samples"] == 3


def test_chat_template_for_fine_tuned_models(models, tmp_path):
    chat = shutil.copytree(models[0], tmp_path / "chat")
    settings = json.loads((chat / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    (chat / "tokenizer_config.json").write_text(json.dumps(settings))
    for choice, out in (("auto", "templated"), ("none", "plain")):
        evaluate(
            config(tmp_path / out, [chat], limit=1, mode="cot", chat_template=choice, generation={"max_tokens": 3})
        )
    templated, plain = samples(tmp_path / "templated" / "chat")[0], samples(tmp_path / "plain" / "chat")[0]
    assert templated["prompt"] == f"<|user|>{plain['prompt']}<|assistant|>"
    assert plain["prompt"].endswith("\nAnswer: Let's think step by step.")


def test_perplexity_on_a_corpus_and_on_its_token_shards(models, tmp_path):
    from medfoundry.tokenizer.shards import tokenize_corpus
    from test_tokenizer_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus", 4, 4)
    tokenize_corpus(corpus, shared("tokenizers/gpt2"), tmp_path / "tokens", workers=1)
    tasks = [
        {"task": "text", "perplexity": {"path": str(corpus)}},
        {"task": "shards", "perplexity": {"path": str(tmp_path / "tokens"), "split": "val"}},
    ]
    results = evaluate(config(tmp_path / "out", models[:1], tasks=tasks))["models"][0]["results"]
    text, shards = results["configs"]["text"]["totals"], results["configs"]["shards"]["totals"]
    assert text["documents"] == shards["documents"] == 4 and text["tokens"] == shards["tokens"]
    assert results["results"]["shards"]["token_perplexity,none"] == pytest.approx(
        results["results"]["text"]["token_perplexity,none"], rel=1e-4
    )


def test_generate_stops_and_seeds_per_prompt(models):
    from medfoundry.eval.generate import Generator
    from medfoundry.generation.config import SamplingConfig
    from medfoundry.model.load import load_model

    lm = load_model(models[0], precision="fp32", threads=1)
    generate = Generator(lm)
    prompts = ["Question: Which enzyme does aspirin inhibit?\nAnswer:", "The patient presented with"]
    greedy = generate(prompts, SamplingConfig(max_tokens=8), n=2)
    assert all(len(texts) == 2 and texts[0] == texts[1] for texts in greedy)
    text = greedy[0][0]
    stop = text[3:6]
    assert generate(prompts[:1], SamplingConfig(max_tokens=8, stop=[stop])) == [[text[: text.find(stop)]]]
    sampling = SamplingConfig(max_tokens=6, temperature=1.0)
    sampled = Generator(lm, batch_size=1)(prompts, sampling, n=3, seed=7)
    assert Generator(lm, batch_size=6)(prompts[::-1], sampling, n=3, seed=7) == sampled[::-1]
    assert generate(prompts, sampling, n=3, seed=8) != sampled


def test_one_engine_serves_every_call_until_a_row_needs_more(models, monkeypatch):
    """An evaluation's tasks share the generator's engine (a compiled step compiles once per run); a call whose
    prompt and new tokens do not fit its rows gets a longer one, with the completions a fresh one gives."""
    from medfoundry.eval.generate import Generator
    from medfoundry.generation.compiled import compile_pays_on_cpu
    from medfoundry.generation.config import SamplingConfig
    from medfoundry.model.load import load_model

    monkeypatch.setattr("medfoundry.generation.engine.DEFAULT_MAX_SEQ_LEN", 16)  # rows of 16 tokens by default
    lm = load_model(models[0], precision="fp32", threads=1)
    generate, greedy = Generator(lm), SamplingConfig(max_tokens=4)
    first = generate(["The patient presented with"], greedy)
    engine = generate.engine
    assert generate(["Aspirin inhibits"], greedy) and generate.engine is engine
    assert engine.max_seq_len == 16 and not engine.compiled  # too little to generate to earn a compile on a CPU
    long = ["The patient presented with fever, cough and shortness of breath after a week of travel abroad."]
    assert generate(long, greedy) == Generator(lm)(long, greedy)
    assert generate.engine is not engine and generate.engine.max_seq_len == len(lm.tokenizer(long[0]).input_ids) + 4
    assert generate(["The patient presented with"], greedy) == first
    assert not compile_pays_on_cpu(135_000_000, 6_400) and compile_pays_on_cpu(135_000_000, 32_000)


def test_greedy_chain_of_thought_ignores_the_checkpoints_generation_defaults(models, tmp_path):
    """Every sampling choice is the eval config's: a generation_config.json that asks for sampling, penalties or a
    shorter length changes nothing (only its end-of-sequence tokens count)."""
    from medfoundry.eval.generate import Generator
    from medfoundry.generation.config import SamplingConfig
    from medfoundry.model.load import load_model

    tuned = shutil.copytree(models[0], tmp_path / "tuned")
    settings_path = tuned / "generation_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    settings.update(
        do_sample=True, temperature=0.3, top_k=2, top_p=0.5, repetition_penalty=5.0, max_new_tokens=1, num_beams=2
    )
    settings_path.write_text(json.dumps(settings))
    prompts = ["Question: Which enzyme does aspirin inhibit?\nAnswer:", "The patient presented with"]
    greedy = SamplingConfig(max_tokens=8)
    plain = Generator(load_model(models[0], precision="fp32", threads=1))(prompts, greedy)
    assert Generator(load_model(tuned, precision="fp32", threads=1))(prompts, greedy) == plain
    assert all(len(texts[0]) > 1 for texts in plain)
