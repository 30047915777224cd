"""Instruction data readers: Alpaca, chat ``messages`` and ShareGPT records in JSON or JSONL(.gz) files,
Parquet files and folders written by ``datasets``' ``save_to_disk`` (see :mod:`medfoundry.tables`).

Every reader yields the same :class:`Conversation`, so templates, masking and mixing never see the
file format. A conversation is validated when it is read (known roles, an optional system message
first, then user and assistant turns alternating, ending with a non-empty assistant turn), and every
error is an :class:`~medfoundry.errors.InputError` naming the file and the line of the record, so
that one bad record among a million can be found and fixed. JSON files (a top-level array, or an
object keyed by record id) are scanned value by value to keep each record's line number too. A Parquet or
Arrow row is a record like a JSONL line (its row number standing for the line number), its nulls read as
absent fields: Arrow gives every struct of a column the same fields, filling those a record lacks with
nulls, so ``{"role": "user", "content": "..."}`` comes back with ``"options": None``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfoundry import limits, tables
from medfoundry.errors import InputError
from medfoundry.io import iter_json_lines, lone_surrogate, may_hold_surrogates, open_binary

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


@dataclass(frozen=True)
class Message:
    """One turn. ``options`` (letter -> text) keeps a multiple-choice question's options apart from its
    text, so that a template can lay them out its own way (BioMed-LLaMA's ``### Options``)."""

    role: str
    content: str
    options: dict[str, str] | None = None

    def folded(self) -> str:
        """The content with the options appended, for templates that only know ``content``."""
        if not self.options:
            return self.content
        return self.content + "\n\nOptions:\n" + "\n".join(f"{k}. {v}" for k, v in self.options.items())


@dataclass(frozen=True)
class Conversation:
    """A validated training record: an optional system message, then user/assistant turns ending with
    an assistant turn. ``source``/``line`` (or ``record_id``) say where it came from, for error
    messages and overlap reports; ``pmid`` lets the overlap guard recognise PubMedQA test articles."""

    messages: tuple[Message, ...]
    source: str
    line: int | None = None
    record_id: str | None = None
    pmid: str | None = None

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def location(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"{self.source} (record {self.record_id})" if self.record_id else self.source

    def error(self, message: str) -> InputError:
        prefix = f"record {self.record_id}: " if self.line is None and self.record_id else ""
        return InputError(self.source, prefix + message, self.line)


def make_conversation(messages: list[Message], source: str, line: int | None = None, **ids: str | None) -> Conversation:
    """A :class:`Conversation`, after checking the turn structure every template relies on."""
    conversation = Conversation(tuple(messages), str(source), line, **ids)
    problem = _structure_problem(conversation.messages)
    if problem:
        raise conversation.error(problem)
    return conversation


def _structure_problem(messages: tuple[Message, ...]) -> str | None:
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        return "record has no user or assistant turns"
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role == "system":
            return f"a system message may only come first (found one at turn {i + 1})"
        if message.role != expected:
            return (
                f"turn {i + 1} is {message.role!r} but {expected!r} was expected: turns must alternate user, assistant"
            )
    if turns[-1].role != "assistant":
        return "record is missing its response: the last turn is a user turn without an assistant reply"
    empty = [i + 1 for i, m in enumerate(turns) if m.role == "assistant" and not m.content.strip()]
    if empty:
        return f"record is missing its response: assistant turn {empty[0]} is empty"
    return None


def _text(record: dict, key: str, path: str, line: int | None, *, required: bool, what: str = "") -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        found = "missing" if value is None else f"{type(value).__name__} {value!r:.40}"
        raise InputError(path, f"record is missing its {what or repr(key)} (field {key!r} is {found})", line)
    return value


def from_alpaca(record: dict, path: str, line: int | None) -> Conversation:
    """``{instruction, input?, output, system?}``: the input is appended to the instruction."""
    instruction = _text(record, "instruction", path, line, required=True, what="instruction")
    extra = _text(record, "input", path, line, required=False)
    output = _text(record, "output", path, line, required=True, what="response")
    system = _text(record, "system", path, line, required=False)
    prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt), Message("assistant", output)]
    return make_conversation(messages, path, line)


