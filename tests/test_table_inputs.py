"""Parquet files and ``datasets`` save_to_disk folders as corpus and SFT inputs: the same records, documents
and errors as the same rows in JSONL, read in batches (a Parquet file's row groups split across tasks)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import FIXTURES, shared
from medfoundry import limits
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig, FieldMap
from medfoundry.corpus.plan import plan_units
from medfoundry.corpus.readers.base import ReadContext
from medfoundry.corpus.readers.columnar import read_table
from medfoundry.corpus.readers.jsonl import read_jsonl
from medfoundry.errors import ConfigError, InputError
from medfoundry.sft.config import SFTSourceConfig
from medfoundry.sft.dataset import read_source
from medfoundry.sft.formats import read_conversations

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

FIELDS = FieldMap(text=["title", "abstract"], id="pmid", pmid="pmid", meta=["source", "license"])


def _abstracts(n: int) -> list[dict]:
    """Real abstracts, with and without PMID and title (the file's first rows have neither)."""
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(20_000), fh)]
    return rows[:n] + [r for r in rows if r["pmid"] and r["title"]][:n]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict], row_group_size: int = 100) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _read(reader, path: Path, strict: bool = True, **kw):
    ctx = ReadContext(path, strict=strict)
    return list(reader(path, ctx, FIELDS, **kw)), ctx


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tables")
    rows = _abstracts(150)
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    return {
        "rows": rows,
        "jsonl": _jsonl(root / "abstracts.jsonl", rows),
        "parquet": _parquet(root / "abstracts.parquet", rows),
        "saved": root / "saved",
    }


def test_parquet_and_saved_dataset_give_the_jsonl_records(inputs):
    expected, _ = _read(read_jsonl, inputs["jsonl"])
    assert len(expected) == 300 and any(r.native_id is None for r in expected) and expected[-1].meta["pmid"]
    parquet, _ = _read(read_table, inputs["parquet"])
    (arrow_file,) = sorted(inputs["saved"].glob("data-*.arrow"))
    arrow, _ = _read(read_table, arrow_file)
    assert parquet == expected == arrow


def test_parquet_row_groups_split_into_work_units(inputs, tmp_path):
    """3 row groups of 100 rows: 3 tasks, each reading only its own groups, rows numbered as in the file."""
    size_mb = inputs["parquet"].stat().st_size / 2**20
    cfg = validate(
        CorpusConfig,
        {
            "output_dir": str(tmp_path / "out"),
            "split_mb": size_mb / 10,
            "decontam": {"enabled": False},
            "sources": [{"name": "a", "kind": "parquet", "paths": [str(inputs["parquet"])], "fields": {}}],
        },
    )
    units = plan_units(cfg)
    assert [(u.part, u.parts) for u in units] == [(0, 3), (1, 3), (2, 3)]
    whole, _ = _read(read_table, inputs["parquet"])
    parts = [_read(read_table, inputs["parquet"], part=u.part, parts=u.parts)[0] for u in units]
    assert [len(p) for p in parts] == [100, 100, 100]
    assert [p[0].line for p in parts] == [1, 101, 201]
    assert [r for p in parts for r in p] == whole


def test_bad_rows_are_reported_as_for_jsonl(inputs, tmp_path, monkeypatch):
    rows = inputs["rows"][150:153]
    bad = [rows[0], {**rows[1], "title": None, "abstract": None}, rows[2]]
    jsonl_rows = [rows[0], {k: v for k, v in rows[1].items() if k not in ("title", "abstract")}, rows[2]]
    path = _parquet(tmp_path / "bad.parquet", bad)
    kept, ctx = _read(read_table, path, strict=False)
    kept_jsonl, ctx_jsonl = _read(read_jsonl, _jsonl(tmp_path / "bad.jsonl", jsonl_rows), strict=False)
    assert kept == kept_jsonl and [s.line for s in ctx.skips] == [s.line for s in ctx_jsonl.skips] == [2]
    with pytest.raises(InputError, match=r"bad\.parquet:2: none of the text fields"):
        _read(read_table, path)

    monkeypatch.setattr(limits, "MAX_ROW_BYTES", 100_000)
    big = [rows[0], rows[1], {**rows[2], "abstract": "cohort " * 20_000}]
    kept, ctx = _read(read_table, _parquet(tmp_path / "big.parquet", big), strict=False)
    assert [s.line for s in ctx.skips] == [3] and "MAX_ROW_BYTES" in ctx.skips[0].reason and len(kept) == 2


