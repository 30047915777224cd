"""``generate``, ``chat`` and ``serve`` on the main command line (``generate`` through the stage registry):
prompts from arguments and files, JSONL out, a chat session on piped standard input, a served model
answering, and where ``serve`` takes its key from (never the command line) and when it refuses to start."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest

from medfoundry.cli import build_parser
from medfoundry.errors import ConfigError, InputError
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from medfoundry.manifest import Manifest
from medfoundry.serve.config import ServeConfig
from test_serve_engine import gpt2_dir  # noqa: F401  (session fixture: the tiny GPT-2 checkpoint)

COMMON = ["--precision", "fp32", "--threads", "1"]


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_generate_from_arguments_to_stdout(gpt2_dir, capsys):
    assert (
        run(
            [
                "generate",
                str(gpt2_dir),
                "Aspirin",
                "The patient presented with",
                "--max-tokens",
                "6",
                "--ignore-eos",
                "--quiet",
                *COMMON,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Aspirin", "The patient presented with"]
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in rows)
    engine = Engine.load(gpt2_dir, precision="fp32", threads=1)
    greedy = engine.generate(["Aspirin"], SamplingConfig(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert rows[0]["completion"] == greedy.text  # generate is greedy by default


def test_generate_from_files(gpt2_dir, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": "a", "prompt": "Aspirin"}\n\n{"id": "b", "prompt": "Statins"}\n')
    out = tmp_path / "out.jsonl"
    assert (
        run(
            [
                "generate",
                str(gpt2_dir),
                "--file",
                str(jsonl),
                "--output",
                str(out),
                "--max-tokens",
                "3",
                "--temperature",
                "0.8",
                "--seed",
                "1",
                "--chat",
                *COMMON,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all("completion" in r for r in rows)
    manifest = Manifest.read(tmp_path, "generate")  # the registry's stage: the same manifest as in a recipe
    assert manifest.outputs == {"samples": "out.jsonl"} and manifest.counts["prompts"] == 2
    assert manifest.counts["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert str(jsonl) in manifest.inputs
    text = tmp_path / "prompts.txt"
    text.write_text("Aspirin\nStatins\n")
    assert (
        run(["generate", str(gpt2_dir), "--file", str(text), "--output", str(out), "--max-tokens", "2", *COMMON]) == 0
    )
    assert len(out.read_text().splitlines()) == 2


def test_generate_errors_name_the_fault(gpt2_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        run(["generate", str(gpt2_dir), "--file", str(bad), *COMMON])
    with pytest.raises(ConfigError, match="no prompts"):
        run(["generate", str(gpt2_dir), *COMMON])
    with pytest.raises(ConfigError, match="--top-p"):
        run(["generate", str(gpt2_dir), "x", "--top-p", "0", *COMMON])
    with pytest.raises(ConfigError, match="prompt 1: .*at most 16"):
        run(["generate", str(gpt2_dir), "word " * 20, "--max-seq-len", "16", *COMMON])


def test_chat_on_piped_stdin_keeps_history(gpt2_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is aspirin?\nAnd ibuprofen?\n/reset\nHello\n/exit\nignored\n"))
    seen = []
    original = Engine.chat_prompt
    monkeypatch.setattr(
        Engine,
        "chat_prompt",
        lambda self, messages, template=None: (
            seen.append([m["content"] for m in messages]),
            original(self, messages, template),
        )[1],
    )
    assert (
        run(["chat", str(gpt2_dir), "--system", "Be brief.", "--max-tokens", "5", "--temperature", "0", *COMMON]) == 0
    )
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 3
    assert seen[0] == ["Be brief.", "What is aspirin?"]
    assert seen[1] == ["Be brief.", "What is aspirin?", replies[0], "And ibuprofen?"]
    assert seen[2] == ["Be brief.", "Hello"]  # after /reset


def test_chat_needs_a_template(gpt2_dir, tmp_path, monkeypatch):
    plain = tmp_path / "no-template"
    shutil.copytree(gpt2_dir, plain)
    (plain / "chat_template.jinja").unlink()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(ConfigError, match="no chat template"):
        run(["chat", str(plain), *COMMON])
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert run(["chat", str(plain), "--chat-template", str(template), "--max-tokens", "2", *COMMON]) == 0


def test_serve_command_answers_on_loopback(gpt2_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "import sys; from medfoundry.cli import build_parser; a = build_parser().parse_args(sys.argv[1:]); "
        "sys.exit(a.func(a))"
    )
    env = {**os.environ, "MEDFOUNDRY_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            str(gpt2_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--log-level",
            "warning",
            "--compile",  # the compiled start-up: test_serve_compiles_its_long_lived_engine_before_it_listens
            "off",
            *COMMON,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = json.dumps({"model": "tiny", "prompt": "Aspirin", "max_tokens": 3}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=20)[1]
    assert "API key required" in stderr and "127.0.0.1" in stderr


def served(monkeypatch, argv: list[str]) -> dict:
    """What ``medfoundry serve ARGV`` would serve: the worker, the app's config, host and port (a stand-in for the
    model's engine, and for the server itself, which would run until interrupted)."""
    engine = SimpleNamespace(
        name="tiny", precision="fp32", max_batch=2, max_seq_len=64, waiting=[], running=[], compiled=False
    )
    monkeypatch.setattr(ServeConfig, "load_engine", lambda self, **_: engine)
    captured = {}
    monkeypatch.setattr(
        "medfoundry.serve.app.serve",
        lambda worker, config, **kwargs: captured.update(worker=worker, config=config, **kwargs),
    )
    assert run(["serve", "model-dir", *argv]) == 0
    return captured


