"""The card's Markdown sections, each a function of the run returning its lines.

Every sentence states something the artifacts show, or says plainly that the run did not produce it.
"""

from __future__ import annotations

import math
import os
import platform
from importlib import metadata
from pathlib import Path

from medfoundry import __version__
from medfoundry.card import text
from medfoundry.card.artifacts import Run, Training
from medfoundry.card.front_matter import languages, task_mode, task_title
from medfoundry.manifest import Manifest

# ---------------------------------------------------------------------------------------------- formatting


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def exact(value) -> str:
    """A config value as written (floats in their shortest exact form), so the card can be checked against run.json."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(exact(v) for v in value)
    return str(value)


def measured(value, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "not finite"
    return f"{value:,.{digits}f}"


def share(value: float) -> str:
    return f"{100 * value:.2f}%"


def code(value) -> str:
    return f"`{value}`"


# ---------------------------------------------------------------------------------------------- opening


def origin(training: Training, run: Run) -> str:
    """How the stage's model began: from scratch, or from which checkpoint."""
    start = training.config["model"].get("init_from")
    if start is None:
        return "pretrained from scratch (random initialization) by this run"
    if run.pretrain is not None and training.stage == "finetune" and Path(start).parts[-2:] == ("pretrain", "model"):
        source = "the model this run pretrained"
    else:
        source = code(start)
    return f"{'fine-tuned' if training.stage == 'finetune' else 'continued-pretrained'} from {source}"


def summary_sentence(run: Run) -> str:
    model = run.model
    size = (
        f"A {model.parameters:,}-parameter {model.config.get('model_type', 'transformer')} language model"
        if model
        else "A language model"
    )
    if run.final is None:
        return f"{size} evaluated (not trained) by this run: {code(run.model_path)}."
    steps = "; ".join(origin(t, run) for t in run.trainings)
    return f"{size}, {steps}. Made with medfoundry {run.final.manifest.medfoundry_version}."


def opening(run: Run) -> list[str]:
    description = run.card.description or run.recipe.get("description")
    return [
        f"# {run.name}",
        "",
        *([description.strip(), ""] if description else []),
        summary_sentence(run),
        "",
        f"File paths in this card are relative to the run directory {code(run.dir)} unless absolute.",
    ]


# ---------------------------------------------------------------------------------------------- model details


def architecture_rows(run: Run) -> list[list[str]]:
    model = run.model
    context = model.field("max_position_embeddings", "n_positions", "seq_length")
    if context is None and run.final is not None:  # BLOOM (ALiBi) has no position limit: the trained length
        context = run.final.config.get("model", {}).get("context") or run.final.config.get("data", {}).get("max_length")
    rows = [
        ["Architecture", (model.config.get("architectures") or [None])[0]],
        ["Model type", model.config.get("model_type")],
        ["Layers", model.field("num_hidden_layers", "n_layer")],
        ["Hidden size", model.field("hidden_size", "n_embd", "d_model")],
        ["Attention heads", model.field("num_attention_heads", "n_head")],
        ["Key/value heads", model.field("num_key_value_heads")],
        ["Feed-forward size", model.field("intermediate_size", "n_inner")],
        ["Vocabulary", model.field("vocab_size")],
        ["Context length (tokens)", context],
        ["Parameters", model.parameters],
    ]
    return [[label, exact(value)] for label, value in rows if value is not None]


def fertility_lines(run: Run) -> list[str]:
    fertility, manifest = run.fertility, run.tokenizer
    tokenizers = fertility["tokenizers"]
    ours = tokenizers["medfoundry"]["tokens_per_word"]
    counts = manifest.counts
    lines = [
        f"A byte-level BPE of {counts['vocab_size']:,} tokens trained by this run on the corpus's train split "
        f"({counts['training_documents']:,} documents, {counts['training_characters']:,} characters), "
        f"pre-tokenizer {code(manifest.config.get('pretokenizer'))}. On the corpus's validation split "
        f"({fertility['documents']:,} documents, {fertility['words']:,} words) it needs {ours:.3f} tokens per word"
    ]
    comparisons = []
    for name, ref in tokenizers.items():
        if name != "medfoundry":
            change = 1 - ours / ref["tokens_per_word"]
            comparisons.append(
                f"{abs(change):.1%} {'fewer' if change >= 0 else 'more'} than {name} ({ref['tokens_per_word']:.3f})"
            )
    lines[0] += (", " + "; ".join(comparisons) if comparisons else "") + " (`tokenizer/fertility.md`)."
    rows = [
        [name, f"{t['tokens_per_word']:.3f}", f"{t['chars_per_token']:.3f}", share(t["split_word_share"])]
        for name, t in tokenizers.items()
    ]
    return [*lines, "", *table(["tokenizer", "tokens per word", "characters per token", "words split in pieces"], rows)]


