"""YAML config loading, ``--set`` overrides and the wording of every configuration error."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfoundry.config import apply_overrides, load_config, validate
from medfoundry.corpus.config import CorpusConfig
from medfoundry.errors import ConfigError

VALID = """\
output_dir: runs/test/corpus
strict: false
sources:
  - name: abstracts
    kind: jsonl
    paths: [data/abstracts.jsonl.gz]
    fields: {text: [title, abstract], id: pmid, pmid: pmid, meta: [source]}
  - name: replay
    kind: jsonl
    paths: [data/replay.jsonl.gz]
    weight: 0.01
  - name: notes
    kind: text
    paths: ["notes/*.txt"]
dedup:
  near: {num_perm: 128, bands: 16}
  precedence: [abstracts, notes]
decontam:
  benchmarks_dir: data/benchmarks
"""


def write(tmp_path: Path, text: str, name: str = "corpus.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(CorpusConfig, path, overrides)
    return str(info.value)


def test_valid_file_loads(tmp_path):
    cfg = load_config(CorpusConfig, write(tmp_path, VALID))
    assert cfg.output_dir == "runs/test/corpus" and cfg.strict is False
    assert [s.name for s in cfg.sources] == ["abstracts", "replay", "notes"]
    assert cfg.sources[0].fields.text == ["title", "abstract"] and cfg.sources[0].fields.pmid == "pmid"
    assert cfg.sources[1].weight == 0.01 and cfg.sources[0].weight is None
    assert cfg.sources[1].fields.text == ["text"]  # default field map
    assert cfg.clean.language == "en" and cfg.dedup.near.threshold == 0.8  # defaults
    assert cfg.source_rank() == {"abstracts": 0, "notes": 1, "replay": 2}


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = write(tmp_path, VALID)
    cfg = load_config(
        CorpusConfig,
        path,
        [
            "dedup.near.threshold=0.7",
            "sources.0.weight=0.5",
            "clean.language=null",
            "workers=3",
            "sources.2.paths=[a.txt, b.txt]",
            "decontam.sets=[medqa]",
        ],
    )
    assert cfg.dedup.near.threshold == 0.7
    assert cfg.sources[0].weight == 0.5
    assert cfg.clean.language is None
    assert cfg.workers == 3
    assert cfg.sources[2].paths == ["a.txt", "b.txt"]
    assert cfg.decontam.sets == ["medqa"]
    assert cfg.dedup.near.num_perm == 128  # siblings of an overridden key are kept


def test_apply_overrides_on_tree():
    tree = {"sources": [{"name": "a"}], "clean": {"language": "en"}}
    out = apply_overrides(tree, ["sources.0.weight=0.5", "clean.language=null", "new.section.key=true", "x= 3 "])
    assert out is tree
    assert tree == {
        "sources": [{"name": "a", "weight": 0.5}],
        "clean": {"language": None},
        "new": {"section": {"key": True}},
        "x": 3,
    }
    assert apply_overrides({}, ["name=a=b"]) == {"name": "a=b"}  # only the first '=' splits


def test_overrides_without_a_file():
    cfg = load_config(
        CorpusConfig,
        None,
        ["output_dir=out", "sources=[{name: s, kind: text, paths: [x.txt]}]", "decontam.enabled=false"],
    )
    assert cfg.output_dir == "out" and cfg.sources[0].kind == "text"
    msg = error_of(None, ["output_dir=out", "decontam.enabled=false"])
    assert msg == "<overrides>: invalid configuration\n  sources: required field is missing"


# ---------------------------------------------------------------- error messages


def test_misspelled_key_did_you_mean(tmp_path):
    path = write(tmp_path, VALID.replace("strict:", "strcit:"))
    assert error_of(path) == f"{path}: invalid configuration\n  strcit: unknown field; did you mean 'strict'?"

    nested = write(tmp_path, VALID.replace("    weight: 0.01", "    wieght: 0.01"), "nested.yaml")
    assert f"{nested}: invalid configuration" in error_of(nested)
    assert "  sources.1.wieght: unknown field; did you mean 'weight'?" in error_of(nested)

    msg = error_of(path.with_name("corpus.yaml"), ["dedup.near.treshold=0.5", "strcit=false"])
    assert "  dedup.near.treshold: unknown field; did you mean 'threshold'?" in msg


def test_unknown_key_without_close_match_lists_fields(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["clean.zzz=1"])
    assert msg.startswith(f"{path}: invalid configuration\n  clean.zzz: unknown field; valid fields: unicode_form, ")
    assert "language_threshold" in msg


def test_wrong_type_names_field_and_value(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["clean.min_chars=lots"])
    assert msg.startswith(f"{path}: invalid configuration\n")
    assert "  clean.min_chars: Input should be a valid integer" in msg and "(got 'lots')" in msg

    msg = error_of(path, ["sources.0.kind=xml"])
    kinds = "'pubmed_xml', 'jats', 'guidelines', 'jsonl', 'parquet', 'arrow' or 'text'"
    assert f"  sources.0.kind: Input should be {kinds} (got 'xml')" in msg

    msg = error_of(path, ["dedup.near.threshold=1.5"])
    assert "  dedup.near.threshold: Input should be less than or equal to 1 (got 1.5)" in msg


def test_missing_required_field(tmp_path):
    path = write(tmp_path, VALID.replace("output_dir: runs/test/corpus\n", ""))
    assert error_of(path) == f"{path}: invalid configuration\n  output_dir: required field is missing"

    path = write(tmp_path, VALID.replace("    paths: [data/replay.jsonl.gz]\n", ""), "nopaths.yaml")
    assert error_of(path) == f"{path}: invalid configuration\n  sources.1.paths: required field is missing"


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "output_dir: out\nsources:\n  - name: a\n    kind: [jsonl\n    paths: [x]\nstrict: true\n")
    assert error_of(path) == f"{path}:5: not valid YAML: expected ',' or ']', but got ':'"

    path = write(tmp_path, "output_dir: out\n\tstrict: true\n", "tab.yaml")
    assert error_of(path) == f"{path}:2: not valid YAML: found character '\\t' that cannot start any token"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"output_dir: out\n# caf\xe9\n")
    assert error_of(path).startswith(f"{path}:2: not UTF-8 text (")


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- output_dir: out\n- sources: []\n")
    assert error_of(path) == f"{path}: expected a mapping at the top level, got list"
    path = write(tmp_path, "just a string\n", "str.yaml")
    assert error_of(path) == f"{path}: expected a mapping at the top level, got str"


def test_empty_file_reports_missing_fields(tmp_path):
    path = write(tmp_path, "")
    assert error_of(path) == (
        f"{path}: invalid configuration\n  output_dir: required field is missing\n  sources: required field is missing"
    )


def test_nonexistent_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: config file not found"
    assert error_of(tmp_path) == f"{tmp_path}: config file not found"  # a directory is not a config file


def test_num_perm_multiple_of_bands(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["dedup.near.num_perm=100"])
    assert (
        msg
        == f"{path}: invalid configuration\n  dedup.near: Value error, num_perm (100) must be a multiple of bands (16)"
    )


def test_duplicate_source_names(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["sources.2.name=abstracts"])
    assert msg == (
        f"{path}: invalid configuration\n  <root>: Value error, source names must be unique; repeated: ['abstracts']"
    )


def test_precedence_unknown_source(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["dedup.precedence=[abstracts, papers]"])
    assert msg == (
        f"{path}: invalid configuration\n  <root>: Value error, dedup.precedence names unknown sources ['papers']; "
        "sources are ['abstracts', 'replay', 'notes']"
    )


def test_weights_must_leave_room_for_unweighted_sources(tmp_path):
    path = write(tmp_path, VALID)
    msg = error_of(path, ["sources.0.weight=0.995"])
    assert "weights of weighted sources must sum below 1 when some sources have no weight" in msg
    assert "got 1.005" in msg


def test_override_errors(tmp_path):
    path = write(tmp_path, VALID)
    assert error_of(path, ["dedup.near.threshold"]) == (
        "override 'dedup.near.threshold': expected KEY=VALUE, e.g. dedup.near.threshold=0.7"
    )
    assert error_of(path, ["sources.9.weight=0.5"]) == (
        "override 'sources.9.weight=0.5': cannot set 'sources.9.weight' (list index out of range)"
    )
    assert error_of(path, ["sources.first.weight=0.5"]).startswith(
        "override 'sources.first.weight=0.5': cannot set 'sources.first.weight' (invalid literal for int()"
    )
    assert error_of(path, ["output_dir.x=1"]).startswith("override 'output_dir.x=1': cannot set 'output_dir.x' (")
    msg = error_of(path, ["decontam.sets=[medqa"])
    assert msg.startswith("override 'decontam.sets=[medqa': value is not valid YAML: ")


def test_validate_directly():
    tree = {"output_dir": "o", "sources": [{"name": "bad name", "kind": "text", "paths": ["x"]}]}
    with pytest.raises(ConfigError) as info:
        validate(CorpusConfig, tree, "cli")
    assert str(info.value).startswith("cli: invalid configuration\n  sources.0.name: String should match pattern")
    assert "(got 'bad name')" in str(info.value)
    cfg = validate(
        CorpusConfig,
        {
            "output_dir": "o",
            "sources": [{"name": "ok", "kind": "text", "paths": ["x"]}],
            "decontam": {"enabled": False},
        },
    )
    assert cfg.work_path == Path("o") / ".work"


def test_decontamination_needs_its_benchmarks(tmp_path, monkeypatch):
    """Named in the config or by $MEDFOUNDRY_BENCHMARKS, the folder eval reads (and the SFT overlap check)."""
    from medfoundry.sft.config import SFTDataConfig

    monkeypatch.delenv("MEDFOUNDRY_BENCHMARKS", raising=False)
    path = write(tmp_path, VALID.replace("decontam:\n  benchmarks_dir: data/benchmarks\n", ""))
    msg = error_of(path)
    assert "decontam.benchmarks_dir is required" in msg and "MEDFOUNDRY_BENCHMARKS" in msg
    assert "decontam.enabled: false" in msg
    assert load_config(CorpusConfig, path, ["decontam.enabled=false"]).decontam.enabled is False
    monkeypatch.setenv("MEDFOUNDRY_BENCHMARKS", str(tmp_path / "benchmarks"))
    assert load_config(CorpusConfig, path).decontam.benchmarks_dir == str(tmp_path / "benchmarks")
    sft = {"tokenizer": "t", "sources": [{"name": "a", "path": "a.jsonl"}]}
    assert validate(SFTDataConfig, sft).overlap.benchmarks_dir == str(tmp_path / "benchmarks")
    # where the folder is not read, the variable changes nothing (nor a recipe stage's key)
    assert load_config(CorpusConfig, path, ["decontam.enabled=false"]).decontam.benchmarks_dir is None
    assert validate(SFTDataConfig, {**sft, "allow_test_overlap": True}).overlap.benchmarks_dir is None
