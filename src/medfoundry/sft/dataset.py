"""Prepared fine-tuning data: tokenized once to disk, then read as resumable, shuffled, sharded batches.

:func:`prepare` reads every source, refuses (or drops) records overlapping evaluation test splits,
holds out a validation share of each source by a hash of the record (the same record lands on the
same side whatever the file order, and exact duplicates never straddle the split), renders and masks
the rest with the chat template, fits them to ``max_length``, samples the mixture and packs it. The
folder it writes appears whole or not at all::

    tokenizer/             the base tokenizer + chat template (+ vocab_extension.json when tokens were added)
    train/, val/           tokens.npy, loss.npy (per token), offsets.npy (per example),
                           row_offsets.npy + row_examples.npy (examples of each sequence), row_source.npy
    manifest.json          config, input fingerprints, counts, mixture report; report.md for people

A folder whose manifest key (config + input fingerprints + version) matches is reused.

:class:`SFTReader` is to this folder what :class:`~medfoundry.tokenizer.reader.WindowReader` is to
token shards: the global order is a seeded permutation of the sequences per epoch, rank r of W reads
global positions r, r+W, ..., and the whole state is one counter, so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import glob
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from medfoundry import __version__
from medfoundry.errors import InputError, MedfoundryError
from medfoundry.io import atomic_dir, write_text
from medfoundry.manifest import Manifest, content_key, inputs_fingerprint
from medfoundry.model.load import is_gguf, resolve_reference
from medfoundry.sft.batch import collate
from medfoundry.sft.config import SFTDataConfig, SFTSourceConfig
from medfoundry.sft.converters import convert
from medfoundry.sft.formats import Conversation, read_conversations
from medfoundry.sft.mixture import Pool, mixture_markdown, mixture_report, plan_mixture
from medfoundry.sft.overlap import Overlap, OverlapGuard, overlap_error
from medfoundry.sft.packing import DROPPED, TRUNCATED, fit_length, pack
from medfoundry.sft.templates import Renderer, prepare_tokenizer
from medfoundry.shuffled_order import ShuffledOrder

SPLITS = ("train", "val")
TOKENIZER_INPUTS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
SHOWN = 5


# ---------------------------------------------------------------------------------------------- reading


def source_files(source: SFTSourceConfig) -> list[Path]:
    """The files a source reads (a glob for file sources; the benchmark file or folder for converters)."""
    if source.converter:
        path = Path(source.path)
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        if source.converter == "pubmedqa":
            files.append(Path(source.test_ids) if source.test_ids else path.parent / "test_ground_truth.json")
        return files
    files = sorted(Path(p) for p in glob.glob(source.path))
    if not files:
        raise InputError(source.path, f"source {source.name!r}: no file matches this path")
    return files


def read_source(source: SFTSourceConfig) -> list[Conversation]:
    if source.converter:
        return list(
            convert(
                source.converter,
                source.path,
                reasoning=source.reasoning,
                cop_base=source.cop_base,
                test_ids=source.test_ids,
            )
        )
    return [c for path in source_files(source) for c in read_conversations(path, source.format, source.split)]


def input_fingerprints(cfg: SFTDataConfig) -> dict[str, str]:
    """Fingerprints (by content) of everything :func:`prepare` reads: the tokenizer's files, every source
    file, the evaluation sets checked for overlap."""
    spec = resolve_reference(cfg.tokenizer)  # a Hub id: its snapshot's files
    inputs = {str(cfg.tokenizer): inputs_fingerprint(spec, names=None if is_gguf(spec) else TOKENIZER_INPUTS)}
    for source in cfg.sources:
        inputs.update((str(path), inputs_fingerprint(path)) for path in source_files(source))
    if cfg.overlap.benchmarks_dir:
        root = Path(cfg.overlap.benchmarks_dir)
        for name in cfg.overlap.sets:
            if (root / name).is_dir():
                inputs[str(root / name)] = inputs_fingerprint(root / name)
    return inputs


def val_side(conversation: Conversation, fraction: float, seed: int) -> bool:
    """Whether a record is held out: a seeded hash of its content below ``fraction``."""
    content = json.dumps([[m.role, m.content, m.options] for m in conversation.messages], ensure_ascii=False)
    return xxhash.xxh64_intdigest(content.encode(), seed=seed) < fraction * 2**64


# ---------------------------------------------------------------------------------------------- preparing


@dataclass
class SourceStats:
    """What happened to one source's records, for the manifest."""

    records: int = 0
    test_overlap: int = 0
    train_records: int = 0
    val_records: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    boundary_tokens: int = 0
    dropped_locations: list[str] = field(default_factory=list)


