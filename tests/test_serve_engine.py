"""The serving engine on tiny GPT-2, LLaMA and BLOOM models with the real GPT-2 tokenizer: greedy tokens equal
to ``model.generate``'s under continuous batching, seeded sampling independent of the batch, penalties,
stop sequences spanning tokens, multi-byte characters, end-of-sequence, length limits and cancellation; the
sampler's state and the engine's inputs on the model's device (the meta device standing in for a GPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from conftest import shared
from medfoundry.errors import ConfigError, InputError
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from medfoundry.generation.sampling import TokenSampler, sample
from medfoundry.generation.text import Detokenizer, StopMatcher
from medfoundry.model.export import export_hf
from medfoundry.model.presets import model_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "The patient presented with",
    "Aspirin",
    "Randomized controlled trials of statins in elderly patients show",
    "Diagnosis:",
    "β-lactam antibiotics inhibit",
]


def tiny_checkpoint(directory: Path, preset: str = "gpt2-tiny", seed: int = 0, overrides: dict | None = None) -> Path:
    """A random tiny model with GPT-2's 50,257-token tokenizer and a simple chat template."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(preset, vocab_size=50_257, context=256, overrides=overrides))
    out = export_hf(model, shared("tokenizers/gpt2"), directory)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "gpt2-tiny")


@pytest.fixture(scope="module")
def engine(gpt2_dir) -> Engine:
    return Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=3)


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``model.generate`` on a left-padded batch, as its documentation recommends for decoder-only models."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bloom-tiny"])
def test_greedy_equals_generate_under_continuous_batching(preset, gpt2_dir, tmp_path):
    """Five prompts of different lengths through three slots: requests join and leave mid-run."""
    directory = gpt2_dir if preset == "gpt2-tiny" else tiny_checkpoint(tmp_path / preset, preset)
    engine = Engine.load(directory, precision="fp32", device="cpu", threads=1, max_batch=3)
    prompts = [engine.encode(p) for p in PROMPTS]
    budgets = [12, 5, 9, 16, 7]  # different lengths, so slots free up at different steps
    done = engine.generate(prompts, [SamplingConfig(max_tokens=n, temperature=0, ignore_eos=True) for n in budgets])
    with torch.no_grad():
        expected = [hf_greedy(engine.model, [ids], n)[0] for ids, n in zip(prompts, budgets)]
        batched = hf_greedy(engine.model, prompts, max(budgets))
    assert [c.token_ids for c in done] == expected
    assert [row[:n] for row, n in zip(batched, budgets)] == expected
    assert [c.finish_reason for c in done] == ["length"] * 5
    assert [c.text for c in done] == [engine.decode(ids) for ids in expected]
    assert not engine.running and not engine.waiting


BF16_PROMPTS = [
    *PROMPTS,
    "Metformin is first-line therapy for",
    "The differential diagnosis of chest pain includes",
    "In this cohort study, we",
    "Hypertension is defined as",
]


def test_bf16_engine_agrees_with_fp32_token_by_token(tmp_path):
    """Greedy bf16 tokens, each checked against fp32 ``transformers`` given the same context (the prompt and
    the bf16 tokens before it), so that one near-tie flipped by bf16 rounding does not count every later token
    as wrong. Measured here: 96.8% of 216 tokens are fp32's argmax, and the others are within 0.05 logits of
    it (fp32's top-2 margin is 0.2 at the median). A broken path scores far lower: the same model continuing
    the last prompt token alone (no context, as with a lost KV cache) gets 15% and is up to 7.8 logits off.
    The random model is initialized at std 0.1, not 0.02: at 0.02 its greedy output repeats one token, which
    any path that keeps the first token right would match."""
    directory = tiny_checkpoint(tmp_path / "gpt2-tiny", overrides={"initializer_range": 0.1})
    fp32 = Engine.load(directory, precision="fp32", device="cpu", threads=1, max_batch=3)
    bf16 = Engine.load(directory, precision="bf16", device="cpu", threads=1, max_batch=3)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    n = 24
    done = bf16.generate(BF16_PROMPTS, SamplingConfig(max_tokens=n, temperature=0, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [n] * len(BF16_PROMPTS)
    argmax, gaps = 0, []
    with torch.no_grad():
        for prompt, completion in zip(BF16_PROMPTS, done):
            ids, tokens = fp32.encode(prompt), torch.tensor(completion.token_ids)
            assert len(set(completion.token_ids)) >= 8  # a real continuation, not one token repeated
            logits = fp32.model(torch.tensor([ids + completion.token_ids])).logits[0, len(ids) - 1 : -1]
            argmax += int((logits.argmax(-1) == tokens).sum())
            gaps += (logits.max(-1).values - logits[torch.arange(n), tokens]).tolist()
    fraction = argmax / (n * len(BF16_PROMPTS))
    assert fraction >= 0.9, f"only {fraction:.1%} of the bf16 tokens are fp32's greedy choice"
    assert max(gaps) <= 0.25, f"a bf16 token is {max(gaps):.2f} logits below fp32's best"


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = SamplingConfig(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], params)[0]
    others = SamplingConfig(max_tokens=6, temperature=1.2, seed=7, ignore_eos=True)
    crowded = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, params, others])[1]
    assert crowded.token_ids == alone.token_ids
    reseeded = engine.generate([PROMPTS[0]], params.model_copy(update={"seed": 99}))[0]
    assert reseeded.token_ids != alone.token_ids


