"""Log-probabilities from the server, as OpenAI's legacy completions API and vLLM define them: ``logprobs`` (the
chosen token's and the k likeliest), ``echo`` (the prompt's, with ``max_tokens: 0`` alone), chat's ``logprobs`` and
``top_logprobs``, streamed chunks carrying theirs, the limit of ``--max-logprobs``; the engine's values are the
model's raw distribution whatever the sampling, a long prompt scored in pieces equal to one forward; and lm-eval's
``local-completions`` model against the server scoring a multiple-choice task as its ``hf`` model does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest
import torch
import yaml

from medfoundry.generation import engine as engine_module
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from medfoundry.generation.logprobs import LogprobOptions
from medfoundry.serve.app import ServerConfig
from test_serve_api import KEY, PROMPT, http, running_server
from test_serve_engine import gpt2_dir, tiny_checkpoint  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(gpt2_dir):
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2, max_seq_len=128)
    with running_server(engine, ServerConfig(model_name="tiny", api_key=KEY), max_queue=8) as (url, worker):
        yield url, worker


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids`` (row i predicts token i + 1)."""
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(server, path: str, body: dict) -> dict:
    status, text = http(server[0] + path, {"model": "tiny", **body})
    assert status == 200, text
    return json.loads(text)


def events(server, path: str, body: dict) -> list[dict]:
    status, text = http(server[0] + path, {"model": "tiny", "stream": True, **body})
    assert status == 200, text
    datas = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


# ---- the engine


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bloom-tiny"])
def test_prompt_scored_in_pieces_equals_one_forward(preset, gpt2_dir, tmp_path, monkeypatch):
    """A prompt longer than the scoring piece (7 tokens here) prefilled in pieces, next to another request: every
    prompt token's log-probability and its top 3 as one full forward of the model gives them."""
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)
    directory = gpt2_dir if preset == "gpt2-tiny" else tiny_checkpoint(tmp_path / preset, preset)
    engine = Engine.load(directory, precision="fp32", device="cpu", threads=1, max_batch=2)
    ids = engine.encode("Randomized controlled trials of statins in elderly patients show fewer events")
    engine.add_request(engine.encode("Aspirin"), SamplingConfig(max_tokens=4))
    scored = engine.add_request(ids, SamplingConfig(max_tokens=3), logprobs=LogprobOptions(generated=0, prompt=3))
    outputs = []
    while scored.finish_reason is None:
        outputs += [out for out in engine.step() if out.request_id == scored.id]
    expected = raw_logprobs(engine, ids + scored.output_ids)
    prompt = outputs[0].prompt_logprobs
    assert [p.token for p in prompt] == ids and prompt[0].logprob is None and prompt[0].top == ()
    for i, entry in enumerate(prompt[1:], start=1):
        assert entry.logprob == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        values, top_ids = expected[i - 1].topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    generated = [out.logprobs[0] for out in outputs]
    for j, entry in enumerate(generated):
        assert entry.top == () and entry.token == scored.output_ids[j]
        assert entry.logprob == pytest.approx(expected[len(ids) - 1 + j, entry.token].item(), abs=1e-4)


def test_logprobs_are_the_raw_distribution_whatever_the_sampling(gpt2_dir):
    """Temperature, top-p and a repetition penalty change what is drawn, not the log-probabilities returned (vLLM's
    default ``raw_logprobs``); the drawn token's own log-probability is there even when it is not in the top 2."""
    engine = Engine.load(gpt2_dir, precision="fp32", device="cpu", threads=1, max_batch=2)
    ids = engine.encode(PROMPT)
    params = SamplingConfig(max_tokens=12, temperature=1.9, top_p=0.99, repetition_penalty=1.3, seed=3)
    request = engine.add_request(ids, params, logprobs=LogprobOptions(generated=2))
    plain = engine.add_request(ids, SamplingConfig(max_tokens=12))  # no logprobs: its outputs carry none
    outputs = []
    while request.finish_reason is None or plain.finish_reason is None:
        outputs += engine.step()
    assert all(out.logprobs is None for out in outputs if out.request_id == plain.id)
    scores = [out.logprobs[0] for out in outputs if out.request_id == request.id]
    expected = raw_logprobs(engine, ids + request.output_ids)
    assert [s.token for s in scores] == request.output_ids
    outside = 0
    for j, score in enumerate(scores):
        row = expected[len(ids) - 1 + j]
        assert score.logprob == pytest.approx(row[score.token].item(), abs=1e-4)
        assert [t for t, _ in score.top] == row.topk(2).indices.tolist()
        outside += score.token not in dict(score.top)
    assert outside  # at temperature 1.9 on a random model, some draws fall outside the top 2