def tokenizer_lines(run: Run) -> list[str]:
    if run.fertility is not None:
        lines = fertility_lines(run)
    elif run.pretrain is not None:
        lines = [f"The tokenizer of {code(run.pretrain.config['data']['tokenizer_dir'])}; this run trained none."]
    elif run.finetune is not None:
        lines = ["The base model's tokenizer; this run trained none."]
    else:
        lines = ["The evaluated model's own tokenizer; this run trained none."]
    if run.finetune is not None:
        tok = run.finetune.data.details["tokenizer"]
        added = len(tok.get("added_ids") or [])
        lines += [
            "",
            f"Fine-tuning used the {code(tok['template'])} chat template"
            f"{f', which added {added:,} tokens' if added else ''}, end of turn {code(tok['eos_token'])}; "
            f"the fine-tuned vocabulary has {tok['vocab_size']:,} tokens.",
        ]
    if run.model is not None and run.model.chat_template:
        lines += ["", "The tokenizer carries a chat template (`apply_chat_template` works; see *How to load*)."]
    return lines


DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def precision_lines(run: Run) -> list[str]:
    model = run.model
    stored = ", ".join(DTYPES.get(d, d) for d in model.weight_dtypes)
    line = f"Weights are stored as {stored} (safetensors)."
    for t in run.trainings:
        mixed = "bf16 autocast with fp32 master weights" if t.run["precision"] == "bf16" else "fp32 throughout"
        setting = code(t.config["training"]["precision"])
        line += f" {t.stage.capitalize()}: {mixed} on {code(t.run['device'])} (setting {setting})."
    return [line]


def model_details(run: Run) -> list[str]:
    lines = ["## Model details", ""]
    if run.model is None:
        return lines + [
            f"The evaluated model {code(run.model_path)} is not a Hugging Face model directory (for example "
            "a GGUF file), so its architecture is not described here."
        ]
    license_text = code(run.card.license) if run.card.license else "not declared (the card section sets no `license`)"
    bullets = [
        ("Model type", f"decoder-only transformer language model ({code(run.model.config.get('model_type'))})"),
        ("Parameters", f"{run.model.parameters:,}"),
        ("Developed by", run.card.developers),
        ("Training", "; ".join(origin(t, run) for t in run.trainings) or "not trained by this run"),
        ("Base model", code(run.card.base_model) if run.card.base_model else None),
        ("Language(s)", ", ".join(languages(run))),
        ("License", license_text),
        ("Model files", code(run.model_path)),
    ]
    lines += [f"- **{label}:** {value}" for label, value in bullets if value]
    lines += ["", "### Architecture", "", *table(["property", "value"], architecture_rows(run))]
    lines += ["", "### Tokenizer", "", *tokenizer_lines(run), "", "### Precision", "", *precision_lines(run)]
    return lines


# ---------------------------------------------------------------------------------------------- uses and risks


def uses(run: Run) -> list[str]:
    chat = run.model is not None and run.model.chat_template
    stage = run.final.stage if run.final is not None else "finetune" if chat else "pretrain"
    extra = [f"- {run.card.out_of_scope_uses.strip()}"] if run.card.out_of_scope_uses else []
    return [
        "## Uses",
        "",
        "### Direct use",
        "",
        (run.card.intended_uses or text.DIRECT_USE).strip(),
        "",
        "### Downstream use",
        "",
        text.DOWNSTREAM_USE[stage],
        "",
        "### Out-of-scope use",
        "",
        *(f"- {item}" for item in text.OUT_OF_SCOPE),
        *extra,
    ]