@dataclass
class Examples:
    """Rendered examples of one source and split."""

    ids: list[np.ndarray] = field(default_factory=list)
    loss: list[np.ndarray] = field(default_factory=list)
    text: str | None = None  # the first one, marked up for the report


def _check_overlap(cfg: SFTDataConfig, sources: dict[str, list[Conversation]], stats: dict[str, SourceStats]) -> dict:
    """Refuse, drop or record records that overlap evaluation test items; returns the manifest entry."""
    if not cfg.overlap.benchmarks_dir:
        return {"checked": False}
    guard = OverlapGuard(
        cfg.overlap.benchmarks_dir, cfg.overlap.sets, ngram=cfg.overlap.ngram, min_fraction=cfg.overlap.min_fraction
    )
    found: list[Overlap] = []
    for name, records in sources.items():
        flags = [guard.check(c) for c in records]
        stats[name].test_overlap = sum(f is not None for f in flags)
        found += [f for f in flags if f is not None]
        if cfg.drop_test_overlap:
            sources[name] = [c for c, f in zip(records, flags) if f is None]
    checked = sum(s.records for s in stats.values())
    if found and not (cfg.allow_test_overlap or cfg.drop_test_overlap):
        raise overlap_error(found, checked)
    action = "dropped" if cfg.drop_test_overlap else "kept (allow_test_overlap)" if cfg.allow_test_overlap else "none"
    return {
        "checked": True,
        "index": guard.summary(),
        "records": checked,
        "overlapping": len(found),
        "action": action,
        "first": [f"{o.location}: {o.benchmark} {o.item} ({o.reason})" for o in found[:SHOWN]],
    }


def _render_split(
    renderer: Renderer, records: list[Conversation], cfg: SFTDataConfig, stats: SourceStats, bar
) -> Examples:
    out = Examples()
    for conversation in records:
        bar.update()
        example = renderer(conversation)
        ids, loss, status = fit_length(example.ids, example.loss, cfg.max_length, cfg.truncation)
        if status == DROPPED and cfg.truncation == "error":
            raise conversation.error(
                f"example is {len(example.ids):,} tokens, longer than max_length {cfg.max_length:,}: raise max_length, "
                "or set truncation: left_prompt (cuts the prompt, never the response) or drop"
            )
        stats.boundary_tokens += example.boundary_tokens
        if status == DROPPED:
            stats.dropped_too_long += 1
            if len(stats.dropped_locations) < SHOWN:
                stats.dropped_locations.append(conversation.location)
            continue
        stats.truncated += status == TRUNCATED
        out.ids.append(ids)
        out.loss.append(loss)
        if out.text is None:
            out.text = _marked(renderer.tokenizer, ids, loss)
    return out


def _marked(tokenizer, ids: np.ndarray, loss: np.ndarray) -> str:
    """The example's text with the loss-carrying spans in ⟦ ⟧, for the report."""
    parts, start = [], 0
    edges = np.flatnonzero(np.diff(loss.astype(np.int8))) + 1
    for end in [*edges.tolist(), len(ids)]:
        text = tokenizer.decode(ids[start:end].tolist())
        parts.append(f"⟦{text}⟧" if loss[start] else text)
        start = end
    return "".join(parts)


def _split_source(cfg: SFTDataConfig, index: int, records: list[Conversation], stats: SourceStats):
    source = cfg.sources[index]
    fraction = cfg.validation.fraction if source.val_fraction is None else source.val_fraction
    held = [val_side(c, fraction, cfg.validation.seed) for c in records]
    train = [c for c, h in zip(records, held) if not h]
    val = [c for c, h in zip(records, held) if h]
    if source.max_examples and len(train) > source.max_examples:
        keep = np.random.default_rng([cfg.seed, index]).choice(len(train), source.max_examples, replace=False)
        train = [train[i] for i in np.sort(keep)]
    stats.train_records, stats.val_records = len(train), len(val)
    return train, val


