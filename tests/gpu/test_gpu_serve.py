"""The serving engine on CUDA: sampled requests (temperature > 0, the API's default) next to greedy and penalized
ones in one batch, seeds that give the same text again, and the sampler's state on the GPU. Before the sampler
kept its generator and penalty counts on the CPU, every sampled request failed on a GPU and aborted its batch.

Mirrors ``tests/test_serve_engine.py`` (tiny GPT-2 with the real GPT-2 tokenizer)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ci_skips import skip_machine
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from test_serve_engine import PROMPTS, tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("gpu_serve") / "gpt2-tiny")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def engine(request, gpt2_dir) -> Engine:
    if request.param == "bf16" and not torch.cuda.is_bf16_supported():
        skip_machine("this GPU has no bf16")
    engine = Engine.load(gpt2_dir, precision=request.param, device="cuda", max_batch=4)
    assert engine.device.type == "cuda"
    return engine


SAMPLED = SamplingConfig(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
MIXED = [
    SamplingConfig(max_tokens=8, temperature=0, ignore_eos=True),
    SAMPLED,
    SamplingConfig(
        max_tokens=10, temperature=1.0, seed=7, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True
    ),
    SamplingConfig(max_tokens=6, temperature=0, frequency_penalty=1.0, ignore_eos=True),
    SamplingConfig(max_tokens=9, temperature=1.2, seed=3, ignore_eos=True),  # waits for a free slot
]


def test_same_seed_same_text_on_cuda(engine):
    first = engine.generate([PROMPTS[0]], SAMPLED)[0]
    again = engine.generate([PROMPTS[0]], SAMPLED)[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 12
    assert (again.token_ids, again.text) == (first.token_ids, first.text)
    other = engine.generate([PROMPTS[0]], SAMPLED.model_copy(update={"seed": 99}))[0]
    assert other.token_ids != first.token_ids


def test_a_batch_of_greedy_penalized_and_sampled_requests(engine):
    """Five requests through four slots: all finish at their length (none aborted), and the same batch again gives
    the same tokens (seeded draws on CUDA generators are reproducible)."""
    done = engine.generate(PROMPTS, MIXED)
    assert [c.finish_reason for c in done] == ["length"] * 5
    assert [len(c.token_ids) for c in done] == [p.max_tokens for p in MIXED]
    assert all(0 <= t < engine.vocab_size for c in done for t in c.token_ids)
    assert [c.token_ids for c in engine.generate(PROMPTS, MIXED)] == [c.token_ids for c in done]
    assert not engine.running and not engine.waiting


def test_the_sampler_state_lives_on_the_gpu(engine):
    request = engine.add_request(PROMPTS[1], MIXED[2])
    while engine.has_work:
        engine.step()
    sampler = request.sampler
    assert request.finish_reason == "length"
    assert sampler.generator.device.type == sampler.seen.device.type == sampler.counts.device.type == "cuda"


def test_the_server_worker_serves_sampled_requests(engine):
    """Through the server's worker thread, as HTTP requests are: every output arrives, none aborted."""
    from medfoundry.serve.worker import EngineWorker

    worker = EngineWorker(engine, max_queue=8)
    outputs, finished = [], threading.Semaphore(0)

    def sink(output):
        outputs.append(output)
        if output.finish_reason is not None:
            finished.release()

    worker.start()
    try:
        worker.submit([(engine.encode(p), params, sink, None) for p, params in zip(PROMPTS, MIXED)])
        for _ in MIXED:
            assert finished.acquire(timeout=120), "a request never finished"
    finally:
        worker.stop()
    reasons = [o.finish_reason for o in outputs if o.finish_reason is not None]
    assert reasons == ["length"] * len(MIXED)
