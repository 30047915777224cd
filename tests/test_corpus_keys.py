"""Key record files: a key range reads each record exactly once, whatever the number of ranges."""

from __future__ import annotations

import numpy as np

from medfoundry.corpus import keys


def test_ranges_partition_every_record_exactly_once(tmp_path):
    rng = np.random.default_rng(0)
    edge = [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    tasks = []
    for task in range(3):
        key = np.r_[np.array(edge, dtype=np.uint64), rng.integers(0, 2**64 - 1, 500, dtype=np.uint64, endpoint=True)]
        recs = keys.records(key, rng.integers(0, 4, len(key)), keys.make_ref(task, np.arange(len(key))), 0)
        keys.write_sorted(keys.key_file(tmp_path, task, keys.BAND), recs)
        tasks.append(recs)
    expected = np.sort(np.concatenate(tasks)["ref"])
    for ranges in (1, 2, 3, 7, 64):
        bounds = keys.key_bounds(ranges)
        parts = [keys.gather(tmp_path, 3, keys.BAND, int(bounds[r]), int(bounds[r + 1])) for r in range(ranges)]
        assert np.array_equal(np.sort(np.concatenate(parts)["ref"]), expected)
        for r, part in enumerate(parts):
            assert (part["key"] >= np.uint64(int(bounds[r]))).all()
            assert np.all(np.diff(part["key"].astype(np.float64)) >= 0)


def test_empty_key_files_read_as_no_records(tmp_path):
    keys.write_sorted(keys.key_file(tmp_path, 0, keys.ID), keys.records(np.zeros(0, np.uint64), 0, 0, 0))
    assert len(keys.gather(tmp_path, 1, keys.ID, 0, 2**64)) == 0


def test_groups_need_the_same_key_and_band():
    recs = keys.records(np.array([5, 5, 5, 7, 9, 9], dtype=np.uint64), np.array([0, 0, 1, 0, 2, 2]), np.arange(6), 0)
    assert list(keys.groups(recs)) == [(0, 2), (4, 6)]
    assert keys.in_groups(recs)["ref"].tolist() == [0, 1, 4, 5]
