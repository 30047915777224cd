"""The `medfoundry` command as a user runs it: download PubMed from a (local) NCBI mirror, then build
the quickstart corpus from what was downloaded; errors come out as one clear line."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, shared

ENV = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1", "no_proxy": "127.0.0.1"}


def medfoundry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medfoundry", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def ncbi_mirror(tmp_path):
    """A loopback HTTP server laid out like NCBI's pubmed/baseline, holding the real legacy MEDLINE file."""
    baseline = tmp_path / "mirror" / "pubmed" / "baseline"
    baseline.mkdir(parents=True)
    name = "medline16n0902.xml.gz"
    shutil.copy(shared(f"corpus/pubmed_xml/{name}"), baseline / name)
    digest = hashlib.md5((baseline / name).read_bytes()).hexdigest()
    (baseline / f"{name}.md5").write_text(f"MD5({name})= {digest}\n")
    handler = functools.partial(_Quiet, directory=str(tmp_path / "mirror"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/pubmed"
    httpd.shutdown()
    httpd.server_close()


def test_download_then_build_the_fallback_quickstart(ncbi_mirror, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "corpus"
    done = medfoundry(
        "corpus", "download", "pubmed", "--dest", str(raw), "--base-url", ncbi_mirror, "--limit", "1", "--quiet"
    )
    assert done.returncode == 0, done.stderr
    assert "1 downloaded" in done.stdout and (raw / "baseline" / "medline16n0902.xml.gz").is_file()
    again = medfoundry(
        "corpus", "download", "pubmed", "--dest", str(raw), "--base-url", ncbi_mirror, "--limit", "1", "--quiet"
    )
    assert "1 already verified" in again.stdout

    built = medfoundry(
        "corpus",
        "build",
        "recipes/quickstart_corpus_download.yaml",
        "--set",
        f"output_dir={out}",
        "--set",
        f"sources.1.paths=[{raw}/baseline/*.xml.gz]",
    )
    assert built.returncode == 0, built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["per_source"]["read"]["pubmed"] == 604  # every citation, 78 of them title-only
    assert manifest["details"]["dropped"]["read/no_abstract"]["pubmed"] == 78
    assert manifest["counts"]["documents_train"] + manifest["counts"]["documents_val"] > 500
    with gzip.open(next((out / "train").glob("part-*.jsonl.gz")), "rt") as fh:
        doc = json.loads(fh.readline())
    assert set(doc) == {"id", "text", "source", "meta"}


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "output_dir: x\nsources:\n  - name: a\n    kind: jsonl\n    paths: [nowhere/*.jsonl]\n    wieght: 0.5\n"
    )
    result = medfoundry("corpus", "build", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: invalid configuration")
    assert "sources.0.wieght: unknown field; did you mean 'weight'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_input_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "output_dir: x\ndecontam: {enabled: false}\nsources:\n  - {name: a, kind: jsonl, paths: [nowhere/*.jsonl]}\n"
    )
    result = medfoundry("corpus", "build", str(cfg))
    assert result.returncode == 2 and "sources[a].paths: 'nowhere/*.jsonl' matches no file" in result.stderr


def test_tokenizer_train_then_tokenize(tmp_path):
    """corpus -> `medfoundry tokenizer train` -> `medfoundry tokenize` -> shards that decode to the corpus."""
    from tokenizers import Tokenizer

    from medfoundry.tokenizer.token_shards import TokenShards
    from test_tokenizer_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus", 1500, 100)
    trained = medfoundry(
        "tokenizer",
        "train",
        "recipes/quickstart_tokenizer.yaml",
        "--set",
        f"corpus_dir={corpus}",
        "--set",
        f"output_dir={tmp_path / 'tok'}",
        "--set",
        "vocab_size=3000",
        "--set",
        "fertility.top_domain_words=3",
    )
    assert trained.returncode == 0, trained.stderr
    assert "tokenizer: 3,000 tokens" in trained.stdout and "vs gpt2" in trained.stdout
    packed = medfoundry(
        "tokenize",
        "recipes/quickstart_tokens.yaml",
        "--set",
        f"corpus_dir={corpus}",
        "--set",
        f"tokenizer_dir={tmp_path / 'tok'}",
        "--set",
        f"output_dir={tmp_path / 'tokens'}",
    )
    assert packed.returncode == 0, packed.stderr
    assert "uint16" in packed.stdout
    shards = TokenShards(tmp_path / "tokens" / "val")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    with gzip.open(corpus / "val" / "part-00000.jsonl.gz", "rt") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    assert shards.num_docs == 100 and shards.eos_id == tok.token_to_id("<|endoftext|>")
    assert [tok.decode(shards.document(i).tolist()) for i in range(100)] == texts


@pytest.mark.parametrize(
    "raised, code, stream, text",
    [
        ("pending", 75, "out", "pending: slurm job 7 is still pending (exit code 75)"),
        ("launch", 3, "err", "error: pretrain: torchrun exited with code 3"),
        ("config", 2, "err", "error: stages.x: bad"),
        ("input", 2, "err", "error: data.jsonl:3: not JSON"),
        ("failed", 1, "err", "error: 3 steps in a row had a non-finite loss"),
    ],
)
def test_exit_codes(monkeypatch, capsys, tmp_path, raised, code, stream, text):
    """0 done, 1 a stage failed, 2 a usage or input error, 75 (EX_TEMPFAIL) work handed to Slurm not finished yet
    (the same command again continues), and a failed torchrun's own exit code."""
    from medfoundry import cli
    from medfoundry.errors import ConfigError, InputError, Pending, StageFailed
    from medfoundry.recipe import runner
    from medfoundry.train.launch import LaunchFailed

    errors = {
        "pending": Pending("slurm job 7 is still pending"),
        "launch": LaunchFailed("pretrain: torchrun exited with code 3", 3),
        "config": ConfigError("stages.x: bad"),
        "input": InputError("data.jsonl", "not JSON", line=3),
        "failed": StageFailed("3 steps in a row had a non-finite loss"),
    }

    def run_recipe(*args, **kwargs):
        raise errors[raised]

    monkeypatch.setattr(runner, "run_recipe", run_recipe)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nrun_dir: {tmp_path / 'run'}\nstages: {{tokens: {{}}}}\n")
    assert cli.main(["run", str(recipe)]) == code
    assert text in getattr(capsys.readouterr(), stream)


def test_usage_errors_exit_2():
    from medfoundry import cli

    with pytest.raises(SystemExit) as unknown:
        cli.main(["no-such-command"])
    with pytest.raises(SystemExit) as missing:
        cli.main(["corpus", "build"])
    assert unknown.value.code == missing.value.code == 2


def test_a_slurm_corpus_build_still_pending_exits_75(tmp_path):
    """`medfoundry corpus build CONFIG && medfoundry tokenize ...` stops after the build while its Slurm jobs are
    queued or running: 75 (EX_TEMPFAIL) on submission and on a re-run while squeue lists the job; nothing written."""
    import yaml

    from test_corpus_build import FAKE_SLURM

    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} about sepsis. " * 20}) + "\n" for i in range(8))
    )
    out = tmp_path / "corpus"
    config = tmp_path / "corpus.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "sources": [{"name": "docs", "kind": "jsonl", "paths": [str(docs)]}],
                "decontam": {"enabled": False},
                "report_tokenizer": None,
                "executor": {"kind": "slurm", "slurm": {"partition": "bio"}},
            }
        )
    )
    env = {
        **ENV,
        "PATH": f"{FAKE_SLURM}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path / "slurm"),
        "FAKE_SLURM_RUN": "0",  # submitted, never run: the tasks stay pending
    }
    for active in ("0", "1"):  # just submitted; then re-run while squeue lists the job
        chained = subprocess.run(
            [
                "sh",
                "-c",
                f"{shlex.quote(sys.executable)} -m medfoundry corpus build {shlex.quote(str(config))} && echo NEXT",
            ],
            cwd=REPO,
            env={**env, "FAKE_SLURM_ACTIVE": active},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chained.returncode == 75, chained.stdout + chained.stderr[-3000:]
        assert "pending: " in chained.stdout and "(exit code 75)" in chained.stdout
        assert "NEXT" not in chained.stdout
    assert "slurm job 1000 is still running" in chained.stdout
    assert not (out / "manifest.json").exists()


def test_training_commands_take_the_launch_flags():
    from medfoundry.cli import build_parser

    for stage in ("pretrain", "finetune"):
        args = build_parser().parse_args(
            [stage, "c.yaml", "--nproc-per-node", "8", "--nnodes", "2", "--rdzv-endpoint", "node1:29500"]
        )
        assert (args.nproc_per_node, args.nnodes, args.rdzv_endpoint) == (8, 2, "node1:29500")
    assert build_parser().parse_args(["pretrain", "c.yaml"]).nproc_per_node == 1