def corpus_contamination(corpus: Manifest) -> str:
    checked = corpus.details["decontamination"]
    if not checked:
        return (
            "**Evaluation overlap (pretraining).** The pretraining corpus was not checked against evaluation sets "
            "(decontamination disabled), so benchmark test items may be in its training text."
        )
    removed = sum(
        n
        for reason, counts in corpus.details["dropped"].items()
        if reason.startswith("decontaminate/")
        for n in counts.values()
    )
    sets = ", ".join(f"{name} ({b['items']:,} items)" for name, b in checked["benchmarks"].items())
    return (
        f"**Evaluation overlap (pretraining).** The pretraining corpus was decontaminated against {sets} by "
        f"{checked['ngram']}-gram overlap and PubMedQA test PMIDs: {removed:,} documents removed. Benchmarks "
        "not listed were not checked."
    )


def finetune_contamination(data: Manifest) -> str:
    overlap = data.details["overlap"]
    if not overlap.get("checked"):
        return (
            "**Evaluation overlap (fine-tuning).** The fine-tuning data were not checked for overlap with "
            "evaluation test items (no benchmarks folder was given and test overlap was allowed)."
        )
    sets = ", ".join(overlap["index"]["benchmarks"])
    return (
        f"**Evaluation overlap (fine-tuning).** The fine-tuning data were checked against the test items of "
        f"{sets}: {overlap['overlapping']:,} of {overlap['records']:,} records overlapped (action: "
        f"{overlap['action']})."
    )


def risks(run: Run) -> list[str]:
    found = []
    if run.corpus is not None:
        found.append(corpus_contamination(run.corpus))
    if run.finetune is not None:
        found.append(finetune_contamination(run.finetune.data))
    if run.card.limitations:
        found.append(run.card.limitations.strip())
    return [
        "## Bias, risks and limitations",
        "",
        *(f"- {item}" for item in [*text.RISKS, *found]),
        "",
        "### Recommendations",
        "",
        "Check every generated statement against primary sources; keep a qualified professional between the model "
        "and any decision about a patient; evaluate on data from the intended setting, subgroups included, "
        "before relying on the model there.",
    ]


# ---------------------------------------------------------------------------------------------- training data


def corpus_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    corpus = run.corpus.details
    train = corpus["per_source"].get("train", {})
    run_tokens = run.tokens.details["source_tokens"].get("train") if run.tokens is not None else None
    sources = {s["name"]: s for s in run.corpus.config["sources"]}
    header = ["source", "kind", "documents", "characters", "tokens", "share of train characters", "requested share"]
    rows = []
    for name, mix in corpus["mixture"].items():
        stats = train.get(name, {})
        tokens = run_tokens.get(name, 0) if run_tokens is not None else stats.get("tokens")
        requested = share(mix["requested_share"]) if mix.get("requested_share") is not None else "whole source"
        rows.append(
            [
                name,
                sources.get(name, {}).get("kind", ""),
                f"{stats.get('docs', 0):,}",
                f"{stats.get('chars', 0):,}",
                f"{tokens:,}" if tokens is not None else "not counted",
                share(mix["achieved_share"]),
                requested,
            ]
        )
    return header, rows


def corpus_lines(run: Run) -> list[str]:
    corpus, counts = run.corpus.details, run.corpus.counts
    lines = [
        f"Built by this run (`medfoundry corpus build`, `corpus/report.md`): {counts['documents_in']:,} documents "
        f"read, {counts['documents_train']:,} train and {counts['documents_val']:,} validation documents kept, "
        "mixed by source weight.",
        "",
    ]
    header, rows = corpus_rows(run)
    counted = (
        "this run's tokenizer (`tokens/manifest.json`)"
        if run.tokens is not None
        else f"the report tokenizer {code(run.corpus.config.get('report_tokenizer'))}"
    )
    lines += [*table(header, rows), "", f"Tokens are counted with {counted}."]
    replay = {name: mix for name, mix in corpus["mixture"].items() if "replay" in name}
    for name, mix in replay.items():
        asked = f" (requested {share(mix['requested_share'])})" if mix.get("requested_share") is not None else ""
        lines.append(
            f"General-domain replay ({code(name)}): {share(mix['achieved_share'])} of train characters{asked}."
        )
    dropped = [
        f"{sum(counts.values()):,} {reason.replace('/', ': ').replace('_', ' ')}"
        for reason, counts in corpus["dropped"].items()
    ]
    lines.append(
        f"Left out while building (stage: reason): {'; '.join(dropped)}."
        if dropped
        else "No document was left out while building."
    )
    return lines


