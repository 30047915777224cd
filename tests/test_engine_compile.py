"""The compiled decode step on a tiny LLaMA: greedy tokens identical to the eager engine's and to ``model.generate``'s
for one request and under continuous batching (the batch shrinking and growing as requests finish and join), after
a cancellation, and for a long prompt prefilled in pieces while another request decodes; no step compiles a new
graph once a batch of one and a batch of more have run; the decode graph calls the few-row CPU kernel. One compiled
engine is shared by the module: compiling takes tens of seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfoundry.errors import ConfigError
from medfoundry.generation import compiled as compiled_module
from medfoundry.generation import engine as engine_module
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from test_serve_engine import PROMPTS, hf_greedy, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = " ".join(PROMPTS)  # 28 tokens: five pieces of 6


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("compile") / "llama-tiny", "llama-tiny")


@pytest.fixture(scope="module")
def eager(llama_dir) -> Engine:
    return Engine.load(llama_dir, precision="fp32", device="cpu", threads=1, max_batch=3, compile="off")


@pytest.fixture(scope="module")
def compiled(eager) -> Engine:
    """The same model behind a compiled engine, compiled by its warm-up (as the server does at start-up): its two
    graphs, for one row and for a batch of two rows or more (no later step compiles another: see
    test_continuous_batching_one_graph). The warm-up leaves no request behind."""
    engine = Engine(eager.model, eager.tokenizer, max_batch=3, compile="on")
    assert engine.compiled and not eager.compiled and eager.warmup() == 0.0
    before = graphs()
    assert engine.warmup() > 0 and not engine.has_work
    compiled = graphs()
    assert compiled > before
    prompt = engine.encode(PROMPTS[0])
    engine.generate([prompt] * 3, greedy(2))  # a batch the warm-up did not run, then one row: nothing new to compile
    engine.generate([prompt], greedy(2))
    assert graphs() == compiled, "the warm-up left a decode graph to be compiled by a request"
    return engine


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def expected(engine: Engine, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    with torch.no_grad():
        return [hf_greedy(engine.model, [ids], n)[0] for ids, n in zip(prompts, budgets)]


def test_one_request(compiled, eager):
    prompt = compiled.encode(PROMPTS[2])
    done = compiled.generate([prompt], greedy(12))[0]
    assert done.token_ids == eager.generate([prompt], greedy(12))[0].token_ids == expected(eager, [prompt], [12])[0]


def test_decode_graph_calls_the_few_row_kernel(compiled):
    """On a CPU the compiled decode step's linears are the few-row kernel's op, called from the compiled graph (not
    from an eager fallback after a graph break)."""
    from torch.profiler import profile

    prompt = compiled.encode(PROMPTS[2])
    with profile() as prof:
        compiled.generate([prompt, prompt], greedy(4))
    calls = [event for event in prof.events() if event.name == "medfoundry::few_row_linear"]
    assert calls

    def ancestors(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            yield event.name

    assert all(any(name.startswith("Torch-Compiled Region") for name in ancestors(call)) for call in calls)


def test_continuous_batching_one_graph(compiled, eager):
    """Five prompts through three slots: the batch goes 3, 3, ..., 2, 1 as budgets run out and requests join."""
    prompts = [compiled.encode(p) for p in PROMPTS]
    budgets = [12, 5, 9, 16, 7]
    params = [greedy(n) for n in budgets]
    before = graphs()
    done = compiled.generate(prompts, params)
    assert graphs() == before, "a batch size or cache length compiled a new graph"
    tokens = [c.token_ids for c in done]
    assert tokens == [c.token_ids for c in eager.generate(prompts, params)]
    assert tokens == expected(eager, prompts, budgets)
    assert [c.text for c in done] == [compiled.decode(t) for t in tokens]
    assert not compiled.running and not compiled.waiting


def test_cancelled_request_leaves_the_others_exact(compiled, eager):
    """A request cancelled mid-run frees its row (the last row moves into it); the others go on unchanged."""
    prompts = [compiled.encode(p) for p in PROMPTS[:3]]
    requests = [compiled.add_request(p, greedy(10)) for p in prompts]
    for _ in range(3):
        compiled.step()
    compiled.cancel(requests[0])
    while compiled.has_work:
        compiled.step()
    assert requests[0].finish_reason == "abort" and len(requests[0].output_ids) == 4  # two in the first step
    assert [r.output_ids for r in requests[1:]] == expected(eager, prompts[1:], [10, 10])


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_long_prompt_prefilled_in_pieces_while_another_decodes(mode, compiled, eager, monkeypatch):
    """A prompt of 28 tokens in pieces of 6 joins a running request: that one gets a token at every step of
    the long prefill, and both get ``generate``'s tokens."""
    engine = compiled if mode == "compiled" else eager
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 6)
    short, long = engine.encode(PROMPTS[1]), engine.encode(LONG)
    assert len(long) > 4 * 6
    running = engine.add_request(short, greedy(20))
    engine.step()
    joining = engine.add_request(long, greedy(6))
    counts = []
    while joining.prefilling or joining.row < 0:
        engine.step()
        counts.append(len(running.output_ids))
    assert counts == list(range(3, 3 + len(counts))) and len(counts) == -(-len(long) // 6)
    while engine.has_work:
        engine.step()
    assert [running.output_ids, joining.output_ids] == expected(eager, [short, long], [20, 6])


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_prefilling_rows_sit_out_the_decode(mode, compiled, eager, monkeypatch):
    """The rows of a prompt prefilled in pieces come after the decoding rows whatever joins or leaves (a short
    prompt joining moves it down, a finished request's row is refilled and it moves up), and only the decoding
    rows are fed to a decode step (eager; compiled, padded to the largest bucket as on a GPU, its padding rows
    include it and leave its cache intact); every request gets ``generate``'s tokens."""
    engine = compiled if mode == "compiled" else eager
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 6)
    if mode == "compiled":
        monkeypatch.setattr(engine_module, "batch_bucket", lambda rows, max_batch, device: max_batch)
    fed = []  # (rows fed, rows decoding, rows running) at each decode step
    decode = engine._decode_logits

    def spy(ids, *args):
        fed.append((ids.shape[0], engine._ready_rows(), len(engine.running)))
        return decode(ids, *args)

    monkeypatch.setattr(engine, "_decode_logits", spy)
    prompts = [engine.encode(PROMPTS[0]), engine.encode(LONG), engine.encode(PROMPTS[3])]
    budgets = [6, 6, 9]  # the first finishes while the long prompt is prefilled (steps 2 to 6)
    first = engine.add_request(prompts[0], greedy(budgets[0]))
    engine.step()
    long = engine.add_request(prompts[1], greedy(budgets[1]))
    engine.step()
    requests = [first, long, engine.add_request(prompts[2], greedy(budgets[2]))]
    moved = set()
    while engine.has_work:
        engine.step()
        rows = [r.row for r in engine.running]
        assert rows == list(range(len(rows)))
        prefilling = [r.prefilling for r in engine.running]
        assert prefilling == sorted(prefilling), "a prefilling row before a decoding row"
        moved.add(long.row)
    assert {1, 2} <= moved  # it moved down for the joiner, and up when the first request finished
    assert any(ready < running for _, ready, running in fed)  # decode steps ran while the long prompt was prefilled
    assert all(rows == (ready if mode == "eager" else 3) for rows, ready, _ in fed)
    assert [r.output_ids for r in requests] == expected(eager, prompts, budgets)


def test_compile_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiled_module.should_compile("off", cuda)
    # auto on a CPU: only a long-lived process (the server) earns its compile time back
    assert not compiled_module.should_compile("auto", cpu)
    assert compiled_module.should_compile("auto", cpu, long_lived=True)
    assert compiled_module.should_compile("on", cpu)
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    assert not compiled_module.should_compile("auto", cpu, long_lived=True)  # no compiler: eager, no error
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        compiled_module.should_compile("on", cpu)
    with pytest.raises(ConfigError, match="compile='fast'"):
        compiled_module.should_compile("fast", cpu)


def test_buckets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [compiled_module.batch_bucket(n, 8, cpu) for n in (1, 2, 3, 8)] == [1, 2, 3, 8]
    assert [compiled_module.batch_bucket(n, 6, cuda) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    assert compiled_module.kv_bucket(300, 2048, cpu) == 300
    assert [compiled_module.kv_bucket(n, 600, cuda) for n in (2, 256, 257, 599)] == [256, 256, 512, 600]