def _write_split(
    directory: Path,
    examples: list[tuple[np.ndarray, np.ndarray]],
    sources: np.ndarray,
    rows: list[list[int]],
    max_length: int,
) -> dict:
    """Store unique examples and the rows (sequences) that reference them; return the split's counts."""
    directory.mkdir(parents=True)
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    np.save(directory / "tokens.npy", np.concatenate([ids for ids, _ in examples] or [empty]).astype(np.uint32))
    np.save(directory / "loss.npy", np.concatenate([loss for _, loss in examples] or [empty.astype(bool)]))
    np.save(directory / "offsets.npy", offsets)
    row_lengths = np.array([len(r) for r in rows], dtype=np.int64)
    np.save(directory / "row_offsets.npy", np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64))
    np.save(directory / "row_examples.npy", np.array([i for r in rows for i in r], dtype=np.int64))
    row_source = [int(sources[r[0]]) if len({int(sources[i]) for i in r}) == 1 else -1 for r in rows]
    np.save(directory / "row_source.npy", np.array(row_source, dtype=np.int64))
    row_tokens = [int(lengths[r].sum()) for r in rows]
    response = sum(int(examples[i][1].sum()) for r in rows for i in r)
    return {
        "examples": int(sum(row_lengths)),
        "unique_examples": len(examples),
        "rows": len(rows),
        "tokens": sum(row_tokens),
        "response_tokens": response,
        "fill": sum(row_tokens) / max(len(rows) * max_length, 1),
    }


def _rows(lengths: np.ndarray, cfg: SFTDataConfig, seed: int) -> list[list[int]]:
    if cfg.packing:
        return pack(lengths, cfg.max_length, seed)
    return [[i] for i in range(len(lengths))]


def _train_split(directory: Path, cfg: SFTDataConfig, rendered: dict[str, Examples]) -> tuple[dict, dict]:
    """Mix, pack and write the train split; return (split counts, mixture report)."""
    weights = {s.name: s.weight for s in cfg.sources}
    pools = [
        Pool(
            name,
            weights[name],
            np.array([int(mask.sum()) for mask in ex.loss], dtype=np.int64),
            np.array([len(i) for i in ex.ids], dtype=np.int64),
        )
        for name, ex in rendered.items()
    ]
    plan = plan_mixture(pools, cfg.mixture, cfg.seed)
    examples, sources, sampled = [], [], []
    for s, (name, ex) in enumerate(rendered.items()):
        used = np.unique(plan[name])
        index = {int(u): len(examples) + k for k, u in enumerate(used)}
        examples += [(ex.ids[u], ex.loss[u]) for u in used]
        sources += [s] * len(used)
        sampled += [index[int(u)] for u in plan[name]]
    lengths = np.array([len(examples[i][0]) for i in sampled], dtype=np.int64)
    rows = [[sampled[k] for k in row] for row in _rows(lengths, cfg, cfg.seed)]
    counts = _write_split(directory, examples, np.array(sources), rows, cfg.max_length)
    return counts, mixture_report(pools, plan, cfg.mixture)


def _val_split(directory: Path, cfg: SFTDataConfig, rendered: dict[str, Examples]) -> dict:
    """Write the validation split, packed per source so each sequence belongs to one source."""
    examples, sources, rows = [], [], []
    for s, ex in enumerate(rendered.values()):
        first = len(examples)
        examples += list(zip(ex.ids, ex.loss))
        sources += [s] * len(ex.ids)
        lengths = np.array([len(i) for i in ex.ids], dtype=np.int64)
        rows += [[first + k for k in row] for row in _rows(lengths, cfg, cfg.seed + s)]
    return _write_split(directory, examples, np.array(sources, dtype=np.int64), rows, cfg.max_length)


def _render_sources(
    cfg: SFTDataConfig, renderer: Renderer, records: dict[str, list[Conversation]], stats: dict[str, SourceStats]
) -> dict[str, dict[str, Examples]]:
    """Split every source, then render and fit its train and validation records: ``{split: {source: Examples}}``."""
    rendered: dict[str, dict[str, Examples]] = {"train": {}, "val": {}}
    splits = [_split_source(cfg, i, records[s.name], stats[s.name]) for i, s in enumerate(cfg.sources)]
    with tqdm(total=sum(len(t) + len(v) for t, v in splits), desc="render", unit="example", disable=None) as bar:
        for source, (train, val) in zip(cfg.sources, splits):
            rendered["train"][source.name] = _render_split(renderer, train, cfg, stats[source.name], bar)
            rendered["val"][source.name] = _render_split(renderer, val, cfg, stats[source.name], bar)
    return rendered