def tokens_lines(run: Run) -> list[str]:
    counts = run.tokens.counts
    splits = ", ".join(
        f"{counts[f'{name}_tokens']:,} {name} tokens ({counts[f'{name}_documents']:,} documents)"
        for name in run.tokens.outputs
    )
    corpus = run.tokens.config["corpus_dir"]
    where = "" if run.corpus is not None else f", from a corpus built outside this run ({code(corpus)})"
    return [f"Token shards (`tokens/manifest.json`){where}: {splits}, stored as {run.tokens.details['dtype']}."]


def pretraining_data(run: Run) -> list[str]:
    lines = ["### Pretraining corpus", ""]
    if run.corpus is not None:
        lines += [*corpus_lines(run), ""]
    if run.tokens is not None:
        lines += tokens_lines(run)
    elif run.pretrain is not None and run.corpus is None:
        tokens_dir = code(run.pretrain.config["data"]["tokens_dir"])
        lines.append(
            f"The pretraining tokens were prepared outside this run ({tokens_dir}); their composition is not "
            "recorded in it."
        )
    if run.corpus is None and run.tokens is None and run.pretrain is None:
        lines.append("This run did no pretraining: the fine-tuned model's base was pretrained elsewhere.")
    return lines


def finetuning_data(run: Run) -> list[str]:
    lines = ["### Fine-tuning data", ""]
    if run.finetune is None:
        return lines + ["This model was not fine-tuned by this run."]
    data = run.finetune.data.details
    config = {s["name"]: s for s in run.finetune.data.config["sources"]}
    stats = data["source_stats"]
    rows = []
    for name, mix in data["mixture"]["sources"].items():
        source = config.get(name, {})
        kind = (
            f"{source['converter']} converter" if source.get("converter") else f"file {code(Path(source['path']).name)}"
        )
        requested = share(mix["requested_share"]) if mix.get("requested_share") is not None else "whole source"
        rows.append(
            [
                name,
                kind,
                f"{stats[name]['records']:,}",
                f"{mix['examples']:,}",
                f"{stats[name]['val_records']:,}",
                requested,
                share(mix["share_examples"]),
                share(mix["share_response_tokens"]),
                f"{mix['epochs']:.2f}",
            ]
        )
    template = data["tokenizer"]["template"]
    train = data["splits"]["train"]
    packed = ", packed" if data["packing"] else ""
    return lines + [
        f"Prepared by `medfoundry finetune` (`{run.relative(run.finetune.data_dir / 'report.md')}`): "
        f"{train['examples']:,} training examples, {train['response_tokens']:,} response tokens, {code(template)} "
        f"chat template, sequences of up to {data['max_length']:,} tokens{packed}. The mixture is by "
        f"{data['mixture']['by'].replace('_', ' ')}.",
        "",
        *table(
            [
                "source",
                "from",
                "records",
                "train examples",
                "validation records",
                "requested share",
                "achieved share (examples)",
                "achieved share (response tokens)",
                "epochs",
            ],
            rows,
        ),
    ]


def training_data(run: Run) -> list[str]:
    if not run.trainings and run.corpus is None and run.tokens is None:
        return [
            "## Training data",
            "",
            "This run trained no model, so it records no training data; the evaluated "
            "model's own documentation describes what it was trained on.",
        ]
    return ["## Training data", "", *pretraining_data(run), "", *finetuning_data(run)]


# ---------------------------------------------------------------------------------------------- training procedure