def test_a_prompt_the_engine_holds_is_not_prefilled_again(engine):
    """The samples of one prompt: one prefill row per distinct prompt among those admitted together, none for a
    prompt a running request holds (its columns are copied into the new row); each sample's tokens are those it
    makes alone with its seed."""
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[2]]  # the engine has 3 slots: the last joins later
    budgets, seeds = [8, 3, 8, 5], [1, 2, 3, 4]  # PROMPTS[0] ends first, while both PROMPTS[2] still run
    params = [SamplingConfig(max_tokens=n, temperature=0.9, seed=x, ignore_eos=True) for n, x in zip(budgets, seeds)]
    alone = [engine.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    prefills = []

    def record(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(kwargs["input_ids"].shape[0])

    hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = engine.generate(prompts, params)
    finally:
        hook.remove()
    assert [c.token_ids for c in together] == alone
    assert alone[0] != alone[2] != alone[3]  # same prompt, other seeds: other samples
    assert prefills == [2]  # one forward for two distinct prompts; the fourth request prefilled nothing


def test_sampling_filters_and_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    sampler = TokenSampler(SamplingConfig(temperature=1.0, top_k=1, seed=0), [0], 4)
    assert sample(logits.clone(), [sampler]) == [1]
    narrow = TokenSampler(SamplingConfig(temperature=5.0, top_p=0.05, seed=0), [0], 4)
    assert {sample(logits.clone(), [narrow])[0] for _ in range(20)} == {1}  # top-p keeps the top token only
    repeat = TokenSampler(SamplingConfig(temperature=0, repetition_penalty=10.0), [1], 4)
    assert sample(logits.clone(), [repeat]) == [2]  # 3.0 / 10 falls below 2.0
    frequent = TokenSampler(SamplingConfig(temperature=0, frequency_penalty=2.0), [0], 4)
    assert sample(logits.clone(), [frequent]) == [1]
    frequent.observe(1)
    assert sample(logits.clone(), [frequent]) == [2]  # 3.0 - 2.0 < 2.0; the prompt token 0 is not counted
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("presence_penalty", 3.0)]:
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**{field: value})


