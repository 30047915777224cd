"""Benchmark training data as instructions: PubMedQA, MedMCQA, MedQA and MMLU in their official formats.

Multiple-choice records become a user turn holding the question with its options kept apart
(:attr:`Message.options`) and an assistant turn ``"B. <option text>"``. With ``reasoning`` the
reference explanation (MedMCQA ``exp``, PubMedQA ``LONG_ANSWER``) comes first as a chain of
thought and the answer follows on its own line, ``"<explanation>\\n\\nAnswer: B. <option text>"``,
so the answer can be read off a generated chain of thought the same way for every source.
Converting an evaluation test split is possible here on purpose: the overlap guard, which uses
these same converters to read the test splits, refuses to train on it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from medfoundry.errors import ConfigError, InputError
from medfoundry.sft.formats import Conversation, Message, iter_json_records, make_conversation

PUBMEDQA_PROMPT = "Answer the question about the abstract with yes, no or maybe."


def answer_text(answer: str, reasoning: str | None) -> str:
    """The assistant turn: the answer alone, or the reasoning followed by ``Answer: <answer>``."""
    if reasoning and reasoning.strip():
        return f"{reasoning.strip()}\n\nAnswer: {answer}"
    return answer


def multiple_choice(
    question: str,
    options: dict[str, str],
    letter: str,
    reasoning: str | None,
    source: str,
    line: int | None,
    record_id: str | None = None,
) -> Conversation:
    user = Message("user", question.strip(), {k: v.strip() for k, v in options.items()})
    response = answer_text(f"{letter}. {options[letter].strip()}", reasoning)
    return make_conversation([user, Message("assistant", response)], source, line, record_id=record_id)


def _require(record: dict, names: tuple[str, ...], path: str, line: int | None, item: str = "") -> list:
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise InputError(path, f"{item}missing field {missing[0]!r}", line)
    return [record[n] for n in names]


def pubmedqa(
    path: str | Path, *, test_ids: str | Path | None = None, reasoning: bool = False
) -> Iterator[Conversation]:
    """The train/dev half of PQA-L: ``ori_pqal.json`` minus the official test PMIDs.

    ``test_ids`` is ``test_ground_truth.json`` (default: beside ``path``); without it the split cannot
    be made, so its absence is an error rather than a silent use of the test questions. The user turn
    is the abstract (its ``CONTEXTS``), the question and the instruction; the answer is
    ``final_decision``, after ``LONG_ANSWER`` with ``reasoning``.
    """
    path = Path(path)
    ids_path = Path(test_ids) if test_ids else path.parent / "test_ground_truth.json"
    if not ids_path.is_file():
        raise InputError(
            str(ids_path),
            "PubMedQA test ids not found: they are needed to leave the test questions out "
            "(point test_ids at test_ground_truth.json)",
        )
    test = set(json.loads(ids_path.read_text(encoding="utf-8")))
    for line, pmid, record in iter_json_records(path):
        if pmid is None:
            raise InputError(str(path), "expected ori_pqal.json: an object of records keyed by PMID", line)
        if pmid in test:
            continue
        question, contexts, decision = _require(
            record, ("QUESTION", "CONTEXTS", "final_decision"), str(path), line, f"PMID {pmid}: "
        )
        if decision not in ("yes", "no", "maybe"):
            raise InputError(str(path), f"PMID {pmid}: final_decision must be yes, no or maybe, not {decision!r}", line)
        prompt = "\n".join(contexts) + f"\n\nQuestion: {question}\n{PUBMEDQA_PROMPT}"
        response = answer_text(decision, record.get("LONG_ANSWER") if reasoning else None)
        yield make_conversation(
            [Message("user", prompt), Message("assistant", response)], str(path), line, record_id=pmid, pmid=pmid
        )


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    for line, _, record in iter_json_records(path):
        if not isinstance(record, dict):
            raise InputError(str(path), f"expected a JSON object per line, found {type(record).__name__}", line)
        records.append((line, record))
    return records


def _cop_base(records: list[tuple[int, dict]], path: Path, cop_base: int | None) -> int:
    """Whether ``cop`` counts from 0 (the Hugging Face copy) or 1 (the original release), from the values seen."""
    values = {r.get("cop") for _, r in records}
    if cop_base is not None:
        return cop_base
    if 0 in values and 4 in values:
        raise InputError(str(path), "cop takes both 0 and 4: it cannot index four options; fix the file")
    if 0 in values or 4 in values:
        return 0 if 0 in values else 1
    raise InputError(
        str(path),
        f"cannot tell whether cop counts from 0 or 1 (values seen: {sorted(values, key=str)}); set cop_base: 0 or 1",
    )


def medmcqa(path: str | Path, *, reasoning: bool = False, cop_base: int | None = None) -> Iterator[Conversation]:
    """MedMCQA JSONL (``question, opa..opd, cop, exp, id``); ``exp`` is the chain of thought with ``reasoning``."""
    path = Path(path)
    records = _jsonl(path)
    base = _cop_base(records, path, cop_base)
    for line, record in records:
        question, *texts, cop = _require(record, ("question", "opa", "opb", "opc", "opd", "cop"), str(path), line)
        if not isinstance(cop, int) or not 0 <= cop - base < 4:
            raise InputError(str(path), f"cop {cop!r} is not an option number {base}..{base + 3}", line)
        options = dict(zip("ABCD", (str(t) for t in texts)))
        yield multiple_choice(
            question,
            options,
            "ABCD"[cop - base],
            record.get("exp") if reasoning else None,
            str(path),
            line,
            record.get("id"),
        )


def medqa(path: str | Path) -> Iterator[Conversation]:
    """MedQA-USMLE ``us_*_options`` JSONL: ``question, options{A..}, answer_idx``."""
    path = Path(path)
    for line, record in _jsonl(path):
        question, options, letter = _require(record, ("question", "options", "answer_idx"), str(path), line)
        if not isinstance(options, dict) or letter not in options:
            raise InputError(str(path), f"answer_idx {letter!r} is not one of the options {list(options)}", line)
        yield multiple_choice(question, options, letter, None, str(path), line)


def _csv_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise InputError(str(path), "no MMLU CSV files here (expected header-less question,A,B,C,D,answer rows)")
    return files


def mmlu(path: str | Path) -> Iterator[Conversation]:
    """MMLU CSVs (a file, or a folder such as ``mmlu/dev``): header-less ``question,A,B,C,D,answer`` rows."""
    for csv_path in _csv_files(Path(path)):
        with csv_path.open(encoding="utf-8", newline="") as fh:
            rows, start = csv.reader(fh), 1
            for row in rows:
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                    raise InputError(
                        str(csv_path),
                        f"expected 6 columns question,A,B,C,D,answer with answer A-D, found {len(row)} columns",
                        start,
                    )
                options = dict(zip("ABCD", row[1:5]))
                yield multiple_choice(row[0], options, row[5].strip(), None, str(csv_path), start)
                start = rows.line_num + 1


CONVERTERS: dict[str, Callable[..., Iterator[Conversation]]] = {
    "pubmedqa": pubmedqa,
    "medmcqa": medmcqa,
    "medqa": medqa,
    "mmlu": mmlu,
}
_OPTIONS = {"pubmedqa": {"test_ids", "reasoning"}, "medmcqa": {"reasoning", "cop_base"}, "medqa": set(), "mmlu": set()}


def convert(name: str, path: str | Path, **options) -> Iterator[Conversation]:
    """Run converter ``name`` on ``path`` with the options it takes (others are a configuration error)."""
    if name not in CONVERTERS:
        raise ConfigError(f"unknown converter {name!r}; known: {', '.join(CONVERTERS)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}  # cop_base=0 is a value
    unknown = sorted(set(given) - _OPTIONS[name])
    if unknown:
        raise ConfigError(
            f"converter {name!r} does not take {unknown}; it takes {sorted(_OPTIONS[name]) or 'no options'}"
        )
    return CONVERTERS[name](path, **given)