def hyperparameters(training: Training) -> list[list[str]]:
    """The hyperparameter table: every value read from run.json."""
    run, cfg = training.run, training.config
    t, optim, schedule = cfg["training"], cfg["optim"], cfg["schedule"]
    context = cfg["model"].get("context") if training.stage == "pretrain" else cfg["data"]["max_length"]
    rows = [
        ("Initialized from", cfg["model"].get("init_from") or "random initialization"),
        ("Model preset", None if cfg["model"].get("init_from") else cfg["model"].get("preset")),
        ("Optimizer steps", run.get("steps", t["steps"])),
        ("Epochs", t.get("epochs")),
        ("Micro-batch size (sequences per process)", t["micro_batch_size"]),
        ("Global batch size (sequences)", t["global_batch_size"]),
        ("Gradient accumulation", run.get("grad_accumulation")),
        ("Context length (tokens)", context),
        ("Tokens seen", tokens_seen(training)),
        ("Optimizer", "AdamW (decoupled weight decay; none on norms, biases and embeddings)"),
        ("Peak learning rate", optim["lr"]),
        ("Schedule", schedule["kind"]),
        ("Warmup steps", schedule["warmup_steps"]),
        (
            "Minimum learning rate (fraction of peak)",
            schedule["min_lr_ratio"] if schedule["kind"] != "constant" else None,
        ),
        ("Decay fraction", schedule["decay_fraction"] if schedule["kind"] == "wsd" else None),
        ("AdamW betas", optim["betas"]),
        ("AdamW epsilon", optim["eps"]),
        ("Weight decay", optim["weight_decay"]),
        ("Gradient clipping (max norm)", optim["grad_clip"]),
        ("Precision", run["precision"]),
        ("Processes (world size)", run["world_size"]),
        ("Device", run["device"]),
        ("Distributed strategy", cfg["distributed"]["strategy"] if run["world_size"] > 1 else None),
        ("Activation checkpointing", t.get("activation_checkpointing")),
        ("torch.compile", t.get("compile")),
        *((f"Kernel: {name}", kernel) for name, kernel in (run.get("kernels") or {}).items()),
        ("Seed", t.get("seed")),
        *lora_rows(cfg.get("lora")),
    ]
    return [[label, exact(value)] for label, value in rows if value is not None]


def lora_rows(lora: dict | None) -> list[tuple[str, object]]:
    if not lora:
        return []
    return [
        ("LoRA rank", lora["r"]),
        ("LoRA alpha", lora["alpha"]),
        ("LoRA dropout", lora["dropout"]),
        ("LoRA target modules", lora["target_modules"]),
        ("LoRA merged into the weights", lora["merge"]),
    ]


def tokens_seen(training: Training) -> int | None:
    """From summary.json; a pretraining run too short to log a step after the first reads whole windows, so
    steps x global batch x context is exact."""
    if training.summary.get("tokens") is not None:
        return training.summary["tokens"]
    if training.stage == "pretrain":
        t = training.config["training"]
        return training.run.get("steps", t["steps"]) * t["global_batch_size"] * training.config["model"]["context"]
    return None


def result_lines(training: Training, run: Run) -> list[str]:
    s = training.summary
    logged = [r for r in training.metrics if "loss" in r]
    lines = []
    if logged:
        speed = f"; median {s['median_tok_s']:,.0f} tokens/s" if "median_tok_s" in s else ""
        lines.append(
            f"Training loss {measured(logged[-1]['loss'])} at step {logged[-1]['step']:,} of "
            f"{s.get('steps', 0):,} (the last logged){speed}."
        )
    if "val_loss" in s:
        on = " on response tokens" if training.stage == "finetune" else ""
        line = (
            f"Validation loss{on} {measured(s.get('initial_val_loss'))} before training, "
            f"{measured(s['val_loss'])} after"
        )
        if "val_ppl" in s:
            line += f" (perplexity {measured(s.get('initial_val_ppl'), 2)} -> {measured(s['val_ppl'], 2)})"
        if "val_bpb" in s:
            line += f"; {measured(s['val_bpb'])} bits per byte"
        lines.append(line + ".")
    else:
        lines.append("No validation split was held out, so no validation loss was measured.")
    lines.append(
        f"Every logged step is in `{run.relative(training.dir / 'metrics.jsonl')}`; the loss curves in "
        f"`{run.relative(training.dir / 'plots' / 'loss.png')}`."
    )
    return lines


def objective(training: Training) -> str:
    if training.stage == "pretrain":
        return (
            "Causal language modelling (next-token cross-entropy) on contiguous windows of the token shards, "
            "documents separated by an end-of-text token."
        )
    return (
        "Supervised fine-tuning: next-token cross-entropy on the assistant's response tokens only (prompt tokens "
        "masked), examples packed without attention across them."
        if training.data.details["packing"]
        else "Supervised fine-tuning: next-token cross-entropy on the assistant's response tokens only (prompt tokens "
        "masked)."
    )


