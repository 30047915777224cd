"""The `instruct` prompt style: fine-tuned chat models asked exactly as `medfoundry finetune` trained them.

On the official benchmark files, the eval context (messages through the chat template) equals the SFT
Renderer's rendering of the converted conversation up to its answer, and the gold continuation equals
the converted answer, for the chatml and biomed_llama templates and for tokenizers' own templates;
few-shot demonstrations are earlier turns; the chat prompt is encoded with the training ids (no extra
BOS); and `evaluate` runs end to end on a tiny model with a chat template, refusing one without."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FIXTURES, SHARED_DATA, shared
from medfoundry.config import validate
from medfoundry.errors import ConfigError
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.loglik import LoglikRequest, encode_requests
from medfoundry.eval.prompts import chat_prompt
from medfoundry.eval.run import Prepared, VerbatimTokenizer, evaluate, prepare, registry_for
from medfoundry.eval.tasks import PromptSpec
from medfoundry.model.export import export_hf
from medfoundry.model.presets import model_config
from medfoundry.sft import converters
from medfoundry.sft.config import TemplateConfig
from medfoundry.sft.formats import Conversation, make_conversation
from medfoundry.sft.templates import CHATML, Renderer, load_base_tokenizer, prepare_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = SHARED_DATA / "benchmarks"
TASKS = ["pubmedqa", "medqa_4options", "medmcqa", "mmlu_anatomy"]
RENDERED_DOCS = 25  # documents rendered per task and template (every document is checked without a template)


def config(**fields) -> EvalConfig:
    return validate(
        EvalConfig,
        {
            "output_dir": "unused",
            "models": ["unused"],
            "tasks": ["pubmedqa"],
            "benchmarks_dir": str(BENCHMARKS),
            "prompt_style": "instruct",
            **fields,
        },
    )


def prepared(name: str, **fields) -> Prepared:
    cfg = config(tasks=[name], **fields)
    registry = registry_for(cfg)
    return prepare(registry.get(name), cfg, registry)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, list[Conversation]]:
    """Each task's test documents as the SFT converters turn them into conversations, in the eval's order."""
    shared("benchmarks")
    no_test_ids = tmp_path_factory.mktemp("pubmedqa") / "none.json"
    no_test_ids.write_text("{}")  # the converter leaves the test questions out; here they are what is compared
    pubmedqa = {
        c.record_id: c for c in converters.pubmedqa(BENCHMARKS / "pubmedqa/ori_pqal.json", test_ids=no_test_ids)
    }
    return {
        "pubmedqa": [pubmedqa[pmid] for pmid in prepared("pubmedqa").doc_ids],
        "medqa_4options": list(converters.medqa(BENCHMARKS / "medqa/us_4_options_test.jsonl")),
        "medmcqa": list(converters.medmcqa(BENCHMARKS / "medmcqa/dev.jsonl")),  # cop base detected: 1
        "mmlu_anatomy": list(converters.mmlu(BENCHMARKS / "mmlu/test/anatomy_test.csv")),
    }


@pytest.fixture(scope="module")
def instruct() -> dict[str, Prepared]:
    shared("benchmarks")
    return {name: prepared(name) for name in TASKS}


@pytest.mark.parametrize("name", TASKS)
def test_every_question_is_the_converted_user_turn_and_every_gold_answer_the_converted_answer(
    instruct, converted, name
):
    p, conversations = instruct[name], converted[name]
    assert p.chat and len(p.contexts) == len(conversations) == p.total
    if name == "medmcqa":
        assert [c.record_id for c in conversations] == p.doc_ids
    for context, continuations, target, conversation in zip(p.contexts, p.continuations, p.targets, conversations):
        user, answer = conversation.messages
        assert context == [
            {"role": "user", "content": user.content, **({"options": user.options} if user.options else {})}
        ]
        assert continuations[target] == answer.content
        if user.options:
            assert continuations == [f"{k}. {v}" for k, v in user.options.items()]


# -- rendered with chat templates ----------------------------------------------------------------


def template_tokenizer(kind: str, root: Path, request) -> tuple[object, TemplateConfig]:
    """A tokenizer as `medfoundry finetune` saves it, and the template config it was trained with."""
    if kind in ("chatml", "biomed_llama"):
        cfg = TemplateConfig(name=kind)
        return prepare_tokenizer(str(shared("tokenizers/gpt2")), cfg, root / kind)[0], cfg
    cfg = TemplateConfig(name="model")
    if kind == "smollm2":
        return prepare_tokenizer(str(request.getfixturevalue("smollm2")), cfg, root / kind)[0], cfg
    tokenizer = load_base_tokenizer(shared("tokenizers/gpt2"))  # own template: a small one that knows no options
    tokenizer.chat_template = (FIXTURES / "sft" / "zephyr_template.jinja").read_text()
    return tokenizer, cfg


def training_prompt(renderer: Renderer, conversation: Conversation) -> tuple[str, str]:
    """What training renders before the last answer (messages up to it, with the generation prompt), and after."""
    text, spans = renderer.response_spans(conversation)
    return text[: spans[-1][0]], text[spans[-1][0] :]


@pytest.mark.parametrize("kind", ["chatml", "biomed_llama", "zephyr", "smollm2"])
def test_the_chat_context_is_the_training_prompt(instruct, converted, kind, tmp_path, request):
    tokenizer, cfg = template_tokenizer(kind, tmp_path, request)
    renderer = Renderer(tokenizer, cfg)
    for name in TASKS:
        p = instruct[name]
        for i in range(RENDERED_DOCS):
            prompt, rest = training_prompt(renderer, converted[name][i])
            gold = p.continuations[i][p.targets[i]]
            assert chat_prompt(tokenizer, p.contexts[i]) == prompt, (kind, name, p.doc_ids[i])
            assert rest.startswith(gold) and rest[len(gold) :].rstrip() in renderer.end_tokens
    options_line = {
        "chatml": "\n\nOptions:\nA. ",
        "biomed_llama": "\n\n### Options:\nA. ",
        "zephyr": "\n\nOptions:\nA. ",
        "smollm2": "\n\nOptions:\nA. ",
    }[kind]
    assert options_line in chat_prompt(tokenizer, instruct["medmcqa"].contexts[0])


def test_few_shot_demonstrations_are_earlier_turns_and_the_description_a_system_message(converted, tmp_path):
    tokenizer, _ = prepare_tokenizer(str(shared("tokenizers/gpt2")), TemplateConfig(name="chatml"), tmp_path / "tok")
    p = prepared("mmlu_anatomy", num_fewshot=2, limit=3)
    assert [m["role"] for m in p.contexts[0]] == ["user", "assistant", "user", "assistant", "user"]
    demos = list(converters.mmlu(BENCHMARKS / "mmlu/dev/anatomy_dev.csv"))[:2]  # first_n, as lm-eval's MMLU
    for i in range(3):
        turns = [m for c in (*demos, converted["mmlu_anatomy"][i]) for m in c.messages]
        conversation = make_conversation(turns, "memory", i)
        for train_on in ("all_assistant", "last"):
            renderer = Renderer(tokenizer, TemplateConfig(name="chatml", train_on=train_on))
            assert chat_prompt(tokenizer, p.contexts[i]) == training_prompt(renderer, conversation)[0]

    cfg = config(tasks=["medqa_4options"], limit=2)
    registry = registry_for(cfg)
    task = registry.get("medqa_4options")
    task.prompts["instruct"] = task.prompts["instruct"].model_copy(update={"description": "Be brief."})
    renderer = Renderer(tokenizer, TemplateConfig(name="chatml", system_prompt="Be brief."))
    for context, conversation in zip(prepare(task, cfg, registry).contexts, converted["medqa_4options"]):
        assert chat_prompt(tokenizer, context) == training_prompt(renderer, conversation)[0]


@pytest.mark.parametrize("writes_bos", [False, True])
def test_the_chat_prompt_is_encoded_with_the_training_ids(instruct, converted, tmp_path, writes_bos):
    """A LLaMA-style tokenizer adds <s> by default; training encodes the rendered text without adding it."""
    from test_eval_loglik import bos_tokenizer_dir

    base = bos_tokenizer_dir(tmp_path / "base")
    tokenizer, _ = prepare_tokenizer(str(base), TemplateConfig(name="chatml"), tmp_path / "tok")
    if writes_bos:
        tokenizer.chat_template = "{{ bos_token }}" + CHATML
    renderer = Renderer(tokenizer, TemplateConfig(name="chatml"))
    p, bos = instruct["pubmedqa"], tokenizer.bos_token_id
    for i in range(3):
        context = chat_prompt(tokenizer, p.contexts[i])
        gold = p.continuations[i][p.targets[i]]
        ((prefix, answer),) = encode_requests(VerbatimTokenizer(tokenizer), [LoglikRequest(context, (gold,))], 4096)[0]
        trained = renderer(converted["pubmedqa"][i]).ids.tolist()
        assert list(prefix + answer) == trained[: len(prefix) + len(answer)]
        assert prefix.count(bos) == int(writes_bos) and trained.count(bos) == int(writes_bos)
        assert tokenizer.decode(answer) == "\n" + gold  # the generation prompt's newline moves onto it, as in lm-eval
        ((plain, _),) = encode_requests(tokenizer, [LoglikRequest(context, (gold,))], 4096)[0]
        assert plain.count(bos) == 1  # lm-eval's rule alone: a BOS the model never saw unless the template writes it


def test_chat_styles_are_loglik_only_and_need_their_settings(instruct):
    with pytest.raises(
        ConfigError,
        match="prompts.instruct is a chat style, scored by log-likelihood only, so task "
        "medqa_4options cannot run in chain-of-thought mode with it",
    ):
        prepared("medqa_4options", mode="cot", limit=1)
    with pytest.raises(ConfigError, match="cot_text is not supported with chat"):
        validate(PromptSpec, {"text": "x", "chat": True, "cot_text": "y"}, "<test>")
    with pytest.raises(ConfigError, match="options_apart applies to chat styles"):
        validate(PromptSpec, {"text": "x", "options_apart": True}, "<test>")
    with pytest.raises(
        ConfigError,
        match=r"has no prompt style 'instrcut' \(it has lm_eval, meditron\); "
        "chat styles, for models with a chat template: instruct",
    ):
        prepared("pubmedqa", prompt_style="instrcut")


# -- end to end ------------------------------------------------------------------------------------


def tiny_model(directory: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("gpt2-tiny", vocab_size=vocab_size, context=1024))
    return export_hf(model, tokenizer_dir, directory)


def test_evaluate_a_fine_tuned_chat_model_in_its_training_format(tmp_path):
    shared("benchmarks")
    _, added = prepare_tokenizer(str(shared("tokenizers/gpt2")), TemplateConfig(name="chatml"), tmp_path / "tok")
    chat = tiny_model(tmp_path / "chat", tmp_path / "tok", added[-1] + 1)
    assert (chat / "chat_template.jinja").is_file()
    out = tmp_path / "out"
    run = config(
        output_dir=str(out),
        models=[str(chat)],
        tasks=["pubmedqa", "medmcqa"],
        limit=3,
        threads=1,
        precision="fp32",
        bootstrap_iters=0,
    )
    results = evaluate(run)["models"][0]["results"]
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["medmcqa"])
    assert results["configs"]["pubmedqa"]["prompt_style"] == "instruct"
    samples = [json.loads(line) for line in (out / "chat" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(set(s["prediction"]) == {"acc", "acc_norm", "acc_bytes"} for s in samples)
    assert samples[0]["continuations"] == ["yes", "no", "maybe"] and samples[0]["context"][0]["role"] == "user"
    assert samples[3]["continuations"][0].startswith("A. ") and set(samples[3]["context"][0]["options"]) == set("ABCD")

    plain = tiny_model(tmp_path / "plain", shared("tokenizers/gpt2"), 50257)
    refused = (
        rf"model {re.escape(str(plain))}: its tokenizer has no chat template, but task pubmedqa uses the chat "
        "prompt style 'instruct'; evaluate this model with prompt_style lm_eval"
    )
    with pytest.raises(ConfigError, match=refused):
        evaluate(run.model_copy(update={"models": [str(plain)], "output_dir": str(tmp_path / "out_plain")}))
