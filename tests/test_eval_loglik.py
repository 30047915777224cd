"""Log-likelihood scoring: exact against a plain per-pair forward pass, independent of the batch size
(GPT-2, LLaMA, BLOOM/ALiBi), lm-eval's tokenization rules, truncation, greedy flags, loading and errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import shared
from medfoundry.errors import ConfigError, InputError
from medfoundry.eval.loglik import ChoiceScore, LoglikRequest, encode_requests, score_requests
from medfoundry.model.export import export_hf
from medfoundry.model.load import load_model
from medfoundry.model.presets import model_config

WORDS = [
    "The",
    "patient",
    "was",
    "treated",
    "with",
    "intravenous",
    "ceftriaxone",
    "for",
    "community-acquired",
    "pneumonia,",
    "and",
    "the",
    "fever",
    "resolved",
    "within",
    "48",
    "hours;",
    "blood",
    "cultures",
    "grew",
    "Streptococcus",
    "pneumoniae",
    "sensitive",
    "to",
    "penicillin.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def bos_tokenizer_dir(directory: Path) -> Path:
    """GPT-2's BPE with LLaMA's conventions: distinct <s> and </s>, and <s> added in front of every encoding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from medfoundry.model.load import load_backend_tokenizer

    bpe = load_backend_tokenizer(shared("tokenizers/gpt2"))
    bpe.add_special_tokens(["<s>", "</s>"])
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return directory


def tiny_checkpoint(root: Path, preset: str, tokenizer_dir: Path, vocab_size: int, context: int | None = 1024) -> Path:
    """A random tiny model exported with ``tokenizer_dir``; small weights would make every distribution
    near-uniform, so they are scaled up until the model has clear (if arbitrary) preferences."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(preset, vocab_size=vocab_size, context=context))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    return export_hf(model, tokenizer_dir, root / preset)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2-tiny", shared("tokenizers/gpt2"), 50_257)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    return tiny_checkpoint(root, "llama-tiny", bos_tokenizer_dir(root / "tokenizer"), 50_259)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("bloom"), "bloom-tiny", shared("tokenizers/gpt2"), 50_257, None)


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def mixed_requests() -> list[LoglikRequest]:
    """Contexts from 2 to ~400 tokens, single- and multi-token continuations, trailing whitespace, few-shot."""
    requests = []
    for i, n in enumerate((1, 3, 40, 7, 150, 12, 300, 2, 90)):
        requests.append(LoglikRequest(text(n, i) + "\nAnswer:", (" A", " B", " C", " D")))
        requests.append(LoglikRequest(text(n, i + 3), (" " + text(1 + i, 5), " " + text(9, i), " yes", " no")))
    requests.append(LoglikRequest("Is the answer yes? ", ("yes", "no, not at all", "maybe")))
    requests.append(LoglikRequest("Line one\n\n", ("Line two", "\n")))
    return requests + few_shot_requests()


def few_shot_requests() -> list[LoglikRequest]:
    """Contexts that share a long few-shot prefix (one of them a prefix of another), so the scorer runs it once."""
    shots = "".join(f"{text(12, i)}\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5))
    requests = [
        LoglikRequest(shots + text(5 + 9 * i, i) + "\nAnswer:", (" A", " B", " " + text(3, i))) for i in range(4)
    ]
    return requests + [LoglikRequest(shots + "Q", (" A", " B C")), LoglikRequest(shots + "Q more", (" A",))]


def reference(model, tokenizer, request: LoglikRequest, max_length: int) -> list[tuple[float, bool, int]]:
    """lm-eval's algorithm written plainly: one unpadded forward pass per (context, continuation) pair."""
    context = request.context.rstrip()
    spaces = request.context[len(context) :]
    context_ids = tokenizer.encode(context)
    result = []
    for continuation in request.continuations:
        cont = tokenizer.encode(context + spaces + continuation)[len(context_ids) :]
        inputs = (context_ids + cont)[-(max_length + 1) :][:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inputs]), logits_to_keep=len(cont)).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(cont)
        result.append(
            (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()), len(cont))
        )
    return result


def flat(scores: list[list[ChoiceScore]]) -> list[ChoiceScore]:
    return [s for request in scores for s in request]


def assert_same(ours: list[ChoiceScore], theirs, tol: float) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.loglik == pytest.approx(b[0], abs=tol)
        assert a.is_greedy == b[1]