def training_procedure(run: Run) -> list[str]:
    lines = ["## Training procedure"]
    if not run.trainings:
        return lines + ["", f"This run trained no model: it evaluated {code(run.model_path)}."]
    for training in run.trainings:
        title = "Pretraining" if training.stage == "pretrain" else "Fine-tuning"
        lines += [
            "",
            f"### {title}",
            "",
            objective(training),
            "",
            "#### Hyperparameters",
            "",
            *table(["hyperparameter", "value"], hyperparameters(training)),
            "",
            "#### Results",
            "",
            *result_lines(training, run),
        ]
    return lines


# ---------------------------------------------------------------------------------------------- evaluation


def with_stderr(metrics: dict, metric: str) -> str:
    value, stderr = metrics.get(f"{metric},none"), metrics.get(f"{metric}_stderr,none")
    if value is None:
        return "–"
    return measured(value) + (f" ± {measured(stderr)}" if isinstance(stderr, (int, float)) else "")


def choice_table(results: dict) -> list[str]:
    """One row per multiple-choice task or group: each metric with lm-eval's standard error."""
    names = [n for n in results["results"] if task_mode(results, n) != "perplexity"]
    if not names:
        return ["No multiple-choice benchmark was evaluated."]
    metrics = []
    for name in names:
        for key in results["results"][name]:
            metric = key.partition(",")[0]
            if key != "alias" and "_stderr" not in metric and metric not in metrics:
                metrics.append(metric)
    rows = []
    for name in names:
        members = results["group_subtasks"].get(name) or [name]
        n = sum(results["n-samples"][m]["effective"] for m in members)
        rows.append(
            [
                task_title(results, name),
                task_mode(results, name),
                f"{n:,}",
                str(results["n-shot"].get(name, 0)),
                *(with_stderr(results["results"][name], m) for m in metrics),
            ]
        )
    return table(["task", "mode", "questions", "few-shot", *metrics], rows)


def perplexity_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, metrics in results["results"].items():
        if name in results["configs"] and task_mode(results, name) == "perplexity":
            totals = results["configs"][name]["totals"]
            rows.append(
                [
                    task_title(results, name),
                    f"{totals['documents']:,}",
                    f"{totals['tokens']:,}",
                    measured(metrics.get("word_perplexity,none"), 2),
                    measured(metrics.get("byte_perplexity,none")),
                    measured(metrics.get("bits_per_byte,none")),
                ]
            )
    return rows


def evaluation_setup(run: Run, results: dict) -> str:
    config = results["config"]
    limit = f"the first {config['limit']:,} questions of each task" if config.get("limit") else "every test question"
    return (
        f"`medfoundry eval` (`{run.relative(run.eval.dir / 'results.md')}`, "
        f"`{run.relative(run.eval.dir / run.eval.model / 'results.json')}`; lm-eval-compatible scoring) "
        f"on {limit}, prompt style {code(config['prompt_style'])}, {config['precision']} on {code(config['device'])}. "
        "acc: the choice with the highest log-likelihood (or the answer of a chain of thought); acc_norm: "
        "log-likelihood per character of the choice; acc_bytes: per UTF-8 byte; ± lm-eval's standard error."
    )


def baseline_rows(run: Run) -> list[list[str]]:
    """Each evaluated model's accuracy per task (the run's model first), when the eval compared several."""
    names = [run.eval.model, *(n for n in run.eval.results if n != run.eval.model)]
    tasks = [n for n, m in run.eval.results[run.eval.model]["results"].items() if isinstance(m.get("acc,none"), float)]
    rows = []
    for name in names:
        results = run.eval.results[name]["results"]
        rows.append(
            [
                name + (" (this model)" if name == run.eval.model else ""),
                *(measured(results.get(t, {}).get("acc,none")) for t in tasks),
            ]
        )
    return [["model", *(task_title(run.eval.results[run.eval.model], t) for t in tasks)], *rows] if tasks else []


