"""Reading a task's split: the official local files first, a Hugging Face dataset when they are absent.

Local formats are read as the benchmarks ship them: JSONL (MedQA, MedMCQA), a JSON dict keyed by
document id (PubMedQA's ``ori_pqal.json``, split as PubMedQA's own script splits it, see
:func:`pqal_split`, or by the ids of ``test_ground_truth.json``), JSON lists, and CSV with or without a
header (MMLU has none). Hub
datasets are only a fallback for users who are online; their records are mapped onto the local
schema (``hub.fields``) so that one template serves both.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from medfoundry.errors import InputError, MedfoundryError
from medfoundry.eval.config import NO_BENCHMARKS
from medfoundry.eval.fields import Doc, map_fields
from medfoundry.eval.tasks import ChoiceTask, SplitSpec
from medfoundry.io import iter_json_lines

HubLoader = Callable[[str, "str | None", str], Iterable[dict]]
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


class DataUnavailable(MedfoundryError):
    """A split has no local file and no usable hub loader."""


def resolve_path(path: str, benchmarks_dir: Path | None) -> Path | None:
    """``path`` under the benchmarks folder unless absolute; None for a relative path when no folder is set."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return benchmarks_dir / candidate if benchmarks_dir is not None else None


def load_split(
    task: ChoiceTask, split: str, benchmarks_dir: Path | None, hub_loader: HubLoader | None = None
) -> list[Doc]:
    """The documents of ``split``, from the local file when it exists, else from the task's hub dataset."""
    spec = task.split_spec(split)
    local = resolve_path(spec.path, benchmarks_dir) if spec is not None and spec.path else None
    if local is not None and local.is_file():
        records = read_records(local, spec)
        if spec.pqal_split is not None:
            records = pqal_split(records, spec.pqal_split, local)
        records = _filter_ids(records, spec, benchmarks_dir)
        where = f"{task.source}: fields"
        return [Doc(doc_id, map_fields(record, task.fields, where)) for doc_id, record in records]
    hub = task.hub
    if hub is None or split not in hub.splits or not (hub_loader or _datasets_installed()):
        raise DataUnavailable(_missing_message(task, split, local))
    try:
        records = list((hub_loader or _load_from_hub)(hub.path, hub.name, hub.splits[split]))
    except Exception as exc:  # network, authentication, a renamed dataset: all end the same way for the user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataUnavailable(
            f"{_missing_message(task, split, local)}; its hub loader ({hub.path}) failed: "
            f"{type(exc).__name__}: {detail}"
        ) from None
    return hub_docs(task, records)


def _missing_message(task: ChoiceTask, split: str, local: Path | None) -> str:
    what = f"data file {local} not found" if local is not None else f"no local file for its {split!r} split"
    message = f"task {task.task} ({task.source}): {what}. For the official files, {NO_BENCHMARKS}"
    if task.hub is None or split not in task.hub.splits:
        return message + "; the task has no hub loader for this split"
    if not _datasets_installed():
        return (
            message + f", or `pip install 'medfoundry[datasets]'` and go online to use its hub loader ({task.hub.path})"
        )
    return message


def read_records(path: Path, spec: SplitSpec) -> list[tuple[str, dict]]:
    """(document id, record) pairs of a local file, in file order."""
    fmt = spec.format or _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(str(path), "cannot tell the format from the suffix; set format: jsonl, json or csv")
    records = {"jsonl": _jsonl, "json": _json, "csv": _csv}[fmt](path, spec)
    if spec.id_field is None:
        return records
    return [(_id_of(record, spec.id_field, path), record) for _, record in records]


def _id_of(record: dict, id_field: str, path: Path) -> str:
    if id_field not in record:
        raise InputError(str(path), f"a record has no id field {id_field!r} (fields: {', '.join(record)})")
    return str(record[id_field])


def _jsonl(path: Path, spec: SplitSpec) -> list[tuple[str, dict]]:
    records = []
    for line_no, record in iter_json_lines(path):
        if not isinstance(record, dict):
            raise InputError(str(path), f"expected a JSON object, got {type(record).__name__}", line_no)
        records.append((str(len(records)), record))
    return records


def _json(path: Path, spec: SplitSpec) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(str(path), f"not valid JSON ({exc})") from None
    pairs = list(data.items()) if isinstance(data, dict) else list(enumerate(data)) if isinstance(data, list) else None
    if pairs is None or not all(isinstance(record, dict) for _, record in pairs):
        raise InputError(str(path), "expected a list of records or a dict of records keyed by document id")
    return [(str(key), record) for key, record in pairs]


