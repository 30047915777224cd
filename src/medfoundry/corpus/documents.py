"""Read a built corpus (the output of ``medfoundry corpus build``)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from medfoundry.errors import InputError


def corpus_parts(corpus_dir: str | Path, split: str) -> list[Path]:
    """The shard files of one split, after checking the corpus is complete (its manifest is written last)."""
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "manifest.json").is_file():
        raise InputError(
            str(corpus_dir), "not a finished corpus (no manifest.json): run `medfoundry corpus build` first"
        )
    parts = sorted((corpus_dir / split).glob("part-*.jsonl.gz"))
    if not parts:
        raise InputError(str(corpus_dir / split), f"the corpus has no {split} shards")
    return parts


def iter_documents(corpus_dir: str | Path, split: str, sources: list[str] | None = None) -> Iterator[dict]:
    """Documents ``{id, text, source, meta}`` of one split in shard order, optionally only some sources."""
    wanted = set(sources) if sources else None
    for part in corpus_parts(corpus_dir, split):
        with gzip.open(part, "rt", encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                if wanted is None or doc["source"] in wanted:
                    yield doc