def evaluation(run: Run) -> list[str]:
    lines = ["## Evaluation", ""]
    results = run.model_results()
    if results is None:
        stage = "evaluated other models, not this one" if run.eval is not None else "has no evaluation stage"
        lines.append(f"This model was not evaluated on benchmarks by this run (it {stage}).")
    else:
        lines += [evaluation_setup(run, results), ""]
        lines += ["### Benchmarks", "", *choice_table(results)]
        ppl = perplexity_rows(results)
        lines += [
            "",
            "### Held-out perplexity",
            "",
            *(
                table(["text", "documents", "tokens", "word perplexity", "byte perplexity", "bits per byte"], ppl)
                if ppl
                else ["No held-out perplexity was measured by the eval stage."]
            ),
        ]
        comparison = baseline_rows(run) if len(run.eval.results) > 1 else []
        if comparison:
            lines += [
                "",
                "### Compared with the other evaluated models (accuracy)",
                "",
                *table(comparison[0], comparison[1:]),
            ]
    for t in run.trainings:
        if "val_ppl" in t.summary:
            lines += [
                "",
                f"Validation perplexity at the end of {t.stage} (the run's own validation split): "
                f"{measured(t.summary['val_ppl'], 2)}.",
            ]
    if run.samples is not None:
        lines += [
            "",
            f"`generate/samples.jsonl` holds the model's completions of {len(run.samples):,} prompt(s) "
            "(unreviewed; the prompts are the front matter's widget examples).",
        ]
    return lines


# ---------------------------------------------------------------------------------------------- environment


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names(run: Run) -> list[str]:
    if not any(t.run["device"].startswith("cuda") for t in run.trainings):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})


def machine(run: Run) -> str:
    if run.card.hardware:
        return f"Training hardware (card section): {run.card.hardware}."
    gpus = gpu_names(run)
    gpu = f", GPU {', '.join(gpus)}" if gpus else ""
    which = (
        " (the training machine when the card is written right after training, as `medfoundry run` does)"
        if run.trainings
        else ""
    )
    return (
        f"Machine that wrote this card{which}: {cpu_name()}, {os.cpu_count()} logical CPUs{gpu}, "
        f"{platform.system()} {platform.machine()}."
    )


def watts(training: Training, run: Run) -> tuple[float, str]:
    if run.card.power_watts is not None:
        return run.card.power_watts, "given in the card section"
    kind = training.run["device"].split(":")[0]
    value, basis = text.ASSUMED_WATTS.get(kind, text.ASSUMED_WATTS["cpu"])
    return value, f"assumed: {basis}"


def duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.2f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def energy(kwh: float) -> str:
    return f"{kwh:,.2f} kWh" if kwh >= 1 else f"{kwh * 1000:.3f} Wh"


def emissions(grams: float) -> str:
    return f"{grams / 1000:,.2f} kg" if grams >= 1000 else f"{grams:.3g} g"


def energy_rows(run: Run) -> list[list[str]]:
    rows = []
    for t in run.trainings:
        power, basis = watts(t, run)
        kwh = power * t.run["world_size"] * t.hours / 1000
        co2 = emissions(kwh * run.card.grid_intensity) if run.card.grid_intensity is not None else "not estimated"
        rows.append(
            [
                t.stage,
                f"{t.run['world_size']} x {code(t.run['device'])}",
                duration(t.hours),
                f"{power:g} W ({basis})",
                energy(kwh),
                co2,
            ]
        )
    return rows


def other_stage_hours(run: Run) -> list[str]:
    manifests = {"corpus": run.corpus, "tokenizer": run.tokenizer, "tokens": run.tokens}
    manifests["eval"] = run.eval.manifest if run.eval is not None else None
    seconds = {stage: m.timings["total_s"] for stage, m in manifests.items() if m is not None}
    return [f"{stage} {duration(s / 3600)}" for stage, s in seconds.items()]


def environmental_impact(run: Run) -> list[str]:
    lines = ["## Environmental impact", "", machine(run), ""]
    if not run.trainings:
        lines.append("This run trained no model, so it used no training compute.")
    else:
        lines += [
            *table(["stage", "hardware", "wall-clock", "power per process", "energy", "CO2eq"], energy_rows(run)),
            "",
            "Wall-clock runs from the first to the last record of the stage's `metrics.jsonl` (a pause before a "
            "resume included). Energy = power per process x processes x hours; it leaves out cooling and the "
            "rest of the machine.",
        ]
        lines.append(
            f"Emissions use a grid intensity of {run.card.grid_intensity:g} gCO2eq/kWh (card section)."
            if run.card.grid_intensity is not None
            else "Emissions are not estimated: the card section gives no grid carbon intensity (`grid_intensity`)."
        )
    others = other_stage_hours(run)
    if others:
        lines += ["", f"Other stages of this run, wall-clock: {', '.join(others)}."]
    return lines


# ------------------------------------------------------------------------------------------ technical specifications