def _csv(path: Path, spec: SplitSpec) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    columns, body, first_line = (spec.columns, rows, 1) if spec.columns else (rows[0] if rows else [], rows[1:], 2)
    records = []
    for line_no, row in enumerate(body, first_line):
        if len(row) != len(columns):
            raise InputError(
                str(path), f"{len(row)} columns where {len(columns)} are expected ({', '.join(columns)})", line_no
            )
        records.append((str(len(records)), dict(zip(columns, row))))
    return records


def _filter_ids(records: list[tuple[str, dict]], spec: SplitSpec, benchmarks_dir: Path) -> list[tuple[str, dict]]:
    """Select a split by the ids listed in ``ids_file`` (PubMedQA's test_ground_truth.json)."""
    if spec.ids_file is None:
        return records
    path = resolve_path(spec.ids_file, benchmarks_dir)
    if path is None or not path.is_file():
        hint = f": {NO_BENCHMARKS}" if path is None else ""
        raise DataUnavailable(f"ids file {path or spec.ids_file} not found (it selects the split's documents){hint}")
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(str(path), f"not valid JSON ({exc})") from None
    ids = {str(i) for i in listed}
    return [(doc_id, record) for doc_id, record in records if (doc_id in ids) != spec.exclude_ids]


def pqal_split(records: list[tuple[str, dict]], name: str, path: Path) -> list[tuple[str, dict]]:
    """One split of PubMedQA PQA-L as its authors' ``preprocess/split_dataset.py pqal`` makes it
    (github.com/pubmedqa/pubmedqa): ``random.seed(0)``; per label (yes, no, maybe, in that order) shuffle
    the PMIDs and cut them into 2 parts, the second being the 500-question test set; then the same on the
    other 500 with 10 parts, the short last part taking one random PMID from each other part; fold N's dev
    set is part N and its train set the other nine parts, in order. ``name`` is ``test``, ``foldN_train``
    or ``foldN_dev``. Every draw from the generator is the script's, in the script's order, so the result
    is its files' content and order: the test set equals ``test_ground_truth.json`` id for id and in
    order (tested), and bigbio/pubmed_qa's ``pubmed_qa_labeled_fold0_source`` (lm-eval's pubmedqa
    dataset) reads its train/validation/test splits from these files."""
    rng = random.Random(0)
    dataset = dict(records)
    for pmid, record in dataset.items():
        if record.get("final_decision") not in ("yes", "no", "maybe"):
            raise InputError(
                str(path), f"record {pmid}: final_decision {record.get('final_decision')!r} is not yes, no or maybe"
            )
    cv_set, test = _pqal_parts(dataset, 2, rng)
    if name == "test":
        return list(test.items())
    fold, part = int(name[4]), name.partition("_")[2]
    folds = _pqal_parts(cv_set, 10, rng)
    if part == "dev":
        return list(folds[fold].items())
    return [item for i, chosen in enumerate(folds) if i != fold for item in chosen.items()]


def _pqal_parts(dataset: dict[str, dict], n: int, rng: random.Random) -> list[dict[str, dict]]:
    """split_dataset.py's ``split``: label-stratified parts, rebalanced into equal sizes as the script does."""
    by_label: dict[str, list[str]] = {"yes": [], "no": [], "maybe": []}
    for pmid, record in dataset.items():
        by_label[record["final_decision"]].append(pmid)
    cut = {label: _pqal_cut(pmids, n, rng) for label, pmids in by_label.items()}
    parts = [{pmid: dataset[pmid] for label in by_label for pmid in cut[label][i]} for i in range(n)]
    if len(parts[-1]) != len(parts[0]):
        for part in parts[:-1]:
            picked = rng.choice(list(part))
            parts[-1][picked] = part.pop(picked)
    return parts


def _pqal_cut(pmids: list[str], n: int, rng: random.Random) -> list[list[str]]:
    rng.shuffle(pmids)
    size = math.ceil(len(pmids) / n)
    return [pmids[i * size :] if i == n - 1 else pmids[i * size : (i + 1) * size] for i in range(n)]


def hub_docs(task: ChoiceTask, records: list[dict]) -> list[Doc]:
    """Hub records as documents: mapped onto the local schema (``hub.fields``), then through the task's own fields."""
    hub = task.hub
    docs = []
    for i, record in enumerate(records):
        doc_id = str(record[hub.id_field]) if hub.id_field else str(i)
        local = map_fields(dict(record), hub.fields, f"{task.source}: hub.fields")
        docs.append(Doc(doc_id, map_fields(local, task.fields, f"{task.source}: fields")))
    return docs


def _datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _load_from_hub(path: str, name: str | None, split: str) -> Iterable[dict]:
    import datasets

    return datasets.load_dataset(path, name, split=split)
