"""`medfoundry push`: on an assembled run directory (pretraining, LoRA fine-tuning, evaluation, card), the dry run
lists exactly the repository's files and sizes; a card with invalid front matter, a pickle, a run without a model
or card fail naming the piece; the real push (HfApi monkeypatched: no network) creates the repository and
uploads one staged folder holding exactly the listed files, in one commit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import EvalResult, HfApi, ModelCardData
from safetensors.numpy import save_file

from medfoundry.cli import main
from medfoundry.manifest import Manifest

REPO_ID = "medfoundry-tests/tiny-sft"


def _model(directory: Path, seed: int) -> Path:
    """An exported model's files (config, weights, tokenizer, the card's README.md copy, a leftover lock)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (directory / "generation_config.json").write_text("{}")
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    save_file(
        {"w": np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)}, directory / "model.safetensors"
    )
    (directory / "README.md").write_text("the card's copy\n")
    (directory / ".lock").write_text("")
    return directory


def _card(metadata: str) -> str:
    return f"---\n{metadata}\n---\n\n# tiny-sft\n\nLoad it: `from_pretrained('{REPO_ID}')`\n"


GOOD_METADATA = ModelCardData(
    model_name="tiny-sft",
    license="apache-2.0",
    language=["en"],
    tags=["medical", "medfoundry"],
    pipeline_tag="text-generation",
    library_name="transformers",
    eval_results=[
        EvalResult(
            task_type="multiple-choice",
            dataset_type="pubmedqa",
            dataset_name="PubMedQA",
            metric_type="acc",
            metric_value=0.5,
        )
    ],
).to_yaml()


@pytest.fixture
def run(tmp_path) -> Path:
    """A run directory as `medfoundry run` leaves it: pretrain, finetune with LoRA, eval of both models, card."""
    run = tmp_path / "run"
    for stage in ("pretrain", "finetune"):
        _model(run / stage / "model", seed=len(stage))
        Manifest(stage=stage).write(run / stage)
    adapter = run / "finetune" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"lora_A": np.ones((2, 8), dtype=np.float32)}, adapter / "adapter_model.safetensors")
    (adapter / "tokenizer.json").write_text("{}")
    models = {
        name: {"path": str(run / stage / "model")} for name, stage in (("model", "finetune"), ("base", "pretrain"))
    }
    Manifest(stage="eval", details={"models": models}).write(run / "eval")
    for name in models:
        for file in ("results.json", "results.md", "samples.jsonl"):
            (run / "eval" / name / file).parent.mkdir(exist_ok=True)
            (run / "eval" / name / file).write_text(f"{name} {file}\n")
    (run / "eval" / "results.md").write_text("comparison\n")
    (run / "MODEL_CARD.md").write_text(_card(GOOD_METADATA))
    return run


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Any call to the Hub fails the test (the real-push test replaces the three it expects)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    for name in ("create_repo", "create_branch", "upload_folder", "upload_file", "create_commit"):
        monkeypatch.setattr(HfApi, name, refuse)


def _expected(run: Path, adapter: bool = True) -> dict[str, Path]:
    """Path in the repository -> source file."""
    model = run / "finetune" / "model"
    files = {
        "README.md": run / "MODEL_CARD.md",
        **{name: model / name for name in ("config.json", "generation_config.json", "model.safetensors")},
        "tokenizer.json": model / "tokenizer.json",
        "eval/results.json": run / "eval" / "model" / "results.json",
        "eval/results.md": run / "eval" / "model" / "results.md",
    }
    if adapter:
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
            files[f"adapter/{name}"] = run / "finetune" / "adapter" / name
    return dict(sorted(files.items()))