def _turn_list(record: dict, key: str, fmt: str, path: str, line: int | None) -> list:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise InputError(path, f"record has no {key!r} list (expected by the {fmt} format)", line)
    return turns


def _options(turn: dict, path: str, line: int | None) -> dict[str, str] | None:
    options = turn.get("options")
    if options is None:
        return None
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise InputError(path, "'options' must map option letters to option texts", line)
    return {str(k): v for k, v in options.items()}


def from_messages(record: dict, path: str, line: int | None) -> Conversation:
    """``{messages: [{role, content, options?}, ...]}`` with roles system, user and assistant."""
    messages = []
    for i, turn in enumerate(_turn_list(record, "messages", "messages", path, line), 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise InputError(path, f"message {i} needs a string 'content'", line)
        role = turn.get("role")
        if role not in ROLES:
            raise InputError(path, f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}", line)
        messages.append(Message(role, turn["content"], _options(turn, path, line)))
    return make_conversation(messages, path, line)


def from_sharegpt(record: dict, path: str, line: int | None) -> Conversation:
    """``{conversations: [{from, value}, ...]}``; ``human``/``gpt`` map to user/assistant."""
    messages = []
    for i, turn in enumerate(_turn_list(record, "conversations", "sharegpt", path, line), 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InputError(path, f"turn {i} needs a string 'value'", line)
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:  # a list is not hashable
            known = ", ".join(SHAREGPT_ROLES)
            raise InputError(path, f"turn {i} has unknown role {speaker!r} in 'from'; expected one of {known}", line)
        messages.append(Message(SHAREGPT_ROLES[speaker], turn["value"]))
    return make_conversation(messages, path, line)


PARSERS: dict[str, Callable[[dict, str, int | None], Conversation]] = {
    "alpaca": from_alpaca,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
}


def detect_format(record: Any, path: str, line: int | None) -> str:
    """The format a record is in, from its keys."""
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record or "output" in record:
            return "alpaca"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise InputError(
        path,
        f"cannot tell the format of this record (keys: {keys}); expected Alpaca "
        "(instruction/input/output), 'messages' or ShareGPT 'conversations', or set format:",
        line,
    )


def _scan_json(text: str, path: str) -> Iterator[tuple[int, str | None, Any]]:
    """``(line, key, value)`` for each element of a top-level JSON array or object, in file order."""
    decoder = json.JSONDecoder()
    pos, line = _skip(text, 0), 1
    if pos >= len(text) or text[pos] not in "[{":
        raise InputError(path, "expected a JSON array of records (or an object of records keyed by id)", 1)
    is_object, closing = text[pos] == "{", "}" if text[pos] == "{" else "]"
    pos, counted = _skip(text, pos + 1), 0
    escapes = may_hold_surrogates(text)
    while pos < len(text) and text[pos] != closing:
        line += text.count("\n", counted, pos)
        counted = pos
        key = None
        try:
            if is_object:
                key, pos = decoder.raw_decode(text, pos)
                if not isinstance(key, str):
                    raise InputError(path, "invalid JSON: object keys must be strings", line)
                pos = _skip(text, pos)
                if text[pos : pos + 1] != ":":
                    raise InputError(path, "expected ':' after an object key", line + text.count("\n", counted, pos))
                pos = _skip(text, pos + 1)
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(path, f"invalid JSON: {err.msg}", err.lineno) from None
        except ValueError as err:  # an integer of more than 4300 digits
            raise InputError(path, f"invalid JSON: {err}", line) from None
        except RecursionError:
            raise InputError(path, "invalid JSON: nested too deeply", line) from None
        surrogate = lone_surrogate([key, value]) if escapes else None
        if surrogate is not None:
            raise InputError(
                path,
                f"invalid JSON: the string escape \\u{ord(surrogate):04x} is a lone UTF-16 surrogate, "
                "not a character (a string cut inside a surrogate pair?)",
                line,
            )
        yield line, key, value
        pos = _skip(text, pos)
        if text[pos : pos + 1] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos : pos + 1] != closing:
            raise InputError(path, f"invalid JSON: expected ',' or {closing!r}", line + text.count("\n", counted, pos))
    line += text.count("\n", counted, pos)
    if pos >= len(text):
        raise InputError(path, f"invalid JSON: the file ends before the closing {closing!r} (truncated?)", line)
    if _skip(text, pos + 1) < len(text):
        raise InputError(path, f"invalid JSON: extra data after the closing {closing!r}", line)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_json_records(path: str | Path) -> Iterator[tuple[int, str | None, Any]]:
    """``(line, key, record)`` of a JSON or JSONL file, optionally gzipped (key: the id in an object of records).

    JSONL is streamed line by line, split on ``\\n`` only: ``str.splitlines`` would also split on
    U+2028 and U+0085, which JSON strings may hold unescaped. A JSON file is parsed in memory, so one over
    :data:`~medfoundry.limits.MAX_JSON_FILE_BYTES` is refused, having read no more than that.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file not found")
    if ".jsonl" in path.name:
        yield from ((line, None, record) for line, record in iter_json_lines(path))
        return
    try:
        with open_binary(path) as fh:
            raw = fh.read(limits.MAX_JSON_FILE_BYTES + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(str(path), f"truncated or corrupt gzip ({exc})") from None
    if len(raw) > limits.MAX_JSON_FILE_BYTES:
        raise InputError(
            str(path),
            f"more than {limits.mib(limits.MAX_JSON_FILE_BYTES)} of JSON (decompressed; "
            "medfoundry.limits.MAX_JSON_FILE_BYTES): a JSON file is parsed in memory, so a larger one is refused; "
            "write it as JSONL (one record per line, read as a stream) instead",
        )
    text = _decode(raw, str(path), 1)
    del raw  # the text is all that is needed: do not hold the file twice while it is scanned
    yield from _scan_json(text, str(path))


def _decode(raw: bytes, path: str, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason})", first_line + raw.count(b"\n", 0, exc.start)) from None


def iter_table_records(path: Path, split: str | None = None) -> Iterator[tuple[Path, int, dict]]:
    """``(data file, row, record)`` of a Parquet file or a ``save_to_disk`` folder (``split``: of a DatasetDict),
    batch by batch; a row over :data:`~medfoundry.limits.MAX_ROW_BYTES` of text is an :class:`InputError`."""
    for file in tables.table_files(path, split):
        for first, batch in tables.iter_batches(file, tables.schema_of(file).names):
            for row, record in enumerate(batch.to_pylist(), first):
                size = _text_size(record)
                if size > limits.MAX_ROW_BYTES:
                    raise InputError(str(file), tables.over_limit(size), row)
                yield file, row, _without_nulls(record)


def _text_size(value: Any) -> int:
    """Characters of the strings in a record (a lower bound on their UTF-8 bytes)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _records(path: Path, split: str | None) -> Iterator[tuple[Path, int, Any]]:
    if tables.is_table(path):
        return iter_table_records(path, split)
    if split is not None:
        raise InputError(str(path), f"split: {split} applies to a save_to_disk DatasetDict folder, not to this file")
    return ((path, line, record) for line, _, record in iter_json_records(path))


def read_conversations(path: str | Path, format: str = "auto", split: str | None = None) -> Iterator[Conversation]:
    """Conversations of an Alpaca / messages / ShareGPT file (or Parquet file, or ``save_to_disk`` folder:
    ``split`` picks one of a DatasetDict's). ``auto`` decides from the first record; a later record in another
    shape is an error naming its line (mixed files are not guessed at)."""
    if format != "auto" and format not in PARSERS:
        raise InputError(str(path), f"unknown format {format!r}; expected auto or one of {', '.join(PARSERS)}")
    parser = PARSERS.get(format)
    for file, line, record in _records(Path(path), split):
        if parser is None:
            parser = PARSERS[detect_format(record, str(file), line)]
        if not isinstance(record, dict):
            raise InputError(str(file), f"expected a JSON object per record, found {type(record).__name__}", line)
        yield parser(record, str(file), line)
