"""End to end: `corpus build` on real abstracts with planted duplicates, contamination and bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash
import yaml

from conftest import REPO, shared
from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.errors import InputError, Pending


def _abstracts(n: int) -> list[dict]:
    out = []
    with gzip.open(shared("corpus/pubmed_abstracts.jsonl.gz"), "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["pmid"] and len(rec["abstract"]) > 600:
                out.append(rec)
            if len(out) == n:
                return out
    return out


def _replay(n: int) -> list[dict]:
    with gzip.open(shared("corpus/general_replay.jsonl.gz"), "rt") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def _pubmedqa_test_doc() -> tuple[str, dict]:
    pqal = json.loads(shared("benchmarks/pubmedqa/ori_pqal.json").read_text())
    test = json.loads(shared("benchmarks/pubmedqa/test_ground_truth.json").read_text())
    pmid = sorted(test)[0]
    return pmid, pqal[pmid]


def _write_jsonl(path: Path, records: list, raw_lines: tuple[str, ...] = ()) -> None:
    with gzip.open(path, "wt") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Input files: 300 real abstracts over 3 files, with planted duplicates, contamination and faults."""
    root = tmp_path_factory.mktemp("inputs")
    docs = _abstracts(300)
    exact = dict(docs[10], pmid="90000001", abstract=docs[10]["abstract"].upper().replace(". ", ".  "))
    words = docs[20]["abstract"].split()
    near = dict(docs[20], pmid="90000002", abstract=" ".join(words[:-3] + ["in", "this", "cohort."]))
    pmid, item = _pubmedqa_test_doc()
    contaminated_ctx = {
        "pmid": None,
        "title": "Planted",
        "abstract": " ".join(item["CONTEXTS"]),
        "source": "planted",
        "license": "x",
    }
    contaminated_id = {
        "pmid": pmid,
        "title": "Planted by id",
        "abstract": docs[30]["abstract"][::-1].replace(".", " "),
        "source": "planted",
        "license": "x",
    }
    french = {
        "pmid": "90000003",
        "title": "Étude",
        "abstract": (
            "Les patients atteints de diabète de type 2 ont été suivis pendant "
            "cinq ans dans une étude de cohorte prospective menée dans trois hôpitaux universitaires. "
        )
        * 4,
        "source": "planted",
        "license": "x",
    }
    files = [docs[:100], docs[100:200] + [exact, near], docs[200:] + [contaminated_ctx, contaminated_id, french]]
    for i, recs in enumerate(files):
        _write_jsonl(root / f"abstracts_{i}.jsonl.gz", recs, raw_lines=("{not json",) if i == 2 else ())
    _write_jsonl(root / "replay.jsonl.gz", _replay(40))
    return {"root": root, "docs": docs, "pubmedqa_pmid": pmid}


def _config(planted: dict, out: Path, **extra) -> dict:
    root = planted["root"]
    cfg = {
        "output_dir": str(out),
        "workers": 2,
        "strict": False,
        "sources": [
            {
                "name": "abstracts",
                "kind": "jsonl",
                "paths": [str(root / "abstracts_*.jsonl.gz")],
                "fields": {"text": ["title", "abstract"], "id": "pmid", "pmid": "pmid", "meta": ["source"]},
            },
            {
                "name": "replay",
                "kind": "jsonl",
                "paths": [str(root / "replay.jsonl.gz")],
                "fields": {"text": ["text"], "meta": ["source"]},
                "weight": 0.05,
            },
        ],
        "decontam": {"benchmarks_dir": str(shared("benchmarks"))},
        "split": {"val_fraction": 0.05},
        "output": {"shard_docs": 100},
        "report_tokenizer": str(shared("tokenizers/gpt2")),
    }
    cfg.update(extra)
    return cfg


def _read_split(out: Path, split: str) -> dict[str, dict]:
    docs = {}
    for shard in sorted((out / split).glob("part-*.jsonl.gz")):
        with gzip.open(shard, "rt") as fh:
            for line in fh:
                doc = json.loads(line)
                assert doc["id"] not in docs, f"duplicate id {doc['id']}"
                docs[doc["id"]] = doc
    return docs


