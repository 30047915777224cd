"""lm-eval task files over local documents: lm-eval's own task (its prompts, few-shot rules and metrics, by
``include`` of its YAML) pointed at JSONL files instead of the Hub dataset it names. How medfoundry's
comparisons with lm-eval (tests, ``benchmarks/kshot_parity.py``) run lm-eval offline on exactly the documents
medfoundry evaluates; ``lm_eval --include_path DIR --tasks ours_NAME`` runs one the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medfoundry.eval.data import load_split
from medfoundry.eval.tasks import ChoiceTask

# lm-eval's pubmedqa reads these fields of bigbio's pubmed_qa source schema
PUBMEDQA_FIELDS = ("QUESTION", "CONTEXTS", "final_decision")


def write_local_task(directory: Path, name: str, include: str, splits: dict[str, list[dict]]) -> Path:
    """Write ``ours_<name>``: lm-eval's task file ``include`` (relative to ``lm_eval/tasks``) over ``splits``
    (``test`` and, for its few-shot pool, ``train``: lm-eval's ``fewshot_docs`` takes the training split when a
    task has one), one JSONL file per split in ``directory``. Returns the task file."""
    import lm_eval.tasks

    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, records in splits.items():
        files[split] = str(directory / f"{name}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    spec = {
        "include": str(Path(lm_eval.tasks.__file__).parent / include),
        "task": f"ours_{name}",
        "tag": None,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files, "cache_dir": str(directory / "cache")},
        "training_split": "train" if "train" in splits else None,
        "validation_split": None,
        "test_split": "test",
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def pubmedqa_splits(pubmedqa: ChoiceTask, benchmarks: Path) -> dict[str, list[dict]]:
    """PubMedQA's official test set and fold 0's train set (lm-eval's few-shot pool), as lm-eval's pubmedqa
    reads them."""
    return {
        split: [{k: d.fields[k] for k in PUBMEDQA_FIELDS} for d in load_split(pubmedqa, split, benchmarks)]
        for split in ("test", "train")
    }
