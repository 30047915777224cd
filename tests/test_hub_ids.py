"""Hub ids (``org/name[@revision]``) wherever a model or tokenizer is named, resolved from a Hugging Face cache
populated here in the cache's own layout (``models--org--name/{blobs,refs,snapshots}``) and read offline
(``HF_HUB_OFFLINE=1``): eval, generate (the command line, on SmolLM2-135M-Instruct), serve, chat, tokenizer
extend, finetune's ``init_from``, convert; the safety rules of local folders (pickles refused unless allowed,
``auto_map`` refused); what is downloaded; a model missing offline is one line; recipe keys pin the commit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, shared
from medfoundry.config import validate
from medfoundry.errors import ConfigError, InputError
from medfoundry.model import hub
from medfoundry.model.load import load_model, load_tokenizer, model_name, resolve_reference

pytestmark = pytest.mark.usefixtures("one_thread")

ORG = "medfoundry-test"
TINY = f"{ORG}/tiny-llama"
SMOLLM2 = f"{ORG}/SmolLM2-135M-Instruct"


def cache_repo(cache: Path, repo_id: str, source: Path, *, ref: str = "main", skip: tuple[str, ...] = ()) -> str:
    """Put the files of ``source`` into the Hugging Face cache ``cache`` as the snapshot of ``repo_id`` that
    ``refs/<ref>`` points to, the way huggingface_hub lays it out (snapshot files are relative links to blobs;
    the blobs are hard links to the source files, or links where hard links fail). Returns the commit."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name in skip:
            continue
        blob = repo / "blobs" / hashlib.sha256(str(file.resolve()).encode()).hexdigest()
        if not blob.exists():
            try:
                os.link(file, blob)
            except OSError:
                blob.symlink_to(file.resolve())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a byte-level BPE tokenizer and a ChatML template (float32 safetensors)."""
    from test_gguf_export import make_model, make_tokenizer

    directory = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    directory.mkdir()
    make_tokenizer(directory)
    make_model(directory)
    return directory


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The Hugging Face cache: the tiny LLaMA (refs main and v1), the same model with pickled weights only, and
    one whose config.json asks for its own code. Returns the cache and the commit of each repository."""
    root = tmp_path_factory.mktemp("hf_cache")
    pickled, remote = root.parent / "pickled", root.parent / "remote"
    for folder in (pickled, remote):
        shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(_state(tiny), pickled / "pytorch_model.bin")
    shutil.copy(tiny / "model.safetensors", remote)
    config = json.loads((tiny / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    commits = {
        TINY: cache_repo(root, TINY, tiny),
        f"{TINY}@v1": cache_repo(root, TINY, tiny, ref="v1"),
        f"{ORG}/pickled": cache_repo(root, f"{ORG}/pickled", pickled),
        f"{ORG}/remote-code": cache_repo(root, f"{ORG}/remote-code", remote),
    }
    return root, commits


def _state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


@pytest.fixture
def offline(cache, monkeypatch) -> dict[str, str]:
    """Offline mode on the populated cache, for this process (huggingface_hub read its environment at import:
    its constants are set too). Returns the commits."""
    from huggingface_hub import constants

    root, commits = cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return commits


# ---------------------------------------------------------------------------------------------- references


def test_a_hub_id_is_org_name_at_revision_and_a_local_path_wins(tmp_path, monkeypatch):
    assert hub.is_hub_id("HuggingFaceTB/SmolLM2-135M") and hub.is_hub_id("org/name@v1.0")
    assert hub.is_hub_id("org/name@refs/pr/1") and hub.split("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_hub in ("gpt2", "a/b/c", "/abs/model", "./org/name", "org/model.gguf", "org/na--me", "org/name@", "o/n m"):
        assert not hub.is_hub_id(not_hub), not_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name") and resolve_reference("org/name") == Path("org/name")
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M" and model_name("org/name@v1") == "name@v1"


def test_revisions_resolve_offline_to_their_snapshot(offline, cache):
    root = cache[0]
    snapshots = root / f"models--{ORG}--tiny-llama" / "snapshots"
    assert hub.resolve(TINY) == snapshots / offline[TINY]
    assert hub.resolve(f"{TINY}@v1") == snapshots / offline[f"{TINY}@v1"]
    assert hub.resolve(f"{TINY}@{offline[TINY]}") == snapshots / offline[TINY]  # a commit needs no ref
    assert load_tokenizer(TINY).chat_template


def test_a_model_missing_offline_is_one_line(offline, capsys):
    from medfoundry.cli import main

    assert main(["generate", f"{ORG}/absent", "hello", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {ORG}/absent: not a local path, nor in the Hugging Face")
    assert "HF_HUB_OFFLINE=1" in err and f"hf download {ORG}/absent" in err
    with pytest.raises(InputError, match=f"hf download {TINY} --revision v2"):
        hub.resolve(f"{TINY}@v2")


def test_downloads_are_restricted_to_what_the_rules_load(monkeypatch, tmp_path):
    """Safetensors, JSON, Jinja and vocabulary files only; pickled weights only with allow_pickle and no
    safetensors in the snapshot; never code. Network errors are one line."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake(repo_id, *, revision, allow_patterns, local_files_only):
        calls.append((repo_id, revision, tuple(allow_patterns), local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.resolve("org/name@v2") == tmp_path
    (_, revision, patterns, local_only), *_ = calls
    assert revision == "v2" and not local_only and "*.safetensors" in patterns and "*.json" in patterns
    assert not any(p.endswith((".bin", ".py", ".pt", ".pth", ".ckpt", ".pkl", "*")) for p in patterns)
    calls.clear()
    hub.resolve("org/name", allow_pickle=True)  # no safetensors in the snapshot: pickles are fetched too
    assert [c[2] for c in calls] == [patterns, (*patterns, "pytorch_model*.bin")]
    (tmp_path / "model.safetensors").write_bytes(b"")
    calls.clear()
    hub.resolve("org/name", allow_pickle=True)  # safetensors there: the pickles would never load
    assert len(calls) == 1

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -3] name resolution\nAn error happened...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(
        InputError, match=r"^org/name: not in the Hugging Face cache, and the download failed: Got"
    ) as e:
        hub.resolve("org/name")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- safety rules


def test_pickled_weights_are_refused_unless_allowed_and_remote_code_always(offline):
    with pytest.raises(InputError, match="refused: its weights are pickled"):
        load_model(f"{ORG}/pickled", device="cpu", precision="fp32")
    lm = load_model(f"{ORG}/pickled", device="cpu", precision="fp32", allow_pickle=True)
    assert lm.name == "pickled" and lm.path.name == offline[f"{ORG}/pickled"]
    with pytest.raises(InputError, match="'auto_map' asks to run Python code"):
        load_model(f"{ORG}/remote-code", device="cpu", precision="fp32")


# ---------------------------------------------------------------------------------------------- commands


def test_generate_command_runs_smollm2_from_the_offline_cache(smollm2_hf, tmp_path):
    """The command line (a fresh process reading HF_HUB_OFFLINE and HF_HUB_CACHE), on the real SmolLM2."""
    root = tmp_path / "hf"
    commit = cache_repo(root, SMOLLM2, smollm2_hf)
    out = tmp_path / "out" / "samples.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "OMP_NUM_THREADS": "1"}
    env.update(MEDFOUNDRY_NO_TCMALLOC="1", PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "-m", "medfoundry", "generate", SMOLLM2, "The capital of France is"]
    command += ["--max-tokens", "4", "--device", "cpu", "--precision", "fp32", "--output", str(out), "--quiet"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text().splitlines()[0])
    assert 1 <= record["completion_tokens"] <= 4 and record["completion"].strip()
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["inputs"] == {SMOLLM2: f"hub:{commit}"}


def test_eval_scores_a_hub_model(offline, smollm2_hf, cache, tmp_path):
    from medfoundry.eval.config import EvalConfig
    from medfoundry.eval.run import evaluate

    cache_repo(cache[0], SMOLLM2, smollm2_hf, ref="eval")
    cfg = validate(
        EvalConfig,
        {
            "output_dir": str(tmp_path / "eval"),
            "models": [f"{SMOLLM2}@eval", TINY],
            "tasks": ["pubmedqa"],
            "benchmarks_dir": str(shared("benchmarks")),
            "limit": 2,
            "threads": 1,
            "precision": "fp32",
            "bootstrap_iters": 0,
        },
    )
    result = evaluate(cfg)
    assert [m["name"] for m in result["models"]] == ["SmolLM2-135M-Instruct@eval", "tiny-llama"]
    assert Path(result["models"][1]["path"]).name == offline[TINY]
    assert (tmp_path / "eval" / "tiny-llama" / "results.json").is_file()


def test_serve_answers_under_the_repository_name(offline, monkeypatch):
    from starlette.testclient import TestClient

    from medfoundry.serve import app as serve_app
    from medfoundry.serve.cli import serve_model
    from medfoundry.serve.config import ServeConfig

    served = {}
    monkeypatch.setattr(serve_app, "serve", lambda worker, config, **_: served.update(worker=worker, config=config))
    assert (
        serve_model(
            validate(ServeConfig, {"model": TINY, "device": "cpu", "precision": "fp32", "compile": "off"}, "serve")
        )
        == 0
    )
    assert served["config"].model_name == "tiny-llama"
    with TestClient(serve_app.create_app(served["worker"], served["config"]), base_url="http://localhost") as client:
        reply = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_chat_talks_to_a_hub_model(offline, monkeypatch, capsys):
    from medfoundry.generation.cli import chat
    from medfoundry.generation.config import ChatConfig

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    cfg = validate(ChatConfig, {"model": f"{TINY}@v1", "device": "cpu", "sampling": {"max_tokens": 3}}, "chat")
    assert chat(cfg) == 0
    assert capsys.readouterr().out.strip()


def test_tokenizer_extend_reads_a_hub_base(offline, tmp_path):
    from medfoundry.tokenizer.config import ExtendConfig
    from medfoundry.tokenizer.extend import extend_tokenizer
    from test_tokenizer_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus", 60, 10)
    cfg = ExtendConfig(
        base_dir=TINY, corpus_dir=str(corpus), output_dir=str(tmp_path / "ext"), add_tokens=20, min_frequency=2
    )
    manifest = extend_tokenizer(cfg)
    assert manifest.counts["vocab_size"] == manifest.counts["base_vocab_size"] + 20
    assert (tmp_path / "ext" / "tokenizer_config.json").is_file() and TINY in manifest.inputs


def test_finetune_starts_from_a_hub_model(offline, cache, tmp_path, monkeypatch):
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.sft.finetune import finetune
    from medfoundry.train import loop
    from test_finetune import _base_model, _tree
    from test_sft_dataset import write_sources
    from test_sft_templates import make_tokenizer

    monkeypatch.setattr(loop, "device_peak", lambda *_: loop.Peak("cpu", "fp32", None, 1e11))  # no matmul timing
    base = _base_model(tmp_path / "sft-base", make_tokenizer(tmp_path / "tok"), "llama")
    commit = cache_repo(cache[0], f"{ORG}/sft-base", base)
    tree = _tree({"sources": write_sources(tmp_path / "data"), "llama": f"{ORG}/sft-base"}, tmp_path / "ft", "llama")
    tree["training"].update(steps=2, micro_batch_size=2, global_batch_size=2)
    tree["data"]["mixture"]["total"] = 12
    tree.update(checkpoint={"every": 2}, eval={"every": 2, "batches": 1}, schedule={"kind": "constant"})
    finetune(validate(FinetuneConfig, tree))
    assert json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["model_type"] == "llama"
    prepared = json.loads((tmp_path / "data-llama" / "manifest.json").read_text())
    assert f"{ORG}/sft-base" in prepared["inputs"] and commit


def test_convert_writes_a_gguf_of_a_hub_model(offline, tmp_path):
    from medfoundry.cli import main

    assert main(["convert", TINY, str(tmp_path / "tiny.gguf")]) == 0
    text = "IL-6 rose in COVID-19 patients."
    assert load_tokenizer(tmp_path / "tiny.gguf").encode(text) == load_tokenizer(TINY).encode(text)


def test_recipe_keys_pin_a_hub_id_to_its_commit(offline, tiny):
    from medfoundry.generation.config import GenerateConfig
    from medfoundry.stages import STAGES, input_fingerprints

    key = STAGES["generate"].key_config
    assert key(GenerateConfig(model=TINY, prompts=["x"]))["model"] == f"{TINY}@{offline[TINY]}"
    assert key(GenerateConfig(model=f"{TINY}@v1", prompts=["x"]))["model"] == f"{TINY}@{offline[f'{TINY}@v1']}"
    assert key(GenerateConfig(model=str(tiny), prompts=["x"]))["model"] == str(tiny)
    assert key(GenerateConfig(model="out/not-built-yet", prompts=["x"]))["model"] == "out/not-built-yet"
    assert input_fingerprints(TINY) == {TINY: f"hub:{offline[TINY]}"}


def test_a_reference_that_is_no_model_names_the_field(offline, tmp_path):
    from medfoundry.model.load import check_reference

    with pytest.raises(ConfigError, match="model .*: not a Hugging Face model directory"):
        check_reference(tmp_path, "model")


def test_plan_reads_only_the_config_of_a_hub_model(offline, tmp_path):
    """``medfoundry plan`` of a fine-tuning run from a Hub id sizes the Hub model from its config.json alone: a cache
    holding nothing else is enough (no weights are fetched to plan a run)."""
    from huggingface_hub import constants

    from medfoundry.model.presets import model_config
    from medfoundry.plan import load_target, make_plan, with_flags
    from test_plan import _finetune_config

    only_config = tmp_path / "only-config"
    model_config("llama-tiny", context=512).save_pretrained(only_config)
    cache_repo(Path(constants.HF_HUB_CACHE), f"{ORG}/config-only", only_config)
    target = load_target(
        _finetune_config(tmp_path, f"{ORG}/config-only"), ["training.steps=10", "training.epochs=null"]
    )
    plan = make_plan(with_flags(target, gpu="a100-80gb", gpus=4))
    assert plan.model.source == f"checkpoint {ORG}/config-only" and plan.model.context == 512
    assert plan.model.hidden_size == model_config("llama-tiny").hidden_size
    with pytest.raises(ConfigError, match="nor a model on the Hugging Face Hub"):
        make_plan(with_flags(load_target(_finetune_config(tmp_path, f"{ORG}/absent"), []), gpu="a100-80gb", gpus=4))