def prepare(cfg: SFTDataConfig, out_dir: str | Path, *, force: bool = False) -> Manifest:
    """Tokenize, mask, mix and pack the fine-tuning data into ``out_dir``; returns the manifest.

    Nothing is recomputed when ``out_dir`` already holds data prepared from the same config and inputs
    (unless ``force``).
    """
    out_dir, started = Path(out_dir), time.perf_counter()
    inputs = input_fingerprints(cfg)
    key = content_key("sft_data", cfg.model_dump(mode="json"), inputs, __version__)
    done = None if force else Manifest.current(out_dir, key)
    if done is not None:
        return done
    with atomic_dir(out_dir) as tmp:
        tokenizer, added = prepare_tokenizer(cfg.tokenizer, cfg.template, tmp / "tokenizer")
        renderer = Renderer(tokenizer, cfg.template)
        records = {s.name: read_source(s) for s in cfg.sources}
        stats = {name: SourceStats(records=len(r)) for name, r in records.items()}
        overlap = _check_overlap(cfg, records, stats)
        rendered = _render_sources(cfg, renderer, records, stats)
        train_counts, mixture = _train_split(tmp / "train", cfg, rendered["train"])
        val_counts = _val_split(tmp / "val", cfg, rendered["val"])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        splits = {"train": train_counts, "val": val_counts}
        manifest = Manifest(
            stage="sft_data",
            key=key,
            config=cfg.model_dump(mode="json"),
            inputs=inputs,
            outputs={"train": "train", "val": "val", "tokenizer": "tokenizer", "report": "report.md"},
            counts={
                "records": sum(len(r) for r in records.values()),
                **{f"{split}_{n}": c[n] for split, c in splits.items() for n in ("examples", "rows", "tokens")},
            },
            timings={"total_s": time.perf_counter() - started},
            details={
                "sources": [s.name for s in cfg.sources],
                "tokenizer": {
                    "template": cfg.template.name,
                    "added_ids": added,
                    "vocab_size": len(tokenizer),
                    "eos_token": tokenizer.eos_token,
                    "pad_id": pad_id,
                },
                "packing": cfg.packing,
                "max_length": cfg.max_length,
                "truncation": cfg.truncation,
                "source_stats": {name: vars(s) for name, s in stats.items()},
                "overlap": overlap,
                "mixture": mixture,
                "splits": splits,
            },
        )
        write_text(tmp / "report.md", _report(manifest.details, rendered["train"]))
        manifest.write(tmp)
    return manifest