# ---- completions


def test_completion_logprobs_include_the_chosen_token(client):
    answer = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5, seed=1, logprobs=2, n=2
    )
    for choice in answer.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[token] == logprob and 2 <= len(top) <= 3 and logprob <= 0
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    assert answer.usage.completion_tokens == 16


def test_echo_with_max_tokens_zero_scores_the_prompt(server, client):
    engine = server[1].engine
    ids = engine.encode(PROMPT)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == engine.token_texts(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    expected = raw_logprobs(engine, ids)
    assert lp.token_logprobs[1:] == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, len(ids))], 1e-4)
    best = engine.token_texts(expected[:-1].argmax(-1).tolist())
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        assert top[lp.tokens[i]] == lp.token_logprobs[i] and best[i - 1] in top


def test_echo_of_token_ids_then_generation(server):
    """Two prompts of token ids, two choices each (lm-eval's batched request shape): every choice repeats its prompt,
    then its generated tokens, whose offsets follow the prompt's."""
    engine = server[1].engine
    prompts = [engine.encode(PROMPT), engine.encode("Aspirin")]
    body = post(server, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "echo": True, "logprobs": 0})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice, ids in zip(body["choices"], [prompts[0]] * 2 + [prompts[1]] * 2):
        lp = choice["logprobs"]
        assert choice["text"].startswith(engine.decode(ids)) and len(lp["tokens"]) == len(ids) + 3
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(ids) + 3)]
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs 0: the chosen token alone
    assert body["usage"]["completion_tokens"] == 12


def test_echo_without_logprobs_repeats_the_prompt(server):
    body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "echo": True, "temperature": 0})
    plain = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert body["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert body["choices"][0]["logprobs"] is None is plain["choices"][0]["logprobs"]


def test_streamed_completion_carries_the_same_logprobs(server):
    request = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2, "ignore_eos": True}
    whole = post(server, "/v1/completions", request)["choices"][0]
    chunks = [c["choices"][0] for c in events(server, "/v1/completions", request)]
    pieces = [c["logprobs"] for c in chunks if c["logprobs"]]
    assert len(pieces) >= 2  # the echoed prompt first, then the tokens as they come
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for piece in pieces for x in piece[key]] == whole["logprobs"][key]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["logprobs"] is None


# ---- chat


def test_chat_logprobs_and_top_logprobs(server, client):
    messages = [{"role": "user", "content": "Which drug lowers LDL?"}]
    answer = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)  # greedy
    only = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[]] * len(content)
    assert [e.logprob for e in only.choices[0].logprobs.content] == [e.logprob for e in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None

    stream = {"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    chunks = [c["choices"][0] for c in events(server, "/v1/chat/completions", stream)]
    streamed = [entry for c in chunks if c["logprobs"] for entry in c["logprobs"]["content"]]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(e.token, e.logprob) for e in content]


# ---- refusals


@pytest.mark.parametrize(
    "path, fields, message",
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs: 21 is more than this server's limit of 20"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens: 0 is allowed only with echo"),
        ("/v1/completions", {"best_of": 2}, "best_of other than n is not supported"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs: 21 is more than"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs: allowed only with logprobs: true"),
    ],
)
def test_invalid_logprob_requests_are_400s_that_say_why(server, path, fields, message):
    prompt = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    status, text = http(server[0] + path, {"model": "tiny", "max_tokens": 2, **prompt, **fields})
    assert status == 400 and message in json.loads(text)["error"]["message"]


