"""The one manifest and the one input fingerprint: a manifest round-trips and a bad one is an error naming its
file; fingerprints follow content (by="content") or modification time (by="stat"); the stage registry has every
stage the recipe runs, and the CLI a command for each."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from medfoundry import __version__
from medfoundry.errors import InputError
from medfoundry.manifest import HashCache, Manifest, content_key, inputs_fingerprint, output_fingerprint

FULL = {
    "stage": "tokens",
    "medfoundry_version": __version__,
    "key": None,
    "config": {},
    "inputs": {},
    "outputs": {},
    "counts": {},
    "timings": {},
    "details": {},
}


def _manifest(**fields) -> Manifest:
    return Manifest(stage="tokens", config={"dtype": "auto"}, counts={"train_tokens": 3}, **fields)


def test_a_manifest_round_trips_with_the_package_version(tmp_path):
    written = _manifest(key="k1", inputs={"corpus": "abc"}, timings={"total_s": 1.5}, details={"dtype": "uint16"})
    path = written.write(tmp_path)
    assert path == tmp_path / "manifest.json" and not list(tmp_path.glob(".*.tmp"))  # atomic: no leftover
    raw = json.loads(path.read_text())
    assert raw["medfoundry_version"] == __version__ and "version" not in raw
    assert Manifest.read(tmp_path, "tokens") == written
    assert Manifest.current(tmp_path, "k1") == written and Manifest.current(tmp_path, "k2") is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found: the tokens stage has not finished"),
        ("{", "invalid JSON"),
        ("[]", "expected a JSON object, got list"),
        (json.dumps({**FULL, "build_key": "x"}), "not a medfoundry manifest: build_key: Extra inputs"),
        (json.dumps({**FULL, "counts": {"tokens": 1.5}}), "not a medfoundry manifest: counts.tokens: Input should be"),
        ('{"stage": "tokens", "config": {}}', "not a medfoundry manifest: no medfoundry_version, key, inputs, outputs"),
        (json.dumps({**FULL, "stage": "corpus"}), "written by the corpus stage, expected tokens"),
    ],
)
def test_a_bad_manifest_is_an_error_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(InputError, match=f"{tmp_path / 'manifest.json'}(:1)?: {message}"):
        Manifest.read(tmp_path, "tokens")
    assert Manifest.current(tmp_path, "any") is None  # an unreadable manifest means: build again


def test_content_fingerprints_follow_content_not_place_or_time(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("ignored")  # hidden: temporaries and caches
    first = inputs_fingerprint(model)
    assert len(first) == 32
    moved = shutil.copytree(model, tmp_path / "elsewhere")
    os.utime(moved / "weights.bin", ns=(1, 1))
    assert inputs_fingerprint(moved) == first  # copied, touched: the same content
    (moved / "README.md").write_text("a card")
    assert inputs_fingerprint(moved, skip=lambda name: name == "README.md") == first
    assert inputs_fingerprint(moved) != first
    (model / "weights.bin").write_bytes(b"\1" + b"\0" * 999)  # same size, other content
    assert inputs_fingerprint(model) != first
    assert inputs_fingerprint(model, names=["config.json", "absent.json"]) == inputs_fingerprint(
        moved, names=["config.json"]
    )
    with pytest.raises(InputError, match="missing: not found"):
        inputs_fingerprint(tmp_path / "missing")


def test_stat_fingerprints_change_when_a_file_is_touched(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text("{}\n")
    before = inputs_fingerprint(source, by="stat")
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert inputs_fingerprint(source, by="stat") != before
    assert inputs_fingerprint(tmp_path / "*.jsonl", by="stat") != inputs_fingerprint(tmp_path / "*.json", by="stat")


def test_the_hash_cache_remembers_digests_across_runs(tmp_path):
    data = tmp_path / "big.bin"
    data.write_bytes(b"x" * 5000)
    with HashCache(tmp_path / "hashes.json") as hashes:
        first = inputs_fingerprint(data, hashes=hashes)
    remembered = json.loads((tmp_path / "hashes.json").read_text())
    assert len(remembered) == 1 and next(iter(remembered)).startswith(str(data.resolve()))
    with HashCache(tmp_path / "hashes.json") as hashes:
        assert inputs_fingerprint(data, hashes=hashes) == first


def test_an_output_is_fingerprinted_by_its_manifest(tmp_path):
    _manifest(key="one").write(tmp_path)
    first = output_fingerprint(tmp_path)
    (tmp_path / "train.bin").write_bytes(b"not looked at")
    assert output_fingerprint(tmp_path) == first
    _manifest(key="two").write(tmp_path)
    assert output_fingerprint(tmp_path) != first
    assert content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})


def test_the_registry_has_every_recipe_stage_and_the_cli_a_command_for_each():
    from medfoundry.cli import build_parser
    from medfoundry.recipe.config import STAGES as RECIPE_STAGES
    from medfoundry.stages import STAGES

    assert set(RECIPE_STAGES) <= set(STAGES) and "tokenizer_extend" in STAGES
    parser = build_parser()
    for stage in STAGES.values():
        assert stage.config.__name__.endswith("Config")
        if stage.name == "generate":  # a command with generation's flags (model and prompts), no config file
            assert parser.parse_args(["generate", "model", "a prompt"]).prompts == ["a prompt"]
            continue
        argv = ["eval", "--model", "m"] if stage.name == "eval" else [*stage.command, "x.yaml"]
        assert parser.parse_args(argv).stage_name == stage.name
