"""A checkpoint's ``generation_config.json`` never changes what a request asked: greedy decoding through every
generation path (the engine, ``medfoundry generate``, eval's chain of thought, lm-eval's ``generate_until``, the
server) equals plain argmax decoding on a checkpoint whose generation config asks for a repetition penalty,
n-gram blocking, top-k, top-p, a temperature and sampling."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The patient presented with", "Metformin is a first-line treatment for"]
NEW = 12
HOSTILE = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 5, "top_p": 0.5, "temperature": 0.7}


@pytest.fixture(scope="module")
def hostile(gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with a generation config that would change greedy output if anything read it."""
    directory = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(gpt2_dir, directory)
    path = directory / "generation_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **HOSTILE, "do_sample": True}))
    return directory


@pytest.fixture(scope="module")
def argmax(hostile) -> dict[str, str]:
    """Each prompt's NEW greedy tokens by a manual loop (full forward, argmax of the last logits), as text."""
    model = AutoModelForCausalLM.from_pretrained(hostile, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hostile)
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.no_repeat_ngram_size == 2
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(NEW):
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
        out[prompt] = tokenizer.decode(new)
        # the hostile config does change transformers' own generate when left to it: the test can fail
        defaulted = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert defaulted[0, len(ids) :].tolist() != new
    return out


def test_the_engine_and_generate_command(hostile, argmax, tmp_path):
    from medfoundry.cli import main

    engine = Engine.load(hostile, precision="fp32", device="cpu", threads=1, max_batch=2)
    done = engine.generate([engine.encode(p) for p in PROMPTS], SamplingConfig(max_tokens=NEW, ignore_eos=True))
    assert [c.text for c in done] == [argmax[p] for p in PROMPTS]

    out = tmp_path / "out.jsonl"
    argv = ["generate", str(hostile), *PROMPTS, "--max-tokens", str(NEW), "--ignore-eos", "--quiet"]
    assert main([*argv, "--precision", "fp32", "--device", "cpu", "--threads", "1", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["prompt"]: r["completion"] for r in rows} == argmax


def test_chain_of_thought_and_lm_eval_generate_until(hostile, argmax):
    from lm_eval.api.instance import Instance

    from medfoundry.eval.config import ChainOfThoughtConfig
    from medfoundry.eval.generate import Generator
    from medfoundry.eval.lm_eval_backend import MedfoundryLM
    from medfoundry.model.load import load_model

    loaded = load_model(hostile, precision="fp32", device="cpu")
    cot = ChainOfThoughtConfig(max_tokens=NEW, ignore_eos=True)  # eval's default: greedy
    assert [t for (t,) in Generator(loaded)(PROMPTS, cot)] == [argmax[p] for p in PROMPTS]

    lm = MedfoundryLM(loaded=loaded)
    gen_kwargs = {"until": ["@@@"], "max_gen_toks": NEW, "do_sample": False}
    requests = [Instance("generate_until", None, (p, gen_kwargs), i) for i, p in enumerate(PROMPTS)]
    texts = lm.generate_until(requests, disable_tqdm=True)
    # lm-eval's generate_until stops at the end-of-sequence token: compare up to it
    assert texts == [argmax[p].split("<|endoftext|>")[0] for p in PROMPTS]


def test_the_server(hostile, argmax):
    from medfoundry.serve.app import ServerConfig, create_app
    from medfoundry.serve.worker import EngineWorker
    from test_serve_api import serving

    engine = Engine.load(hostile, precision="fp32", device="cpu", threads=1, max_batch=2)
    worker = EngineWorker(engine, max_queue=4)
    with serving(create_app(worker, ServerConfig(model_name="hostile"))) as url:
        for prompt in PROMPTS:
            body = {"model": "hostile", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
            request = urllib.request.Request(
                f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.loads(response.read())["choices"][0]["text"] == argmax[prompt]
