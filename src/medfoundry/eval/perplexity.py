"""Held-out perplexity of a causal LM on texts or on medfoundry token shards.

What is scored, exactly (the same as lm-evaluation-harness ``loglikelihood_rolling``):

* Each document is scored on its own: the sequence is ``[prefix] + tokens``, where the prefix is the
  tokenizer's BOS token, or its EOS token when it has no BOS (lm-eval's ``prefix_token_id``), so the
  first token too has something to condition on (token shards: their EOS id, see shard_perplexity). Every
  token of the document is scored exactly once; the prefix is not scored and no end-of-document token is appended.
* Windows hold at most ``max_length`` input tokens. The first scores all of its tokens; each later
  window ends ``stride`` tokens further on, scores only those last ``stride`` tokens (fewer at the
  end of the document) and sees the ``max_length - stride`` or more tokens before them as context.
  ``stride == max_length`` (the default) is lm-eval's disjoint rolling windows
  (``get_rolling_token_windows`` with ``context_len=1`` + ``make_disjoint_window``): per-document
  totals equal ``HFLM.loglikelihood_rolling``'s. A smaller stride is the Hugging Face "perplexity of
  fixed-length models" method: more context per token, so lower perplexity; on long documents the
  base model runs about ``max_length / stride`` times as many positions (the output layer still only
  the scored ones).
* Texts are encoded without special tokens. lm-eval encodes with the tokenizer's defaults, so for a
  tokenizer that adds BOS itself (LLaMA's) it also scores that BOS after the BOS prefix; the totals
  here equal lm-eval run with ``add_bos_token=False``.

Metrics (lm-eval's ``weighted_perplexity`` and ``bits_per_byte`` aggregations): ``nll`` is the total
negative log-likelihood in nats over all documents; token perplexity ``exp(nll / tokens)``, word
perplexity ``exp(nll / words)`` with lm-eval's word count ``len(re.split(r"\\s+", text))``, byte
perplexity ``exp(nll / bytes)`` and bits per byte ``nll / (bytes * ln 2)`` over UTF-8 bytes. Only the
word and byte figures compare models with different tokenizers. Bits per byte is
:func:`medfoundry.model.bits_per_byte.bits_per_byte`, the definition pretraining's ``val_bpb`` uses too:
special tokens contribute neither loss nor bytes. A document here holds none (texts are encoded without
adding any, a shard document is the tokens between two EOS; a shard document's bytes are
:func:`~medfoundry.model.bits_per_byte.text_bytes` of its tokens), so every scored token counts, over the
text's bytes: a pretraining validation window ``[EOS] + document + [EOS]`` gives the same figure.

Speed and memory: windows of many documents are batched together (right padding with an attention
mask, windows sorted by length so batches pad little), the base model runs once per batch and the
output layer is applied only to the scored positions, a chunk of rows at a time, with the
log-softmax in float32. ``precision="bf16"`` runs the model under bfloat16 autocast.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from medfoundry.errors import ConfigError, InputError, MedfoundryError
from medfoundry.eval.device import upload
from medfoundry.io import iter_json_lines, iter_lines
from medfoundry.model.bits_per_byte import bits_per_byte, special_ids, text_bytes

PRECISIONS = ("fp32", "bf16")
ENCODE_BATCH = 64  # texts per tokenizer call
POOL_BATCHES = 16  # windows are pooled this many batches deep and sorted by length before batching
LOGIT_ELEMENTS = 2**24  # logits materialized at once (64 MB in float32), whatever the vocabulary size
_WORDS = re.compile(r"\s+")


@dataclass
class PerplexityResult:
    """Totals over the evaluated documents; the perplexities are derived from them.

    ``words`` and ``bytes`` are 0 when no text was available (token shards without a tokenizer); the
    word and byte metrics are then None.
    """

    documents: int = 0
    tokens: int = 0
    words: int = 0
    bytes: int = 0
    nll: float = 0.0  # total negative log-likelihood, nats

    @property
    def token_perplexity(self) -> float | None:
        return _perplexity(self.nll, self.tokens)

    @property
    def word_perplexity(self) -> float | None:
        return _perplexity(self.nll, self.words)

    @property
    def byte_perplexity(self) -> float | None:
        return _perplexity(self.nll, self.bytes)

    @property
    def bits_per_byte(self) -> float | None:
        return bits_per_byte(self.nll, self.bytes)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "token_perplexity": self.token_perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }

    def _add_document(self, tokens: int, text: str | None, n_bytes: int | None = None) -> None:
        """Count a document: its words and bytes from ``text``, or its bytes ``n_bytes`` when given."""
        self.documents += 1
        self.tokens += tokens
        if text is not None:
            self.words += len(_WORDS.split(text))
            self.bytes += len(text.encode("utf-8")) if n_bytes is None else n_bytes


def _perplexity(nll: float, count: int) -> float | None:
    if not count:
        return None
    mean = nll / count
    return math.exp(mean) if mean < 700 else math.inf  # a diverged model must not raise OverflowError


# -- reading texts -----------------------------------------------------------------------------


def iter_eval_texts(
    path: str | Path,
    *,
    split: str = "val",
    text_field: str = "text",
    limit: int | None = None,
    sources: list[str] | None = None,
) -> Iterator[str]:
    """The documents of a held-out file or corpus, as strings, at most ``limit`` of them.

    ``path`` is one of: a medfoundry corpus directory (the ``{split}/part-*.jsonl.gz`` parts of
    ``corpus build``); a ``.jsonl`` / ``.jsonl.gz`` file (each record's ``text_field``); a ``.txt`` /
    ``.txt.gz`` file, where each block of lines separated by blank lines is one document (so a file
    without blank lines is a single document; line breaks inside a block are kept). ``sources`` keeps
    only JSONL records whose ``source`` field is one of them (a corpus's held-out abstracts, or its
    papers). The path is checked now; a bad record raises InputError with its file and line when reached.
    """
    from medfoundry.corpus.documents import corpus_parts

    path = Path(path)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}")
    if path.is_dir():
        texts = (text for part in corpus_parts(path, split) for text in _jsonl_texts(part, text_field, sources))
    elif not path.is_file():
        raise InputError(str(path), "not found")
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = _jsonl_texts(path, text_field, sources)
    elif sources:
        raise ConfigError(f"{path}: sources filters JSONL records by their 'source' field; a text file has none")
    elif path.name.endswith((".txt", ".txt.gz")):
        texts = _text_blocks(path)
    else:
        raise InputError(str(path), "expected a corpus directory, a .jsonl(.gz) file or a .txt(.gz) file")
    return islice(texts, limit)


def _jsonl_texts(path: Path, field: str, sources: list[str] | None = None) -> Iterator[str]:
    for line_no, record in iter_json_lines(path):
        if sources is not None and (not isinstance(record, dict) or record.get("source") not in sources):
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = f"fields: {', '.join(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise InputError(str(path), f"no string field {field!r} ({found})", line_no)
        yield text


def _text_blocks(path: Path) -> Iterator[str]:
    block: list[str] = []
    for _, line in iter_lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


# -- entry points ------------------------------------------------------------------------------


def text_perplexity(
    model,
    tokenizer,
    texts: Iterable[str],
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` (a ``transformers`` causal LM) on ``texts``, encoded by ``tokenizer``
    (a ``transformers`` tokenizer). See the module docstring for what is scored."""
    stride = _check_args(max_length, stride, batch_size, precision)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to put before each document")
    documents = _encoded(tokenizer, texts)
    return _evaluate(model, documents, prefix, max_length, stride, batch_size, precision, progress, total=None)


def shard_perplexity(
    model,
    shards_dir: str | Path,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    limit_tokens: int | None = None,
    tokenizer=None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity on one split of medfoundry token shards (the directory holding its ``index.json``).

    Each shard document is scored as a text document would be, with the shards' EOS id (the token
    that precedes every document in the packed training stream) as its prefix. With ``limit_tokens``,
    whole documents are taken in order until their tokens reach the limit (the last may run past it).
    Words are counted on ``tokenizer.decode(ids)`` and bytes by :func:`~medfoundry.model.bits_per_byte.text_bytes`
    (both the original text for byte-level BPE tokenizers such as GPT-2's and medfoundry's); without a
    tokenizer only token perplexity is known.
    """
    stride = _check_args(max_length, stride, batch_size, precision)
    if limit_tokens is not None and limit_tokens < 1:
        raise ConfigError(f"limit_tokens must be at least 1, not {limit_tokens}")
    shards = _open_shards(Path(shards_dir), model)
    special = special_ids(tokenizer) if tokenizer is not None else None
    documents = (
        (ids, _decode(tokenizer, ids), text_bytes(tokenizer, ids, special)) if tokenizer is not None else (ids, None)
        for ids in _shard_documents(shards, limit_tokens)
    )
    total = shards.total_tokens - shards.num_docs  # every document's tokens, without the EOS after each
    total = min(total, limit_tokens) if limit_tokens is not None else total
    return _evaluate(model, documents, shards.eos_id, max_length, stride, batch_size, precision, progress, total)


def _check_args(max_length: int, stride: int | None, batch_size: int, precision: str) -> int:
    """The stride to use (default ``max_length``), after checking every setting."""
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, not {max_length}")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride must be between 1 and max_length ({max_length}), not {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return stride


def _encoded(tokenizer, texts: Iterable[str]) -> Iterator[tuple[Sequence[int], str]]:
    """(token ids without special tokens, text), encoding a batch of texts per tokenizer call."""
    texts = iter(texts)
    while chunk := list(islice(texts, ENCODE_BATCH)):
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        yield from zip(ids, chunk)


def _open_shards(path: Path, model):
    from medfoundry.tokenizer.token_shards import TokenShards

    if not (path / "index.json").is_file() and (path / "val" / "index.json").is_file():
        raise InputError(str(path), f"holds token shards of several splits: pass one split, e.g. {path / 'val'}")
    shards = TokenShards(path)
    model_vocab = model.get_output_embeddings().weight.shape[0]
    if shards.vocab_size > model_vocab:
        raise InputError(
            str(path),
            f"tokenized with a {shards.vocab_size:,}-token vocabulary but the model has "
            f"{model_vocab:,} outputs: not this model's tokenizer",
        )
    return shards


def _shard_documents(shards, limit_tokens: int | None) -> Iterator[np.ndarray]:
    taken = 0
    for i in range(shards.num_docs):
        if limit_tokens is not None and taken >= limit_tokens:
            return
        ids = shards.document(i)
        taken += len(ids)
        yield ids


def _decode(tokenizer, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)


# -- windows and scoring -----------------------------------------------------------------------


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, scored)`` per window over ``seq = [prefix] + tokens`` (``n_tokens`` tokens):
    the input is ``seq[start:end]`` and its last ``scored`` predictions, of ``seq[end - scored + 1:end + 1]``,
    are counted. Later windows are always full ``max_length`` windows ending at their last scored token:
    for ``stride == max_length`` this is lm-eval's disjoint windowing, token for token."""
    if n_tokens == 0:
        return
    end = min(max_length, n_tokens)
    yield 0, end, end
    while end < n_tokens:
        scored = min(stride, n_tokens - end)
        end += scored
        yield end - max_length, end, scored


def _evaluate(
    model,
    documents,
    prefix: int,
    max_length: int,
    stride: int,
    batch_size: int,
    precision: str,
    progress: bool,
    total: int | None,
) -> PerplexityResult:
    """Window every document, pool the windows and score them in length-sorted batches."""
    from tqdm import tqdm

    result = PerplexityResult()
    was_training = model.training
    model.eval()
    try:
        scorer = _Scorer(model, precision)
        pool: list[tuple[np.ndarray, int, int, int]] = []
        with tqdm(total=total, desc="perplexity", unit="tok", unit_scale=True, disable=not progress) as bar:
            for ids, *text in documents:  # (ids, text) or (ids, text, bytes)
                result._add_document(len(ids), *text)
                seq = np.concatenate(([prefix], np.asarray(ids, dtype=np.int64)))
                pool.extend((seq, *window) for window in rolling_windows(len(ids), max_length, stride))
                if len(pool) >= POOL_BATCHES * batch_size:
                    result.nll += scorer.score_pool(pool, batch_size, bar)
                    pool = []
            result.nll += scorer.score_pool(pool, batch_size, bar)
    finally:
        model.train(was_training)
    return result


class _Scorer:
    """Sums the NLL of the scored tokens of windows, running the output layer only where it is needed."""

    def __init__(self, model, precision: str):
        self.model, self.base, self.head = model, model.base_model, model.get_output_embeddings()
        if self.base is model or self.head is None:
            raise MedfoundryError(f"{type(model).__name__} is not a causal LM with a base model and an output layer")
        self.device = next(model.parameters()).device
        self.bf16 = precision == "bf16"
        self.rows = max(1, LOGIT_ELEMENTS // self.head.weight.shape[0])
        self._check_head()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.inference_mode()
    def _check_head(self) -> None:
        """Scoring applies the output layer to the base model's hidden states itself; a model whose forward
        transforms its logits further (soft-capping, scaling) would be scored wrongly, so refuse it."""
        probe = torch.arange(8, device=self.device).unsqueeze(0)
        with self._autocast():
            expected = self.model(input_ids=probe).logits.float()
            ours = self.head(self.base(input_ids=probe).last_hidden_state).float()
        if not torch.allclose(ours, expected, rtol=1e-3, atol=1e-3):
            raise MedfoundryError(
                f"{type(self.model).__name__}'s logits are not its output layer applied to its "
                "hidden states (logit soft-capping or scaling?): perplexity does not support it"
            )

    @torch.inference_mode()
    def score_pool(self, pool: list, batch_size: int, bar) -> float:
        """Total NLL of the pool's windows; sorting by length first keeps padding (wasted compute) small. The
        batches' sums add up on the device, read once per pool: no batch waits for the one before."""
        pool = sorted(pool, key=lambda w: w[2] - w[1], reverse=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(pool), batch_size):
            batch = pool[i : i + batch_size]
            total += self.score_batch(batch)
            bar.update(sum(w[3] for w in batch))
        return total.item()

    @torch.inference_mode()
    def score_batch(self, windows: list[tuple[np.ndarray, int, int, int]]) -> torch.Tensor:
        """The summed NLL (float64, on the device) of the windows' scored tokens."""
        ids, mask, scored, targets = (upload(a, self.device) for a in _batch_arrays(windows))
        with self._autocast():
            hidden = self.base(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[scored]
        nll = torch.cat(
            [
                self._token_nll(hidden[i : i + self.rows], targets[i : i + self.rows])
                for i in range(0, len(targets), self.rows)
            ]
        )
        return nll.double().sum()

    def _token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.head(hidden)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def _batch_arrays(windows: list[tuple[np.ndarray, int, int, int]]):
    """Right-padded input ids, attention mask, the scored positions (indices into the flattened rows, row-major:
    boolean indexing would wait for the device to count them) and the scored targets, in the same order."""
    width = max(end - start for _, start, end, _ in windows)
    ids = np.zeros((len(windows), width), np.int64)
    mask = np.zeros((len(windows), width), np.int64)
    scored = np.zeros((len(windows), width), bool)
    targets = []
    for row, (seq, start, end, count) in enumerate(windows):
        length = end - start
        ids[row, :length] = seq[start:end]
        mask[row, :length] = 1
        scored[row, length - count : length] = True
        targets.append(seq[end - count + 1 : end + 1])
    return ids, mask, np.flatnonzero(scored), np.concatenate(targets)