# -- exactness and batch independence -----------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2_dir", "llama_dir", "bloom_dir"])
def test_scores_equal_a_plain_forward_pass_at_every_batch_size(name, request):
    lm = load_model(request.getfixturevalue(name), precision="fp32", device="cpu", threads=1)
    requests = mixed_requests()
    expected = [r for req in requests for r in reference(lm.model, lm.tokenizer, req, lm.max_length)]
    runs = {size: flat(score_requests(lm, requests, batch_size=size)) for size in (1, 3, 32, None)}
    for scores in runs.values():
        assert_same(scores, expected, 1e-4)
        assert [s.tokens for s in scores] == [e[2] for e in expected]
    for scores in runs.values():  # batch size changes nothing beyond float rounding
        assert [s.loglik for s in scores] == pytest.approx([s.loglik for s in runs[1]], abs=1e-5)
    assert any(s.tokens > 1 for s in runs[1]) and any(s.tokens == 1 for s in runs[1])


def test_bf16_keeps_the_predictions_of_fp32(gpt2_dir):
    requests = mixed_requests()
    fp32 = score_requests(load_model(gpt2_dir, precision="fp32", device="cpu", threads=1), requests)
    bf16_lm = load_model(gpt2_dir, precision="bf16", device="cpu", threads=1)
    assert next(bf16_lm.model.parameters()).dtype == torch.bfloat16
    bf16 = score_requests(bf16_lm, requests)
    assert flat(bf16)[0].loglik != flat(fp32)[0].loglik  # really a different precision
    for a, b in zip(flat(bf16), flat(fp32)):
        assert a.loglik == pytest.approx(b.loglik, rel=0.05, abs=0.5)


def test_truncation_keeps_the_last_max_length_tokens(gpt2_dir):
    """A 64-token window: contexts are cut from the left, differently for continuations of different lengths."""
    lm = dataclasses.replace(load_model(gpt2_dir, precision="fp32", device="cpu", threads=1), max_length=64)
    requests = [LoglikRequest(text(120), (" A", " " + text(10, 2), " " + text(30, 1)))]
    pairs = encode_requests(lm.tokenizer, requests, 64)[0]
    assert [len(prefix) + len(cont) for prefix, cont in pairs] == [65, 65, 65]
    ours = flat(score_requests(lm, requests, batch_size=2))
    assert_same(ours, reference(lm.model, lm.tokenizer, requests[0], 64), 1e-4)
    with pytest.raises(ValueError, match=r"request 0: a continuation of \d+ tokens exceeds the model's context of 64"):
        score_requests(lm, [LoglikRequest("Hi", (" " + text(70),))])


def test_greedy_continuations_are_flagged(gpt2_dir):
    """The model's own greedy tokens (when their text re-encodes to the same tokens) are flagged greedy."""
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    context = text(20)
    ids = lm.tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = lm.tokenizer.decode(ids[-3:])
    assert lm.tokenizer.encode(context + greedy)[-3:] == ids[-3:]
    other = " the" if not greedy.startswith(" the") else " a"
    first, whole, wrong = flat(
        score_requests(lm, [LoglikRequest(context, (lm.tokenizer.decode(ids[-3:-2]), greedy, other))])
    )
    assert (first.is_greedy, whole.is_greedy, wrong.is_greedy) == (True, True, False)
    assert whole.tokens == 3 and whole.loglik < first.loglik < 0


def test_a_shared_few_shot_prefix_runs_once(gpt2_dir):
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    requests = few_shot_requests()
    shared = min(len(lm.tokenizer.encode(r.context)) for r in requests) - 1
    widths = []
    forward = lm.model.base_model.forward

    def recording(*args, **kwargs):
        widths.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))
        return forward(*args, **kwargs)

    lm.model.base_model.forward = recording
    score_requests(lm, requests)
    assert [w for w in widths if w[1] >= shared] == [(1, shared)]  # no other pass reads the few-shot prefix again


def test_the_attention_kernel_is_given_back(llama_dir):
    """Short contexts run with eager attention on CPU; the shared model keeps its own kernel afterwards."""
    lm = load_model(llama_dir, precision="fp32", device="cpu", threads=1)
    assert lm.model.config._attn_implementation == "sdpa"
    seen = []
    forward = lm.model.base_model.forward

    def recording(*args, **kwargs):
        seen.append(lm.model.config._attn_implementation)
        return forward(*args, **kwargs)

    lm.model.base_model.forward = recording
    score_requests(lm, [LoglikRequest(text(10), (" A",)), LoglikRequest(text(700), (" A",))], batch_size=1)
    assert seen[-2:] == ["sdpa", "eager"]  # longest first: ~1,300 keys, then ~20
    assert lm.model.config._attn_implementation == "sdpa"


def test_duplicates_and_shared_contexts_score_identically(llama_dir):
    lm = load_model(llama_dir, precision="fp32", device="cpu", threads=1)
    a = LoglikRequest(text(30), (" A", " B", " A"))
    b = LoglikRequest(text(30), (" B", " C"))
    scores = score_requests(lm, [a, b, a])
    assert scores[0][0] == scores[0][2] == scores[2][0] and scores[0][1] == scores[1][0]
    assert scores == score_requests(lm, [a, b, a], batch_size=1)