def software_rows(run: Run) -> list[list[str]]:
    rows = [["medfoundry (this card)", __version__]]
    rows += [[f"medfoundry ({t.stage})", t.manifest.medfoundry_version] for t in run.trainings]
    for package in ("torch", "transformers", "tokenizers", "huggingface_hub"):
        try:
            rows.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            continue
    return rows + [["Python", platform.python_version()]]


def loading_snippet(run: Run) -> list[str]:
    path = run.card.repo_id or run.model_path
    lines = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
        f"model = AutoModelForCausalLM.from_pretrained({path!r})",
    ]
    if run.model is not None and run.model.chat_template:
        lines += [
            f"messages = [{{'role': 'user', 'content': {text.EXAMPLE_QUESTION!r}}}]",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
            "return_dict=True)",
            "output = model.generate(**inputs, max_new_tokens=128)",
            "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        ]
    else:
        prompt = run.samples[0]["prompt"] if run.samples else text.EXAMPLE_PROMPT
        lines += [
            f"inputs = tokenizer({prompt!r}, return_tensors='pt')",
            "output = model.generate(**inputs, max_new_tokens=40)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    return lines + [
        "```",
        "",
        f"With medfoundry: `medfoundry generate {path} PROMPT`, `medfoundry chat {path}`, or the "
        f"OpenAI-compatible `medfoundry serve {path}`.",
    ]


def technical_specifications(run: Run) -> list[str]:
    arch = run.model.config.get("model_type") if run.model is not None else None
    objective_text = (
        f"A decoder-only transformer ({code(arch)}) predicting the next token (causal language modelling)."
        if arch
        else "A causal language model (its architecture is not recorded in this run)."
    )
    return [
        "## Technical specifications",
        "",
        "### Model architecture and objective",
        "",
        objective_text,
        "",
        "### Compute infrastructure",
        "",
        "Hardware: see *Environmental impact*. Software:",
        "",
        *table(["software", "version"], software_rows(run)),
        "",
        "### How to load",
        "",
        *loading_snippet(run),
    ]


# ---------------------------------------------------------------------------------------------- citation


def seed_relevance(run: Run) -> dict[str, str]:
    """What this run shares with each seed model's method."""
    notes = {name: "the pipeline this run used is modelled on it" for name in text.SEEDS}
    if run.tokenizer is not None:
        notes["BioMedLM"] = "this run trained its own biomedical tokenizer, as BioMedLM did"
    continued = run.pretrain is not None and run.pretrain.config["model"].get("init_from")
    if continued:
        notes["BioMed-LLaMA"] = "this run continued pretraining an existing model on biomedical text"
    elif run.eval is not None:
        notes["BioMed-LLaMA"] = "this run's benchmark scoring (log-likelihood of each choice) follows its evaluation"
    if run.corpus is not None and any("replay" in name for name in run.corpus.details["mixture"]):
        notes["Meditron"] = "this run's corpus mixes general-domain replay into biomedical text (GAP-Replay)"
    elif run.finetune is not None and any(s.get("converter") for s in run.finetune.data.config["sources"]):
        converters = sorted({s["converter"] for s in run.finetune.data.config["sources"] if s.get("converter")})
        notes["Meditron"] = (
            f"this run fine-tuned on the training data of {', '.join(converters)}, as Meditron "
            "fine-tuned on its benchmarks' training sets"
        )
    return notes


def citation(run: Run) -> list[str]:
    lines = ["## Citation", ""]
    if run.card.citation:
        lines += ["### This model", "", "```bibtex", run.card.citation.strip(), "```", ""]
    lines += ["### Seed models", "", "medfoundry builds models the way these were built:", ""]
    relevance = seed_relevance(run)
    for name, (summary, _) in text.SEEDS.items():
        lines.append(f"- {summary} Here: {relevance[name]}.")
    return lines + ["", "```bibtex", "\n\n".join(bib for _, bib in text.SEEDS.values()), "```"]


SECTIONS = [
    model_details,
    uses,
    risks,
    training_data,
    training_procedure,
    evaluation,
    environmental_impact,
    technical_specifications,
    citation,
]
TITLES = [
    "Model details",
    "Uses",
    "Bias, risks and limitations",
    "Training data",
    "Training procedure",
    "Evaluation",
    "Environmental impact",
    "Technical specifications",
    "Citation",
]
