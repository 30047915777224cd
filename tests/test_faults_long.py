"""Faults, the long versions (``make test-long``; deselected by default and in CI): many SIGKILLs at random
points of corpus build, tokenization and training, SIGKILLs in the middle of checkpoint saves, full disks
(RLIMIT_FSIZE, and a small tmpfs when one can be mounted) during saves, and corrupted or truncated
checkpoints and token shards, on a small real pipeline. Each scenario is the one of
``benchmarks/reliability_faults.py`` (see its docstring), run with its full number of tries: every try must
end with no document lost or duplicated, shards byte-identical and final weights bit-identical to the
uninterrupted reference run. ``MEDFOUNDRY_FAULT_SEED`` picks other random kill points (default 0)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from conftest import REPO, shared

sys.path.insert(0, str(REPO / "benchmarks"))
import reliability_faults as rr
from reliability_report import table

pytestmark = [pytest.mark.long, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> rr.Context:
    shared("corpus/pubmed_abstracts.jsonl.gz")
    context = rr.Context(
        quick=False,
        work=tmp_path_factory.mktemp("reliability"),
        seed=int(os.environ.get("MEDFOUNDRY_FAULT_SEED", "0")),
        deadline=time.monotonic() + 24 * 3600,
    )
    rr.prepare_faults(context)
    return context


@pytest.mark.parametrize("name", list(rr.FAULT_SCENARIOS))
def test_fault_scenario(ctx, name):
    scenario, _, tries = rr.FAULT_SCENARIOS[name]
    row = scenario(ctx, tries)
    print(table([row]))
    assert row.tries == tries
    assert row.failures == 0, "\n".join(row.problems)
    assert row.data_lost == 0
    assert row.injected >= tries  # every try did inject at least one fault
