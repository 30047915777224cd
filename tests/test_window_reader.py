"""WindowReader: window contents, exact resume, disjoint ranks, whole epochs, refused states."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import shared
from medfoundry.errors import MedfoundryError
from medfoundry.tokenizer.reader import WindowReader
from medfoundry.tokenizer.shards import tokenize_corpus
from medfoundry.tokenizer.token_shards import TokenShards
from test_token_shards import read_abstracts, write_corpus

SEQ = 8


def counting_shards(directory: Path, n_tokens: int, n_shards: int = 3) -> TokenShards:
    """Shards whose token at position p is p, so a window's first token says which window it is."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, chunk in enumerate(np.array_split(np.arange(n_tokens, dtype="<u4"), n_shards)):
        chunk.tofile(directory / f"part-{s:05d}.bin")
        np.save(directory / f"part-{s:05d}.idx.npy", np.zeros(1, dtype=np.int64))
        entries.append({"bin": f"part-{s:05d}.bin", "idx": f"part-{s:05d}.idx.npy", "tokens": len(chunk), "docs": 1})
    index = {"dtype": "uint32", "eos_id": 0, "vocab_size": n_tokens, "shards": entries, "complete": True}
    (directory / "index.json").write_text(json.dumps(index))
    return TokenShards(directory)


def window_ids(batches) -> list[int]:
    ids = []
    for batch in batches:
        assert batch.dtype == np.int64 and batch.shape[1] == SEQ + 1
        assert (np.diff(batch, axis=1) == 1).all()  # contiguous runs of the counting shards
        assert (batch[:, 0] % SEQ == 0).all()
        ids.extend((batch[:, 0] // SEQ).tolist())
    return ids


def take(reader: WindowReader, n: int) -> list[np.ndarray]:
    return [next(reader) for _ in range(n)]


@pytest.fixture
def shards_100(tmp_path) -> TokenShards:
    return counting_shards(tmp_path / "count", 100 * SEQ + 1)  # exactly 100 windows


def test_windows_are_shard_slices_in_seeded_order(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root, read_abstracts(60), {"train": 2, "val": 1})
    tokenize_corpus(root, shared("tokenizers/gpt2"), tmp_path / "out", workers=1)
    shards = TokenShards(tmp_path / "out" / "train")
    reader = WindowReader(shards, 64, 4, seed=3)
    order = np.random.default_rng([3, 0]).permutation(reader.n_windows)
    assert reader.n_windows == (shards.total_tokens - 1) // 64
    rows = np.concatenate(take(reader, 3))
    for row, k in zip(rows, order[:12]):
        assert np.array_equal(row, shards.slice(k * 64, k * 64 + 65))


def test_resumed_reader_yields_the_same_batches(shards_100):
    uninterrupted = WindowReader(shards_100, SEQ, 7, rank=1, world_size=2, seed=5)
    take(uninterrupted, 5)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = take(uninterrupted, 6)  # positions 70..153: crosses the epoch boundary at 100

    resumed = WindowReader(shards_100, SEQ, 7, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 0
    assert all(np.array_equal(a, b) for a, b in zip(take(resumed, 6), expected))
    assert resumed.epoch == uninterrupted.epoch == 1

    rank0 = WindowReader(shards_100, SEQ, 7, rank=0, world_size=2, seed=5)
    rank0.load_state_dict(state)  # one saved state resumes every rank
    bigger = WindowReader(shards_100, SEQ, 14, rank=1, world_size=2, seed=5)
    bigger.load_state_dict(state)  # a new batch size continues from the same window
    assert np.array_equal(next(bigger), np.concatenate(expected[:2]))


@pytest.mark.parametrize("world_size,batch_size,epochs", [(2, 8, 4), (3, 5, 3)])
def test_ranks_are_disjoint_and_every_epoch_covers_every_window_once(shards_100, world_size, batch_size, epochs):
    batches = epochs * 100 // (world_size * batch_size)  # batches straddle epoch boundaries (100 % 16, 100 % 15)
    assert batches * world_size * batch_size == epochs * 100
    per_epoch = [Counter() for _ in range(epochs)]
    for rank in range(world_size):
        reader = WindowReader(shards_100, SEQ, batch_size, rank=rank, world_size=world_size, seed=1)
        for i, window in enumerate(window_ids(take(reader, batches))):
            per_epoch[(rank + i * world_size) // 100][window] += 1  # global position of this rank's i-th window
    for counts in per_epoch:
        assert counts == Counter(range(100))
    assert sum(per_epoch, Counter()) == Counter({w: epochs for w in range(100)})


def test_a_state_resumes_on_another_number_of_ranks_at_the_same_global_position(shards_100):
    """4 ranks read two batches, then 2 ranks continue from rank 0's state: the windows read after the
    switch are exactly the global positions that come next (what one rank reading on would see)."""
    one = WindowReader(shards_100, SEQ, 4, seed=3)
    expected = window_ids(take(one, 2)), window_ids(take(one, 1))
    four = [WindowReader(shards_100, SEQ, 1, rank=r, world_size=4, seed=3) for r in range(4)]
    first = [window_ids(take(reader, 2)) for reader in four]
    assert sorted(w for ids in first for w in ids) == sorted(expected[0])
    two = [WindowReader(shards_100, SEQ, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for reader in two:
        reader.load_state_dict(four[0].state_dict())
    assert sorted(w for reader in two for w in window_ids(take(reader, 1))) == sorted(expected[1])


def test_epochs_are_differently_shuffled(shards_100):
    reader = WindowReader(shards_100, SEQ, 50, seed=0)
    first, second = window_ids(take(reader, 2)), window_ids(take(reader, 2))
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    assert reader.batches_per_epoch == 2 and reader.epoch == 2


def test_bad_states_and_too_little_data_are_refused(shards_100, tmp_path):
    reader = WindowReader(shards_100, SEQ, 4, world_size=2)
    state = reader.state_dict()
    for field, value in [("seq_len", 16), ("n_windows", 99), ("seed", 1)]:
        with pytest.raises(MedfoundryError, match=f"{field} is {value}"):
            reader.load_state_dict({**state, field: value})
    with pytest.raises(MedfoundryError, match="non-negative integer"):
        reader.load_state_dict({**state, "position": -3})
    with pytest.raises(MedfoundryError, match="too little data"):
        WindowReader(counting_shards(tmp_path / "tiny", SEQ), SEQ, 1)
    with pytest.raises(MedfoundryError, match="rank"):
        WindowReader(shards_100, SEQ, 1, rank=2, world_size=2)