def test_serve_compiles_its_long_lived_engine_before_it_listens(monkeypatch, capsys):
    """The server's engine is long-lived (compile auto then compiles its decode step on a CPU too), and a compiled
    one is warmed up before the server listens, not in the first requests."""
    events = []
    engine = SimpleNamespace(
        name="tiny", precision="fp32", max_batch=2, max_seq_len=64, waiting=[], running=[], compiled=True
    )
    engine.warmup = lambda: events.append("warm-up") or 42.0
    monkeypatch.setattr(ServeConfig, "load_engine", lambda self, **kwargs: events.append(kwargs) or engine)
    monkeypatch.setattr("medfoundry.serve.app.serve", lambda worker, config, **kwargs: events.append("listen"))
    assert run(["serve", "model-dir"]) == 0
    assert events == [{"long_lived": True}, "warm-up", "listen"]
    assert "serve: decode step compiled in 42 s" in capsys.readouterr().err


def test_serve_reads_its_key_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFOUNDRY_API_KEY", "key-from-env")
    assert served(monkeypatch, [])["config"].api_key == "key-from-env"
    key_file = tmp_path / "api-key"
    key_file.write_text("key-from-file\n")
    assert served(monkeypatch, ["--api-key-file", str(key_file)])["config"].api_key == "key-from-file"
    err = capsys.readouterr().err
    assert err.count("(API key required)") == 2 and "key-from" not in err
    for bad in ("", "two words\n", "one\nper line\n"):
        key_file.write_text(bad)
        with pytest.raises(ConfigError, match="alone, on one line"):
            served(monkeypatch, ["--api-key-file", str(key_file)])
    with pytest.raises(ConfigError, match="cannot read"):
        served(monkeypatch, ["--api-key-file", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):  # no such flag (nor an abbreviation of --api-key-file): the key would show in ps
        build_parser().parse_args(["serve", "model-dir", "--api-key", "secret"])
    assert "unrecognized arguments: --api-key" in capsys.readouterr().err


def test_serve_without_a_key_stays_on_loopback_unless_told(monkeypatch, capsys):
    monkeypatch.delenv("MEDFOUNDRY_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "gpu-node-3"):
        with pytest.raises(ConfigError, match="without an API key.*--insecure-no-key"):
            served(monkeypatch, ["--host", host])
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert served(monkeypatch, ["--host", host])["config"].api_key is None
    assert "warning" not in capsys.readouterr().err
    open_one = served(
        monkeypatch,
        ["--host", "0.0.0.0", "--insecure-no-key", "--allowed-host", "lab.example.org", "--request-timeout", "30"],
    )
    assert open_one["host"] == "0.0.0.0" and set(open_one["config"].allowed_hosts) == {"lab.example.org", "0.0.0.0"}
    assert open_one["worker"].request_timeout == 30
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_serve_names_the_model_after_its_run(tmp_path, monkeypatch):
    """Without --served-model-name: the card's model-index name, else the run (recipe) of the training stage that
    exported the folder, else its stage folder's name; a plain folder keeps its own name; the flag wins."""
    import medfoundry.serve.app

    engine = SimpleNamespace(
        name="model", precision="fp32", max_batch=2, max_seq_len=64, waiting=[], running=[], compiled=False
    )
    monkeypatch.setattr(ServeConfig, "load_engine", lambda self, **_: engine)

    def name(folder, *argv: str) -> str:
        captured = {}
        monkeypatch.setattr(medfoundry.serve.app, "serve", lambda worker, config, **kw: captured.update(config=config))
        assert run(["serve", str(folder), *argv]) == 0
        return captured["config"].model_name

    def stage(folder, kind: str = "pretrain"):
        model = folder / "model"
        model.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"stage": kind, "outputs": {"model": "model"}}))
        return model

    recipe_model = stage(tmp_path / "runs" / "quickstart" / "finetune", "finetune")
    (tmp_path / "runs" / "quickstart" / "run.json").write_text(json.dumps({"recipe": "med-quick"}))
    assert name(recipe_model) == "med-quick"
    assert name(stage(tmp_path / "my-7b")) == "my-7b"  # medfoundry pretrain alone, output_dir my-7b
    (recipe_model / "README.md").write_text("---\nlicense: mit\nmodel-index:\n- name: MedCard-1\n  results: []\n---\n")
    assert name(recipe_model) == "MedCard-1"
    assert name(recipe_model, "--served-model-name", "other") == "other"
    plain = tmp_path / "plain" / "model"
    plain.mkdir(parents=True)
    assert name(plain) == "model"  # no run: the engine's name (the folder's)
    evaluated = stage(tmp_path / "evalish", "eval")  # not a training stage's export
    assert name(evaluated) == "model"