@pytest.fixture(scope="module")
def built(planted, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "corpus"
    manifest = build_corpus(validate(CorpusConfig, _config(planted, out)))
    return out, manifest


def _drops(out: Path) -> list[dict]:
    with gzip.open(out / "dropped.jsonl.gz", "rt") as fh:
        return [json.loads(line) for line in fh]


def test_planted_duplicates_are_removed(built):
    out, _ = built
    by_id = {d["id"]: d for d in _drops(out)}
    assert by_id["abstracts/90000001"]["reason"] == "exact_duplicate"
    assert by_id["abstracts/90000002"]["reason"] == "near_duplicate"
    kept = {**_read_split(out, "train"), **_read_split(out, "val")}
    assert "abstracts/90000001" not in kept and "abstracts/90000002" not in kept


def test_planted_contamination_is_removed_and_reported(built, planted):
    out, _ = built
    drops = [d for d in _drops(out) if d["stage"] == "decontaminate"]
    reasons = {d["id"]: d["reason"] for d in drops}
    assert reasons[f"abstracts/{planted['pubmedqa_pmid']}"] == "pubmedqa_test_pmid"
    assert "ngram_overlap" in reasons.values()
    report = (out / "report.md").read_text()
    assert f"abstracts/{planted['pubmedqa_pmid']}" in report and "pubmedqa" in report


def test_filters_and_bad_input_are_counted_never_silent(built):
    out, manifest = built
    drops = _drops(out)
    assert any(d["id"] == "abstracts/90000003" and d["reason"] == "not_english" for d in drops)
    skipped = [d for d in drops if d["stage"] == "read"]
    assert len(skipped) == 1 and "abstracts_2.jsonl.gz:" in skipped[0]["detail"] and "JSON" in skipped[0]["detail"]
    kept = len(_read_split(out, "train")) + len(_read_split(out, "val"))
    replay_copies = manifest.details["per_source"]["train"]["replay"]["docs"]
    read = manifest.counts["documents_in"]
    distinct_kept = (
        kept - replay_copies + len({i.split("#")[0] for i in _read_split(out, "train") if i.startswith("replay/")})
    )
    assert read == 300 + 5 + 1 + 40  # documents + planted + the bad line + replay
    assert distinct_kept + len(drops) == read  # every document read is in the output or listed with its reason
    downsampled = [d for d in drops if d["reason"] == "downsampled"]
    assert downsampled and all(d["source"] == "replay" for d in downsampled)


def test_mixture_hits_requested_share(built):
    _, manifest = built
    replay = manifest.details["mixture"]["replay"]
    assert replay["requested_share"] == 0.05
    # sized around the anchor (abstracts, taken whole), exact to within one replay document
    anchor = manifest.details["mixture"]["abstracts"]["achieved_chars"]
    target = 0.05 * anchor / 0.95
    largest = max(len(r["text"]) for r in _replay(40))
    assert abs(replay["achieved_chars"] - target) <= largest / 2
    assert manifest.details["mixture"]["abstracts"]["factor"] == 1
    # token counts of the written train split (GPT-2 tokenizer), beside the character shares
    tokens = {name: m["achieved_tokens"] for name, m in manifest.details["mixture"].items()}
    assert tokens["abstracts"] > manifest.details["mixture"]["abstracts"]["achieved_chars"] / 8
    assert sum(m["achieved_token_share"] for m in manifest.details["mixture"].values()) == pytest.approx(1.0)
    assert manifest.details["per_source"]["train"]["replay"]["tokens"] == tokens["replay"]
    assert (built[0] / "composition.png").stat().st_size > 5000


def test_val_has_the_train_mixture_and_shards_are_shuffled(built):
    out, _manifest = built
    val = _read_split(out, "val")
    val_chars = sum(len(d["text"]) for d in val.values())
    replay_chars = sum(len(d["text"]) for d in val.values() if d["source"] == "replay")
    largest = max(len(r["text"]) for r in _replay(40))
    assert replay_chars / val_chars <= 0.05 + largest / val_chars  # not the 1-in-20 of all replay documents
    with gzip.open(next((out / "train").glob("part-*.jsonl.gz")), "rb") as fh:
        lines = fh.readlines()
    keys = [xxhash.xxh64_intdigest(line, seed=1234) for line in lines]
    assert keys == sorted(keys)  # the seeded shuffle order ...
    orders = [
        int(json.loads(line)["id"].split("/")[1].split("#")[0]) for line in lines if b'"source": "abstracts"' in line
    ]
    assert orders != sorted(orders)  # ... which is not read order


def test_split_is_disjoint_and_deterministic(built, planted, tmp_path):
    out, manifest = built
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert val and not {i.split("#")[0] for i in train} & set(val)
    again = build_corpus(validate(CorpusConfig, _config(planted, tmp_path / "again", workers=1)))
    assert _read_split(tmp_path / "again", "train") == train and _read_split(tmp_path / "again", "val") == val
    assert again.details["mixture"] == manifest.details["mixture"]


def test_unchanged_build_is_a_no_op(built, planted):
    out, manifest = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.gz")}
    again = build_corpus(validate(CorpusConfig, _config(planted, out)))
    assert again.key == manifest.key
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.gz")} == before


def test_strict_mode_names_file_and_line(planted, tmp_path):
    with pytest.raises(InputError, match=r"abstracts_2\.jsonl\.gz:\d+: not valid JSON"):
        build_corpus(validate(CorpusConfig, _config(planted, tmp_path / "strict", strict=True, workers=1)))
    assert not (tmp_path / "strict" / "manifest.json").exists()


def _cli(cfg_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medfoundry", "corpus", "build", str(cfg_path), *extra]


@pytest.fixture(scope="module")
def many_parts(planted, tmp_path_factory) -> dict:
    """The planted abstracts in 30 input files (a task each), and the corpus a clean build makes of them."""
    root = tmp_path_factory.mktemp("many")
    (root / "in").mkdir()
    docs = planted["docs"]
    for i in range(30):
        _write_jsonl(root / "in" / f"part_{i:02d}.jsonl.gz", docs[i * 10 : (i + 1) * 10])
    cfg = _config(planted, root / "ref", workers=1)
    cfg["sources"][0]["paths"] = [str(root / "in" / "*.jsonl.gz")]
    build_corpus(validate(CorpusConfig, cfg))
    return {"config": cfg, "splits": {split: _read_split(root / "ref", split) for split in ("train", "val")}}


@pytest.mark.parametrize("kill_when", ["extract", "scatter", "finalize"])
def test_build_killed_resumes_without_loss_or_duplication(many_parts, tmp_path, kill_when):
    """SIGKILL the build mid-extract (some tasks done), mid-scatter (some of the write stage's tasks done)
    or while shards are gathered, re-run: same output as a clean build."""
    cfg = dict(many_parts["config"], output_dir=str(tmp_path / "out"))
    cfg_path = tmp_path / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MEDFOUNDRY_NO_TCMALLOC": "1"}
    proc = subprocess.Popen(
        _cli(cfg_path), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    work = tmp_path / "out" / ".work"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list(work.glob("extract-*/logs/completions/*"))
        scattered = list(work.glob("extract-*/write-*/logs-scatter/completions/*"))
        staging = list((tmp_path / "out").glob(".staging-*/train/.part-*"))
        if (
            (kill_when == "extract" and 3 <= len(done) < 31)
            or (kill_when == "scatter" and 3 <= len(scattered) < 31)
            or (kill_when == "finalize" and staging)
        ):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (tmp_path / "out" / "manifest.json").exists()
    if kill_when == "extract":
        assert 3 <= len(list(work.glob("extract-*/logs/completions/*"))) < 31
    subprocess.run(_cli(cfg_path), cwd=REPO, env=env, check=True, capture_output=True)
    for split in ("train", "val"):
        assert _read_split(tmp_path / "out", split) == many_parts["splits"][split]
    assert not list((tmp_path / "out").glob(".staging-*"))


FAKE_SLURM = Path(__file__).parent / "fixtures" / "fake_slurm"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch/srun/squeue/scontrol stand-ins first on PATH; the venv's datatrove scripts after them."""
    state = tmp_path / "slurm_state"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("MEDFOUNDRY_NO_TCMALLOC", "1")
    return state


def _slurm_config(planted, out: Path) -> CorpusConfig:
    cfg = _config(
        planted,
        out,
        executor={
            "kind": "slurm",
            "slurm": {"partition": "bio", "time": "01:00:00", "sbatch_args": {"account": "medlab"}},
        },
    )
    return validate(CorpusConfig, cfg)


def test_slurm_executor_submits_then_finalizes_on_rerun(planted, built, tmp_path, fake_slurm, monkeypatch):
    """The same config on a cluster: the first run submits an array job and returns; a re-run while
    squeue lists it submits nothing; after the tasks ran, a re-run finalizes the same corpus as locally."""
    out = tmp_path / "cluster"
    monkeypatch.setenv("FAKE_SLURM_RUN", "0")
    with pytest.raises(Pending, match="4 of 4 extract tasks are not finished"):
        build_corpus(_slurm_config(planted, out))
    scripts = sorted(fake_slurm.glob("job-*.slurm"))
    assert len(scripts) == 2  # the array job and datatrove's stats merge job
    array_script = scripts[0].read_text()
    for directive in ("--partition=bio", "--time=01:00:00", "--account=medlab", "--array=0-3"):
        assert f"#SBATCH {directive}" in array_script
    assert "launch_pickled_pipeline" in array_script and f"source {sys.prefix}/bin/activate" in array_script

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "1")
    with pytest.raises(Pending, match="slurm job 1000 is still running"):
        build_corpus(_slurm_config(planted, out))
    assert len(list(fake_slurm.glob("job-*.slurm"))) == 2

    monkeypatch.setenv("FAKE_SLURM_ACTIVE", "0")
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    manifest = build_corpus(_slurm_config(planted, out))
    local_out, local_manifest = built
    for split in ("train", "val"):
        assert _read_split(out, split) == _read_split(local_out, split)
    assert manifest.details["mixture"] == local_manifest.details["mixture"]
    assert {s["name"] for s in manifest.details["extract_steps"]} == {
        s["name"] for s in local_manifest.details["extract_steps"]
    }


def test_decontamination_disabled_is_said_in_the_report(planted, tmp_path):
    out = tmp_path / "nodecontam"
    manifest = build_corpus(
        validate(CorpusConfig, _config(planted, out, decontam={"enabled": False}, report_tokenizer=None))
    )
    assert manifest.details["decontamination"] is None
    assert "**Disabled**" in (out / "report.md").read_text()
    kept = {**_read_split(out, "train"), **_read_split(out, "val")}
    assert f"abstracts/{planted['pubmedqa_pmid']}" in kept  # the planted test abstract survives


def test_finalize_only_changes_reuse_the_extract(built, planted, tmp_path):
    """Weights and dedup thresholds act after extraction: changing them must not re-read the inputs."""
    out, manifest = built
    cfg = _config(planted, tmp_path / "rethreshold", work_dir=str(out / ".work"), dedup={"near": {"threshold": 0.7}})
    cfg["sources"][1]["weight"] = 0.02
    again = build_corpus(validate(CorpusConfig, cfg))
    assert again.details["extract_dir"] == manifest.details["extract_dir"] and again.key != manifest.key
    assert abs(again.details["mixture"]["replay"]["achieved_share"] - 0.02) < abs(
        again.details["mixture"]["replay"]["achieved_share"] - 0.05
    )


def test_every_stage_reports_its_time_tasks_and_peak_memory(built):
    out, manifest = built
    stages = manifest.details["stages"]
    assert list(stages) == ["extract", "dedup", "finalize", "mix", "write"]
    for entry in stages.values():
        assert entry["seconds"] > 0 and 30 < entry["peak_rss_mb"] < 4000
    assert stages["extract"]["tasks"] == manifest.counts["extract_tasks"]
    assert stages["dedup"]["tasks"] >= 2  # two rounds of at least one key range
    assert "## Stages" in (out / "report.md").read_text()
