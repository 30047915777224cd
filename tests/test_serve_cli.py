"""``generate``, ``chat`` and ``serve`` on the main command line (``generate`` through the stage registry):
prompts from arguments and files, JSONL out, a chat session on piped standard input, and a served model
answering."""

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

import pytest

from medfoundry.cli import build_parser
from medfoundry.errors import ConfigError, InputError
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from medfoundry.manifest import Manifest
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
