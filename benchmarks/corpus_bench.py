"""Build a corpus from all of ../shared/data/corpus and report throughput.

Prints one JSON object as its last line: docs_in, docs_out, wall_s, docs_per_s, mb_per_s
(uncompressed input megabytes per second) and the per-stage times. Target: < 60 s on 2 cores.
Runs cold: a fresh work directory, so nothing is cached.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

from medfoundry.config import validate
from medfoundry.corpus.build import build_corpus
from medfoundry.corpus.config import CorpusConfig
from medfoundry.corpus.plan import plan_units
from medfoundry.runtime import configure, tcmalloc_loaded

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def corpus_config(out: Path, workers: int) -> dict:
    corpus = DATA / "corpus"
    return {
        "output_dir": str(out / "corpus"),
        "workers": workers,
        "strict": False,
        "sources": [
            {
                "name": "papers",
                "kind": "jats",
                "paths": [str(corpus / "pmc_jats/*.nxml"), str(corpus / "pmc_jats/*.xml")],
            },
            {
                "name": "pubmed",
                "kind": "pubmed_xml",
                "paths": [str(corpus / "pubmed_xml/*.xml"), str(corpus / "pubmed_xml/*.xml.gz")],
            },
            {
                "name": "abstracts",
                "kind": "jsonl",
                "paths": [str(corpus / "pubmed_abstracts.jsonl.gz")],
                "fields": {"text": ["title", "abstract"], "id": "pmid", "pmid": "pmid", "meta": ["source", "license"]},
            },
            {
                "name": "replay",
                "kind": "jsonl",
                "paths": [str(corpus / "general_replay.jsonl.gz")],
                "fields": {"text": ["text"], "meta": ["source", "license"]},
                "weight": 0.01,
            },
        ],
        "dedup": {"precedence": ["papers", "pubmed", "abstracts", "replay"]},
        "decontam": {"benchmarks_dir": str(DATA / "benchmarks")},
    }


def uncompressed_mb(paths: set[str]) -> float:
    total = 0
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            while block := fh.read(1 << 20):
                total += len(block)
    return total / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared data folder)")
    runtime = configure()
    with tempfile.TemporaryDirectory(prefix="corpus_bench_") as tmp:
        cfg = validate(CorpusConfig, corpus_config(Path(tmp), args.workers), "corpus_bench")
        input_mb = uncompressed_mb({u.path for u in plan_units(cfg)})
        start = time.perf_counter()
        manifest = build_corpus(cfg, force=True)
        wall = time.perf_counter() - start
    counts = manifest.counts
    result = {
        "docs_in": counts["documents_in"],
        "docs_out": counts["documents_train"] + counts["documents_val"],
        "docs_train": counts["documents_train"],
        "docs_val": counts["documents_val"],
        "wall_s": round(wall, 2),
        "docs_per_s": round(counts["documents_in"] / wall, 1),
        "input_mb": round(input_mb, 1),
        "mb_per_s": round(input_mb / wall, 2),
        "stages_s": {k: round(v, 2) for k, v in manifest.timings.items()},
        "extract_steps_cpu_s": {s["name"]: round(s["time_s"] or 0, 2) for s in manifest.details["extract_steps"]},
        "dropped": {k: sum(v.values()) for k, v in manifest.details["dropped"].items()},
        "tasks": counts["extract_tasks"],
        "workers": min(args.workers or runtime.threads, counts["extract_tasks"]),
        "allocator": "tcmalloc" if tcmalloc_loaded() else "glibc",
        "target_wall_s": 60,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