def test_best_of_equal_to_n_is_accepted(server):
    body = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2, "best_of": 2})
    assert len(body["choices"]) == 2


# ---- lm-eval


def greedy_choice(engine: Engine, questions: list[str]) -> dict:
    """A question whose options include the model's own greedy two-token continuation (of the first question
    where that continuation tokenizes back into the same tokens after the context, as lm-eval encodes it)."""
    for question in questions:
        context = f"Question: {question}\nAnswer:"
        greedy = engine.generate([context], SamplingConfig(max_tokens=2, ignore_eos=True))[0]
        if engine.encode(context + greedy.text) == engine.encode(context) + greedy.token_ids:
            return {"question": question, "choices": [greedy.text, " penicillin"], "answer": 1}
    raise AssertionError("no greedy continuation that tokenizes back the same")


def mc_task(root: Path, engine: Engine) -> Path:
    """A multiple-choice task over a local JSONL file: options of one and of several tokens, one of them the
    model's own greedy continuation."""
    docs = [
        greedy_choice(engine, ["Which antibiotic?", "Is fever a symptom of sepsis?", "What does HbA1c measure?"]),
        {"question": "Which drug is a statin?", "choices": [" atorvastatin", " aspirin", " insulin"], "answer": 0},
        {"question": "Is fever a symptom of sepsis?", "choices": [" yes", " no", " maybe"], "answer": 0},
        {"question": "What does HbA1c measure?", "choices": [" glucose control", " blood pressure"], "answer": 0},
        {"question": "The patient presented with", "choices": [" fever", " chest pain and dyspnea"], "answer": 1},
    ]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    task = {
        "task": "mf_serve_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": "",  # the choices bring their own space
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
        "metadata": {"version": 1.0},
    }
    (root / "mf_serve_mc.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")
    return root


def test_lm_eval_local_completions_scores_as_hf_does(server, gpt2_dir, tmp_path, monkeypatch):
    """lm-eval's ``local-completions`` model (token-id prompts, ``echo``, ``logprobs: 1``, ``max_tokens: 1``)
    against the server: every log-likelihood within 1e-4 of lm-eval's ``hf`` model, every greedy flag equal."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    tasks = TaskManager(include_path=str(mc_task(tmp_path, server[1].engine)), include_defaults=False)
    api_args = (
        f"base_url={server[0]}/v1/completions,model=tiny,tokenizer_backend=huggingface,tokenizer={gpt2_dir},"
        "num_concurrent=1,max_retries=1"
    )
    results = {
        name: simple_evaluate(
            model=name,
            model_args=args,
            tasks=["mf_serve_mc"],
            task_manager=tasks,
            log_samples=True,
            bootstrap_iters=0,
            **extra,
        )
        for name, args, extra in [
            ("local-completions", api_args, {}),
            ("hf", {"pretrained": str(gpt2_dir), "dtype": "float32"}, {"device": "cpu", "batch_size": 4}),
        ]
    }
    ours, theirs = (
        [s["resps"] for s in sorted(r["samples"]["mf_serve_mc"], key=lambda s: s["doc_id"])] for r in results.values()
    )
    assert len(ours) == len(theirs) == 5
    for doc_ours, doc_theirs in zip(ours, theirs):
        loglik = [[choice[0][0] for choice in doc] for doc in (doc_ours, doc_theirs)]
        assert loglik[0] == pytest.approx(loglik[1], abs=1e-4)
        assert all(math.isfinite(x) and x < 0 for x in loglik[0])
        assert [c[0][1] for c in doc_ours] == [c[0][1] for c in doc_theirs]
    assert any(c[0][1] for doc in ours for c in doc)  # the model's own continuation is greedy