def _report(details: dict, train: dict[str, Examples]) -> str:
    lines = [
        "# Fine-tuning data",
        "",
        f"Template `{details['tokenizer']['template']}`, max_length "
        f"{details['max_length']}, packing {'on' if details['packing'] else 'off'}, truncation "
        f"`{details['truncation']}`.",
        "",
        "## Mixture (train)",
        "",
        mixture_markdown(details["mixture"]),
        "## Sources",
        "",
        "| source | records | test overlap | train | val | truncated | dropped (too long) | "
        "tokens merged across a prompt/response boundary |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in details["source_stats"].items():
        lines.append(
            f"| {name} | {s['records']:,} | {s['test_overlap']:,} | {s['train_records']:,} | "
            f"{s['val_records']:,} | {s['truncated']:,} | {s['dropped_too_long']:,} | {s['boundary_tokens']:,} |"
        )
    overlap = details["overlap"]
    lines += [
        "",
        "## Evaluation test overlap",
        "",
        f"{overlap['overlapping']:,} of {overlap['records']:,} records overlap a test item; "
        f"action: {overlap['action']}."
        if overlap["checked"]
        else "Not checked (no overlap.benchmarks_dir; allow_test_overlap is set).",
        "",
        "## Splits",
        "",
        "| split | examples | sequences | tokens | response tokens | fill |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split, c in details["splits"].items():
        lines.append(
            f"| {split} | {c['examples']:,} | {c['rows']:,} | {c['tokens']:,} | {c['response_tokens']:,} | "
            f"{c['fill']:.1%} |"
        )
    lines += ["", "## One example per source", "", "Tokens that carry loss are inside ⟦ ⟧.", ""]
    for name, ex in train.items():
        lines += [f"### {name}", "", "```text", (ex.text or "(no examples)")[:2000], "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading back


class PackedSplit:
    """One split of a prepared folder: sequences (rows) of examples, read from memory-mapped arrays."""

    def __init__(self, directory: Path, pad_id: int, packed: bool, sources: list[str]):
        load = lambda name: np.load(directory / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.tokens, self.loss, self.offsets = load("tokens"), load("loss"), load("offsets")
        self.row_offsets, self.row_examples, self.row_source = (
            load("row_offsets"),
            load("row_examples"),
            load("row_source"),
        )
        self.pad_id, self.packed, self.sources = pad_id, packed, sources
        self.n_rows = len(self.row_source)

    def row(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(ids, loss)`` examples of sequence ``i``."""
        examples = self.row_examples[self.row_offsets[i] : self.row_offsets[i + 1]]
        return [
            (np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.loss[a:b]))
            for a, b in ((self.offsets[e], self.offsets[e + 1]) for e in examples)
        ]

    def batch(self, rows, mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return collate([self.row(int(i)) for i in rows], self.pad_id, packed=self.packed, mask_dtype=mask_dtype)

    def rows_for(self, source: str | None = None) -> np.ndarray:
        """Indices of the sequences of ``source`` (all sequences when None)."""
        if source is None:
            return np.arange(self.n_rows)
        if source not in self.sources:
            raise MedfoundryError(f"unknown source {source!r}; sources are {self.sources}")
        return np.flatnonzero(np.asarray(self.row_source) == self.sources.index(source))

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        source: str | None = None,
        mask_dtype: torch.dtype = torch.float32,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the sequences (of ``source``), in stored order: for validation."""
        mine = self.rows_for(source)[rank::world_size]
        for start in range(0, len(mine), batch_size):
            yield self.batch(mine[start : start + batch_size], mask_dtype)


class SFTData:
    """A folder written by :func:`prepare`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "manifest.json").is_file():
            raise InputError(str(self.directory), "not prepared fine-tuning data (no manifest.json): run prepare first")
        manifest = Manifest.read(self.directory, "sft_data")
        self.manifest = manifest.details  # what the data is: max_length, packing, tokenizer, sources, ...
        self.tokenizer_dir = self.directory / "tokenizer"
        self.fingerprint = manifest.key

    def split(self, name: str) -> PackedSplit:
        if name not in SPLITS:
            raise MedfoundryError(f"unknown split {name!r}; expected one of {SPLITS}")
        return PackedSplit(
            self.directory / name,
            self.manifest["tokenizer"]["pad_id"],
            self.manifest["packing"],
            self.manifest["sources"],
        )

    def reader(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mask_dtype: torch.dtype = torch.float32,
    ) -> SFTReader:
        """The endless, shuffled, resumable train reader."""
        return SFTReader(
            self.split("train"),
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            mask_dtype=mask_dtype,
            fingerprint=self.fingerprint,
        )


class SFTReader(ShuffledOrder):
    """Endless batches of train sequences in :class:`~medfoundry.shuffled_order.ShuffledOrder`'s order.

    ``state_dict`` is one counter plus what it depends on; as for the pretraining reader, rank 0's
    state resumes any rank, and batch size may change between runs.
    """

    must_match = ("seed", "n_rows", "fingerprint")
    mismatch_hint = " (was the data prepared again?)"

    def __init__(
        self,
        split: PackedSplit,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mask_dtype: torch.dtype = torch.float32,
        fingerprint: str = "",
    ):
        if split.n_rows < 1:
            raise MedfoundryError("the train split has no sequences: add data or lower validation.fraction")
        super().__init__(split.n_rows, batch_size, rank=rank, world_size=world_size, seed=seed)
        self.split, self.mask_dtype, self.fingerprint = split, mask_dtype, fingerprint

    @property
    def n_rows(self) -> int:
        return self.n_items

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.split.batch(self.next_items(), self.mask_dtype)


def validation_passes(split: PackedSplit, batch_size: int, world_size: int, source: str | None = None) -> int:
    """Forward passes every rank must make to cover the validation rows (the busiest rank's count), so
    that collective operations (FSDP all-gathers) stay in step when ranks hold different numbers."""
    return math.ceil(math.ceil(len(split.rows_for(source)) / world_size) / batch_size)