# -- lm-eval's tokenization rules ------------------------------------------------------------------


def test_trailing_whitespace_moves_to_the_continuation(gpt2_dir):
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    encode = lm.tokenizer.encode
    ((prefix, cont),) = encode_requests(lm.tokenizer, [LoglikRequest("Answer: ", ("yes",))], lm.max_length)[0]
    assert list(prefix) == encode("Answer:") and list(cont) == encode("Answer: yes")[len(encode("Answer:")) :]
    assert lm.tokenizer.decode(cont) == " yes"


def test_bos_is_added_as_the_tokenizer_does_but_never_twice(llama_dir):
    lm = load_model(llama_dir, precision="fp32", device="cpu", threads=1)
    bos = lm.tokenizer.bos_token_id
    requests = [LoglikRequest("Question: why?", (" yes",)), LoglikRequest("<s>Question: why?", (" yes",))]
    (plain, _), (marked, _) = [pairs[0] for pairs in encode_requests(lm.tokenizer, requests, lm.max_length)]
    assert plain[0] == bos and plain[1] != bos
    assert marked == plain  # the text "<s>" is the BOS: no second one


def test_empty_context_is_the_bos_token(llama_dir):
    lm = load_model(llama_dir, precision="fp32", device="cpu", threads=1)
    bos = lm.tokenizer.bos_token_id
    requests = [LoglikRequest("", ("Hello there", "<s>Hello there"))]
    (p1, c1), (p2, c2) = encode_requests(lm.tokenizer, requests, lm.max_length)[0]
    hello = lm.tokenizer.encode("Hello there", add_special_tokens=False)
    assert (p1, c1) == ((bos,), tuple(hello))
    assert (p2, c2) == ((bos,), tuple(hello))  # a continuation starting with BOS supplies the context itself
    first, second = score_requests(lm, requests)[0]
    assert first.loglik == pytest.approx(second.loglik, abs=1e-6)


def test_contexts_and_continuations_that_tokenize_to_nothing_are_refused(gpt2_dir):
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    with pytest.raises(ValueError, match="request 1: the context tokenizes to nothing"):
        score_requests(lm, [LoglikRequest("Hi", (" A",)), LoglikRequest("  ", ("A",))])
    with pytest.raises(ValueError, match="request 0: a continuation tokenizes to nothing"):
        score_requests(lm, [LoglikRequest("Hi", ("",))])
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        score_requests(lm, [LoglikRequest("Hi", (" A",))], batch_size=0)


def test_models_with_extra_logit_processing_are_refused(gpt2_dir):
    """The scorer applies the output layer itself; a model that rescales its logits would be scored wrong."""
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    forward = lm.model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    lm.model.forward = scaled
    with pytest.raises(ConfigError, match="GPT2LMHeadModel: its logits are not its output layer"):
        score_requests(lm, [LoglikRequest("Hi", (" A",))])


# -- loading -------------------------------------------------------------------------------------


def test_load_model_reads_the_checkpoint(gpt2_dir, bloom_dir):
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    assert (lm.name, lm.path, lm.precision, lm.device, lm.max_length) == ("gpt2-tiny", gpt2_dir, "fp32", "cpu", 1024)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.is_fast
    bloom = load_model(bloom_dir, precision="fp32", device="cpu", threads=1)  # no position table: the tokenizer's
    assert bloom.max_length == bloom.tokenizer.model_max_length == 256


def test_context_window_follows_lm_eval():
    from types import SimpleNamespace

    from transformers import BloomConfig, GPT2Config

    from medfoundry.model.load import context_window

    unset = SimpleNamespace(model_max_length=int(1e30))
    assert context_window(GPT2Config(n_positions=512), SimpleNamespace(model_max_length=64)) == 512
    assert context_window(BloomConfig(), SimpleNamespace(model_max_length=300)) == 300
    assert context_window(BloomConfig(), unset) == 2048
    assert context_window(SimpleNamespace(text_config=GPT2Config(n_positions=128)), unset) == 128


def test_load_model_names_what_is_missing(gpt2_dir, tmp_path):
    with pytest.raises(InputError, match="model not found"):
        load_model(tmp_path / "nowhere", device="cpu", threads=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no config.json"):
        load_model(tmp_path / "empty", device="cpu", threads=1)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(InputError, match="bare: no weights"):
        load_model(bare, device="cpu", threads=1)
    (bare / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match="bare: no tokenizer"):
        load_model(bare, device="cpu", threads=1)
    lm = load_model(bare, device="cpu", precision="fp32", tokenizer=gpt2_dir, threads=1)
    assert lm.tokenizer.eos_token == "<|endoftext|>"
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        load_model(gpt2_dir, precision="fp16", device="cpu", threads=1)