class OpRecorder(TorchDispatchMode):
    """Every ATen operation run inside it, with the devices of the tensors it produced."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set[torch.device]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        self.ops.append((str(func), devices))
        return out

    @property
    def devices(self) -> set[torch.device]:
        return set().union(*(devices for _, devices in self.ops))

    @property
    def host_reads(self) -> int:
        """``.item()``, ``int(tensor)``, ``bool(tensor)``: on a GPU each one waits for the device."""
        return sum(name.startswith("aten._local_scalar_dense") for name, _ in self.ops)


META = torch.device("meta")


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8, "seed": 3},
        {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 3, "repetition_penalty": 1.2},
        {"temperature": 1.0, "frequency_penalty": 0.5, "presence_penalty": 0.5},
        {"temperature": 0, "repetition_penalty": 1.3, "frequency_penalty": 1.0},
    ],
)
def test_sampler_state_and_draws_live_on_the_logits_device(params, monkeypatch):
    """On a GPU the engine passes CUDA logits: a sampler whose generator or penalty counts sit on the CPU fails
    every sampled request there (and the whole batch with it). The meta device stands in for the GPU: every
    tensor the sampler makes must be on it, every generator it asks for too, and nothing is read back to the
    host (``.item()`` on meta raises)."""
    requested = []

    class RecordingGenerator(torch.Generator):  # meta has no generators: a CPU one stands in, meta ops ignore it
        def __new__(cls, device=None):
            requested.append(torch.device(device) if device is not None else torch.device("cpu"))
            return super().__new__(cls)

        def __init__(self, device=None):
            super().__init__()

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    sampler = TokenSampler(SamplingConfig(**params), [0, 2], 16)
    logits = torch.randn(16, device=META)
    with OpRecorder() as recorder:
        for token in (3, 5):
            sampler.penalize(logits)
            chosen = logits.argmax(dim=-1, keepdim=True) if sampler.greedy else sampler.draw(logits)
            sampler.observe(token)
    assert recorder.devices == {META}
    assert chosen.device == META and chosen.shape == (1,)
    assert set(requested) <= {META} and bool(requested) == (not sampler.greedy)
    assert {t.device for t in (sampler.seen, sampler.counts) if t is not None} <= {META}
    assert recorder.host_reads == 0


def test_sample_reads_the_batch_back_once():
    """A batch of greedy, penalized and sampled rows: the tokens are chosen on the device and read together, not
    one ``int()`` (one wait for the GPU) per row."""
    samplers = [
        TokenSampler(SamplingConfig(temperature=0), [1], 50),
        TokenSampler(SamplingConfig(temperature=0, repetition_penalty=1.5), [1, 2], 50),
        TokenSampler(SamplingConfig(temperature=0.9, top_k=10, top_p=0.8, seed=1), [3], 50),
        TokenSampler(SamplingConfig(temperature=1.1, seed=2, frequency_penalty=0.3), [4], 50),
    ]
    logits = torch.randn(4, 50)
    expected = sample(logits.clone(), [TokenSampler(s.params, s.prompt_ids, 50) for s in samplers])
    with OpRecorder() as recorder:
        tokens = sample(logits.clone(), samplers)
    assert tokens == expected and all(isinstance(t, int) for t in tokens)
    assert recorder.host_reads == 0


def test_engine_makes_the_model_inputs_on_its_device(engine, monkeypatch):
    """Ids, mask, positions, the kept positions and the cache's write positions are made on the model's device
    (meta here: a model stand-in records what it is given and answers with CPU logits)."""
    given = []

    def model(**kwargs):
        given.append({k: v.device for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        given[-1]["write_pos"] = engine.cache.write_pos.device if engine.cache.write_pos is not None else META
        rows = kwargs["input_ids"].shape[0]
        return SimpleNamespace(logits=torch.randn(rows, 1, engine.vocab_size))

    monkeypatch.setattr(engine, "model", model)
    monkeypatch.setattr(engine, "device", META)
    params = [
        SamplingConfig(max_tokens=3, temperature=0, ignore_eos=True),
        SamplingConfig(max_tokens=4, temperature=0.7, seed=5, ignore_eos=True, repetition_penalty=1.1),
    ]
    done = engine.generate([[10, 11, 12], [13, 14]], params)
    assert [len(c.token_ids) for c in done] == [3, 4]
    assert len(given) == 4  # one prefill, three decode steps
    assert all(set(call.values()) == {META} for call in given)
    assert {"input_ids", "attention_mask", "position_ids", "logits_to_keep"} <= set(given[0])


def test_penalties_change_greedy_output(engine):
    plain = engine.generate([PROMPTS[0]], SamplingConfig(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # a random model repeats itself
    penalized = engine.generate(
        [PROMPTS[0]],
        SamplingConfig(max_tokens=24, temperature=0, ignore_eos=True, presence_penalty=2.0, repetition_penalty=2.0),
    )[0]
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


def test_detokenizer_keeps_multibyte_characters_whole(engine):
    text = " β-lactam 😀 治疗 naïve café"
    ids = engine.encode(text)
    pieces = []
    detok = Detokenizer(engine.tokenizer, engine.encode("Prompt:"))
    for token in ids:
        pieces.append(detok.push(token))
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens held back an incomplete character


def test_stop_matcher_spanning_pushes():
    stopper = StopMatcher(("END", "\n\n"))
    assert stopper.push("abc E") == ("abc ", False)
    assert stopper.push("N") == ("", False)
    assert stopper.push("Dx") == ("", True)
    other = StopMatcher(("END",))
    assert other.push("EN") == ("", False)
    assert other.push("a") == ("ENa", False)
    assert other.flush() == ""
    assert StopMatcher(()).push("END") == ("END", False)


def test_stop_sequence_across_tokens_is_cut_out(engine):
    params = SamplingConfig(max_tokens=20, temperature=0, ignore_eos=True)
    full = engine.generate([PROMPTS[3]], params)[0]
    assert len(full.text) > 12
    stop = full.text[5:12]  # spans several tokens
    streamed = list(engine.stream(PROMPTS[3], params.model_copy(update={"stop": [stop]})))
    text = "".join(o.text for o in streamed)
    assert text == full.text[: full.text.index(stop)]
    assert streamed[-1].finish_reason == "stop" and streamed[-1].completion_tokens < 20


def test_end_of_sequence_stops_without_text(gpt2_dir):
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2)
    first = engine.generate([PROMPTS[1]], SamplingConfig(max_tokens=1, temperature=0))[0].token_ids[0]
    engine.eos_ids = frozenset({first})
    done = engine.generate([PROMPTS[1]], SamplingConfig(max_tokens=5, temperature=0))[0]
    assert (done.token_ids, done.text, done.finish_reason) == ([first], "", "stop")
    ignored = engine.generate([PROMPTS[1]], SamplingConfig(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(ignored.token_ids) == 5


def test_cache_length_bounds_generation(gpt2_dir):
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2, max_seq_len=16)
    prompt = engine.encode(PROMPTS[2])
    done = engine.generate([prompt], SamplingConfig(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert done.finish_reason == "length" and len(prompt) + len(done.token_ids) == 17  # the last token needs no slot
    with pytest.raises(ValueError, match="at most 16"):
        engine.add_request(list(range(17)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("")


def test_cancel_frees_the_slot(engine):
    stream = engine.stream(PROMPTS[0], SamplingConfig(max_tokens=50, temperature=0, ignore_eos=True))
    next(stream)
    assert len(engine.running) == 1
    stream.close()
    assert not engine.running and not engine.waiting
    waiting = engine.add_request(PROMPTS[0], SamplingConfig(max_tokens=3, temperature=1.0))
    engine.cancel(waiting)
    assert [o.finish_reason for o in engine.step()] == ["abort"] and not engine.has_work


def test_refuses_pickled_weights(tmp_path, gpt2_dir):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="safetensors"):
        Engine.load(tmp_path)


def test_prefill_budget_splits_admissions(engine, monkeypatch):
    """With room for one prompt per prefill, requests join one step after another: same tokens."""
    params = SamplingConfig(max_tokens=6, temperature=0, ignore_eos=True)
    together = engine.generate(PROMPTS[:3], params)
    monkeypatch.setattr("medfoundry.generation.engine.PREFILL_TOKEN_BUDGET", 12)
    requests = [engine.add_request(p, params) for p in PROMPTS[:3]]
    engine.step()
    assert sum(r.row >= 0 for r in requests) < 3  # not all admitted at once
    while engine.has_work:
        engine.step()
    assert [r.output_ids for r in requests] == [c.token_ids for c in together]


def test_sliding_window_caps_the_sequence_length(gpt2_dir):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=50_257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=32,
    )
    model = MistralForCausalLM(config).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(gpt2_dir), max_batch=2)
    assert engine.max_seq_len == 32  # attention stays exact: no token ever falls out of the window
    prompt = engine.encode(PROMPTS[2])
    done = engine.generate([prompt], SamplingConfig(max_tokens=8, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        assert done.token_ids == hf_greedy(model, [prompt], 8)[0]
    with pytest.raises(ConfigError, match="sliding window"):
        Engine(model, engine.tokenizer, max_seq_len=64)


def test_abort_all_ends_the_requests_of_a_failed_prefill(engine, monkeypatch):
    """A prefill that raises (out of memory) has taken its requests out of the waiting queue: they must still be
    the engine's, for ``abort_all`` to end them, or they would never finish."""
    running = engine.add_request(PROMPTS[0], SamplingConfig(max_tokens=20, ignore_eos=True))
    engine.step()
    joining = [engine.add_request(p, SamplingConfig(max_tokens=3)) for p in PROMPTS[1:3]]

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine, "_forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    ended = engine.abort_all("error")
    assert {o.request_id for o in ended} == {r.id for r in [running, *joining]}
    assert all(o.finish_reason == "error" for o in ended) and not engine.has_work