def _listing(out: str) -> dict[str, int]:
    """Path in the repository -> size, from the dry run's file lines."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[2:3] == ["B"]]
    return {row[0]: int(row[1].replace(",", "")) for row in rows}


def test_the_dry_run_lists_exactly_the_files_and_sizes(run, capsys):
    assert main(["push", str(run), REPO_ID, "--dry-run", "--include-adapter"]) == 0
    out = capsys.readouterr().out
    expected = _expected(run)
    assert _listing(out) == {path: source.stat().st_size for path, source in expected.items()}
    for path, source in expected.items():
        assert f"  {path} " in out and str(source) in out
    assert f"  {len(expected)} files, {sum(s.stat().st_size for s in expected.values()):,} B" in out
    assert "dry run: nothing uploaded" in out
    assert "card: front matter valid (license apache-2.0)" in out
    assert "note:" not in out  # the card names the repository

    assert main(["push", str(run), "someone/else", "--dry-run", "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert _listing(out).keys() == {p for p in _expected(run, adapter=False) if not p.startswith("eval/")}
    assert "note: the card does not name someone/else" in out


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("license: [apache-2.0, mit]", "front matter license: ['apache-2.0', 'mit'] must be a string"),
        ("license: 42", "front matter license: 42 must be a string"),
        ("tags: [medical, [nested]]", "front matter tags: ['medical', ['nested']] must be a list of strings"),
        ("license: apache-2.0\ntags: [unclosed", "the YAML front matter does not parse"),
        ("- a list", "the front matter is not a YAML mapping"),
        ("license: other", "license: other needs license_name"),
        ("model-index:\n- results: []", "invalid front matter: Invalid `model_index`"),
    ],
)
def test_invalid_card_metadata_fails_the_dry_run(run, capsys, metadata, message):
    (run / "MODEL_CARD.md").write_text(_card(metadata))
    assert main(["push", str(run), REPO_ID, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'MODEL_CARD.md'}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def _break(run: Path, how: str) -> None:
    if how == "pickle":
        (run / "finetune" / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif how == "no model":
        for stage in ("finetune", "pretrain"):
            for file in (run / stage / "model").iterdir():
                file.unlink()
            (run / stage / "model").rmdir()
    elif how == "no card":
        (run / "MODEL_CARD.md").unlink()
    elif how == "unfinished":
        (run / "finetune" / "manifest.json").unlink()
    elif how == "no weights":
        (run / "finetune" / "model" / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("how", "culprit", "message"),
    [
        ("pickle", "finetune/model/pytorch_model.bin", "a pickle file"),
        ("no model", "finetune/model", "not found: the finetune stage exported no full model"),
        ("no card", "MODEL_CARD.md", "not found: write the card first: medfoundry card"),
        ("unfinished", "finetune/manifest.json", "not found: the pretrain or finetune stage has not finished"),
        ("no weights", "finetune/model", "no .safetensors weights"),
    ],
)
def test_a_missing_or_unsafe_piece_is_named(run, capsys, how, culprit, message):
    _break(run, how)
    assert main(["push", str(run), REPO_ID, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / culprit}: {message}"), err


def test_a_run_without_a_training_stage_or_adapter_is_refused(run, capsys):
    assert main(["push", str(run / "eval"), REPO_ID, "--dry-run"]) == 2
    assert "no pretrain/ or finetune/ stage here, so no model to push" in capsys.readouterr().err
    assert main(["push", str(run / "pretrain" / "model"), REPO_ID, "--include-adapter", "--dry-run"]) == 2
    assert "a model directory has no adapter" in capsys.readouterr().err


def test_a_model_directory_or_training_output_pushes_alone(run, capsys):
    model = run / "pretrain" / "model"
    (model / "README.md").write_text(_card(GOOD_METADATA))
    assert main(["push", str(model), REPO_ID, "--dry-run"]) == 0
    listing = _listing(capsys.readouterr().out)
    assert listing == {
        "README.md": (model / "README.md").stat().st_size,
        **{n: (model / n).stat().st_size for n in ("config.json", "generation_config.json", "model.safetensors")},
        "tokenizer.json": (model / "tokenizer.json").stat().st_size,
    }
    (run / "finetune" / "MODEL_CARD.md").write_text(_card(GOOD_METADATA))  # `medfoundry card run/finetune`
    assert main(["push", str(run / "finetune"), REPO_ID, "--dry-run", "--include-adapter"]) == 0
    out = capsys.readouterr().out
    assert {p for p in _listing(out)} == {p for p in _expected(run) if not p.startswith("eval/")}
    assert str(run / "finetune" / "MODEL_CARD.md") in out


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_push_creates_the_repository_and_uploads_the_staged_folder_in_one_commit(run, capsys, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(
            ("upload_folder", kwargs.pop("repo_id"), {**kwargs, "files": _digests(Path(kwargs["folder_path"]))})
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    argv = ["push", str(run), REPO_ID, "--private", "--include-adapter", "--revision", "v1", "--commit-message", "m"]
    assert main(argv) == 0
    assert f"push: uploaded to https://huggingface.co/{REPO_ID}" in capsys.readouterr().out
    (_, repo, created), (_, _, branch), (_, uploaded_to, upload) = calls
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert (repo, uploaded_to) == (REPO_ID, REPO_ID)
    assert created == {"private": True, "exist_ok": True}
    assert branch == {"branch": "v1", "exist_ok": True}
    assert upload["revision"] == "v1" and upload["commit_message"] == "m"
    expected = {path: hashlib.sha256(source.read_bytes()).hexdigest() for path, source in _expected(run).items()}
    assert upload["files"] == expected
    assert not Path(upload["folder_path"]).exists()  # the staging folder is removed


def test_the_push_needs_a_token(run, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(run), REPO_ID]) == 2
    assert "no Hugging Face token: set HF_TOKEN or log in once with `hf auth login`" in capsys.readouterr().err