def test_unreadable_files_are_refused_whole(inputs, tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"title": [1, 2], "abstract": [3, 4]}), wrong)
    with pytest.raises(InputError, match="wrong.parquet: text field 'title' is a column of int64"):
        _read(read_table, wrong)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(inputs["parquet"].read_bytes()[:5000])
    kept, ctx = _read(read_table, cut, strict=False)
    assert kept == [] and len(ctx.skips) == 1 and "cut.parquet" in ctx.skips[0].path


def test_dataset_dict_needs_its_split(inputs, tmp_path):
    rows = inputs["rows"]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:200]), "test": datasets.Dataset.from_list(rows[200:])}
    ).save_to_disk(str(tmp_path / "dd"))
    source = {"name": "a", "kind": "arrow", "paths": [str(tmp_path / "dd")], "fields": FIELDS.model_dump()}
    tree = {"output_dir": str(tmp_path / "out"), "decontam": {"enabled": False}, "sources": [source]}
    with pytest.raises(ConfigError, match="a DatasetDict with splits train, test, and no split is set"):
        plan_units(validate(CorpusConfig, tree))
    (unit,) = plan_units(validate(CorpusConfig, {**tree, "sources": [{**source, "split": "test"}]}))
    assert len(_read(read_table, Path(unit.path))[0]) == 100
    with pytest.raises(ConfigError, match="'split' applies to kind arrow sources"):
        validate(CorpusConfig, {**tree, "sources": [{**source, "kind": "jsonl", "split": "test"}]})


def _built_documents(tmp_path: Path, name: str, kind: str, path: Path) -> list[dict]:
    cfg = {
        "output_dir": str(tmp_path / name),
        "workers": 1,
        "strict": False,
        "decontam": {"enabled": False},
        "dedup": {"near": {"enabled": False}},
        "split": {"val_fraction": 0.0},
        "sources": [{"name": "abstracts", "kind": kind, "paths": [str(path)], "fields": FIELDS.model_dump()}],
    }
    build_corpus(validate(CorpusConfig, cfg))
    docs = []
    for shard in sorted((tmp_path / name / "train").glob("part-*.jsonl.gz")):
        with gzip.open(shard, "rt") as fh:
            docs += [json.loads(line) for line in fh]
    return docs


def test_corpus_build_from_tables_equals_the_jsonl_build(inputs, tmp_path):
    """Records with an id field give the same documents; those without one are named by file and row."""
    expected = _built_documents(tmp_path, "jsonl", "jsonl", inputs["jsonl"])
    for kind, path in (("parquet", inputs["parquet"]), ("arrow", inputs["saved"])):
        got = _built_documents(tmp_path, kind, kind, path)
        assert len(got) == len(expected) > 100
        assert sorted(_content(got)) == sorted(_content(expected))
        with_id = [d["id"] for d in expected if d["meta"].get("pmid")]  # shards are ordered by a hash of the line
        assert with_id and [d["id"] for d in got if d["meta"].get("pmid")] == with_id


def _content(docs: list[dict]) -> list[str]:
    return [json.dumps([d["text"], d["meta"], d["source"]]) for d in docs]


# ---------------------------------------------------------------------------------------------- SFT


def _sft_rows(name: str) -> list[dict]:
    path = FIXTURES / "sft" / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["alpaca.jsonl", "messages.json", "sharegpt.jsonl"])
def test_sft_from_parquet_and_saved_dataset_equals_jsonl(name, tmp_path):
    rows = _sft_rows(name)
    rows = list(rows.values()) if isinstance(rows, dict) else rows
    keys = dict.fromkeys(k for row in rows for k in row)  # both take their columns from the first row
    rows = [{k: row.get(k) for k in keys} for row in rows]
    expected = [c.messages for c in read_conversations(FIXTURES / "sft" / name)]
    parquet = _parquet(tmp_path / "x.parquet", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (parquet, tmp_path / "saved"):
        source = validate(SFTSourceConfig, {"name": "s", "path": str(path)})
        assert [c.messages for c in read_source(source)] == expected


def test_sft_table_errors_name_file_and_row(tmp_path):
    rows = [{"instruction": "Define gout.", "output": "A form of arthritis."}, {"instruction": "Define angina."}]
    path = _parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(InputError, match=r"bad\.parquet:2: record is missing its response"):
        list(read_conversations(path))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="splits train, and no split is set"):
        list(read_conversations(tmp_path / "dd"))
    assert len(list(read_conversations(tmp_path / "dd", split="train"))) == 1
