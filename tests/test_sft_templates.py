"""Chat templates: ChatML tokens added and the model grown, BioMed-LLaMA's sections, the tokenizer's own
template; the saved template reproduces the training ids exactly; loss masks cover responses and their end
tokens only; records a template cannot render are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES
from medfoundry.errors import ConfigError, InputError
from medfoundry.sft.config import TemplateConfig
from medfoundry.sft.formats import Message, make_conversation, read_conversations
from medfoundry.sft.templates import IM_END, IM_START, Renderer, prepare_tokenizer

SFT = FIXTURES / "sft"
WORDS = (
    "The patient presented with fever, cough and chest pain. Question: Answer: Options: yes no maybe. "
    "Vitamin deficiency causes scurvy and rickets. Hypertension, diabetes, anemia; tachycardia. ### user assistant"
)


def make_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A small byte-level BPE with GPT-2's <|endoftext|> (no tokenizer_config: GPT-2 conventions apply)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [WORDS] * 20 + [(SFT / n).read_text() for n in ("alpaca.jsonl", "messages.json", "sharegpt.jsonl")]
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("base_tok"))


def multi_turn():
    return make_conversation(
        [
            Message("system", "Be brief."),
            Message("user", "Which vitamin deficiency causes scurvy?", {"A": "Vitamin A", "B": "Vitamin C"}),
            Message("assistant", "B. Vitamin C"),
            Message("user", "And rickets?"),
            Message("assistant", "Vitamin D deficiency."),
        ],
        "memory",
        7,
    )


def load(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def test_chatml_adds_two_special_tokens_and_ends_turns_with_im_end(base, tmp_path):
    tokenizer, added = prepare_tokenizer(str(base), TemplateConfig(name="chatml"), tmp_path / "tok")
    base_size = len(load(base))
    assert added == [base_size, base_size + 1]
    assert tokenizer.convert_tokens_to_ids([IM_START, IM_END]) == added and tokenizer.eos_token == IM_END
    extension = json.loads((tmp_path / "tok" / "vocab_extension.json").read_text())
    assert extension["base_vocab_size"] == base_size and extension["added_tokens"] == [IM_START, IM_END]
    assert (tmp_path / "tok" / "chat_template.jinja").is_file()
    again = load(tmp_path / "tok")
    assert again.eos_token == IM_END and again.decode(added, skip_special_tokens=True) == ""


@pytest.mark.parametrize("name", ["chatml", "biomed_llama"])
def test_saved_template_reproduces_the_training_ids_exactly(base, tmp_path, name):
    cfg = TemplateConfig(name=name)
    tokenizer, _ = prepare_tokenizer(str(base), cfg, tmp_path / "tok")
    renderer = Renderer(tokenizer, cfg)
    reloaded = load(tmp_path / "tok")  # what evaluation and serving will load
    records = [multi_turn(), *read_conversations(SFT / "messages.json"), *read_conversations(SFT / "alpaca.jsonl")]
    for conversation in records:
        example = renderer(conversation)
        ids = reloaded.apply_chat_template(renderer.messages(conversation), tokenize=True)["input_ids"]
        assert example.ids.tolist() == ids
        assert example.boundary_tokens == 0


def test_loss_mask_covers_each_response_and_its_end_token_only(base, tmp_path):
    cfg = TemplateConfig(name="chatml")
    tokenizer, _ = prepare_tokenizer(str(base), cfg, tmp_path / "tok")
    example = Renderer(tokenizer, cfg)(multi_turn())
    assert tokenizer.decode(example.ids[example.loss].tolist()) == f"B. Vitamin C{IM_END}Vitamin D deficiency.{IM_END}"
    last = Renderer(tokenizer, TemplateConfig(name="chatml", train_on="last"))(multi_turn())
    assert last.ids.tolist() == example.ids.tolist()
    assert tokenizer.decode(last.ids[last.loss].tolist()) == f"Vitamin D deficiency.{IM_END}"
    # the newline ChatML prints after <|im_end|> is not a target: generation has stopped there
    assert tokenizer.decode(example.ids[-1:].tolist()) == "\n" and not example.loss[-1]


def test_biomed_llama_layout(base, tmp_path):
    cfg = TemplateConfig(name="biomed_llama", system_prompt="Answer the medical question.")
    tokenizer, added = prepare_tokenizer(str(base), cfg, tmp_path / "tok")
    renderer = Renderer(tokenizer, cfg)
    conversation = next(iter(read_conversations(SFT / "messages.json")))  # has its own system message
    single = make_conversation(
        [
            Message("user", "Which vitamin deficiency causes scurvy?", {"A": "Vitamin A", "B": "Vitamin C"}),
            Message("assistant", "B. Vitamin C"),
        ],
        "memory",
        1,
    )
    text, spans = renderer.response_spans(single)
    assert added == [] and tokenizer.eos_token == "<|endoftext|>"
    assert text == (
        "Answer the medical question.\n\n### Question:\nWhich vitamin deficiency causes scurvy?\n\n### Options:\n"
        "A. Vitamin A\nB. Vitamin C\n\n### Answer:\nB. Vitamin C<|endoftext|>"
    )
    assert [text[a:b] for a, b in spans] == ["B. Vitamin C<|endoftext|>"]
    assert renderer.response_spans(conversation)[0].startswith("You are a careful medical assistant.\n\n### Question:")
    two = renderer.response_spans(multi_turn())[0]
    assert (
        "Vitamin C<|endoftext|>\n\n### Question:\nAnd rickets?\n\n### Answer:\nVitamin D deficiency.<|endoftext|>"
        in two
    )


def test_model_template_is_used_as_is_with_options_folded_into_the_question(base, tmp_path):
    from transformers import AutoTokenizer

    from medfoundry.model.export import copy_tokenizer

    own = tmp_path / "own"
    own.mkdir()
    copy_tokenizer(base, own)
    tokenizer = AutoTokenizer.from_pretrained(str(own))
    tokenizer.chat_template = (SFT / "zephyr_template.jinja").read_text()
    tokenizer.save_pretrained(str(own))
    cfg = TemplateConfig(name="model")
    prepared, added = prepare_tokenizer(str(own), cfg, tmp_path / "tok")
    assert added == [] and not (tmp_path / "tok" / "vocab_extension.json").exists()
    renderer = Renderer(prepared, cfg)
    record = list(read_conversations(SFT / "messages.json"))[1]
    example = renderer(record)
    assert (
        prepared.decode(example.ids[example.loss].tolist())
        == "B. Vitamin C<|endoftext|>Vitamin D deficiency.<|endoftext|>"
    )
    assert (
        "<|user|>\nWhich vitamin deficiency causes scurvy?\n\nOptions:\nA. Vitamin A\nB. Vitamin C<|endoftext|>"
        in prepared.decode(example.ids.tolist())
    )
    assert example.ids.tolist() == load(tmp_path / "tok").apply_chat_template(renderer.messages(record))["input_ids"]
    # this template refuses system messages: the error names the record
    with pytest.raises(
        InputError, match=r"messages.json:2: template 'model' cannot render this record: .*no system role"
    ):
        renderer(next(iter(read_conversations(SFT / "messages.json"))))


def test_model_template_without_one_is_a_config_error(base, tmp_path):
    with pytest.raises(ConfigError, match="the tokenizer has no chat template: use template chatml or biomed_llama"):
        prepare_tokenizer(str(base), TemplateConfig(name="model"), tmp_path / "tok")


def _with_template(base: Path, tmp_path: Path, template: str) -> Renderer:
    tokenizer, _ = prepare_tokenizer(str(base), TemplateConfig(name="chatml"), tmp_path / "tok")
    tokenizer.chat_template = template
    return Renderer(tokenizer, TemplateConfig(name="model"))


def test_templates_whose_responses_cannot_be_located_are_refused(base, tmp_path):
    # history rewritten once a later turn exists (like templates that strip earlier reasoning)
    rewriting = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[earlier answer]"
        "{% else %}{{ m.role }}: {{ m.content }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(InputError, match=r"memory:7: template 'model' does not render this conversation incrementally"):
        _with_template(base, tmp_path, rewriting)(multi_turn())
    unterminated = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(InputError, match="does not close the assistant turn with a special end token"):
        _with_template(base, tmp_path, unterminated)(multi_turn())


def test_chatml_vocab_extension_grows_the_model_with_mean_rows(base, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from medfoundry.model.resize import resize_for_tokenizer

    _, added = prepare_tokenizer(str(base), TemplateConfig(name="chatml"), tmp_path / "tok")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=added[0], n_embd=16, n_layer=1, n_head=2, n_positions=32))
    result = resize_for_tokenizer(model, tmp_path / "tok")
    assert result["added_ids"] == added and result["vocab_size"] == added[-1] + 1
    rows = model.get_input_embeddings().weight
    assert torch.allclose(rows[added[0]], rows[: added[0]].mean(0))


@pytest.mark.parametrize("name", ["model", "chatml"])
def test_a_real_instruct_tokenizer_with_its_own_chatml_template(smollm2, tmp_path, name):
    cfg = TemplateConfig(name=name)
    tokenizer, added = prepare_tokenizer(str(smollm2), cfg, tmp_path / "tok")
    assert added == [] and tokenizer.eos_token == IM_END  # it has the ChatML tokens already: no growth needed
    renderer = Renderer(tokenizer, cfg)
    for conversation in [multi_turn(), *read_conversations(SFT / "sharegpt.jsonl")]:
        example = renderer(conversation)
        assert (
            example.ids.tolist()
            == load(tmp_path / "tok").apply_chat_template(renderer.messages(conversation))["input_ids"]
        )
    text = tokenizer.decode(renderer(multi_turn()).ids.tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    example = renderer(next(iter(read_conversations(SFT / "alpaca.jsonl"))))
    default_system = "You are a helpful AI assistant named SmolLM" in tokenizer.decode(example.ids.tolist())
    assert default_system == (name == "model")  # the model's own template adds its default system prompt
    assert tokenizer.decode(example.ids[example.loss].tolist()).endswith(f"calcium channel blocker.{IM_END}")
