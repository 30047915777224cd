"""The GPU tests (marker ``gpu``, run by ``make test-gpu``): skipped, every one of them, on a machine without CUDA.

That skip is about hardware, so it holds under ``CI=true`` too. A test that needs more than one GPU skips itself
as well (``needs_gpus``). The folder is a package (``gpu.conftest``), so the suite's own ``conftest`` and test
modules (fixtures, tiny models) stay importable by name from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ci_skips import MACHINE

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip before any fixture runs: the module fixtures (corpora, tokenizers, tiny models) cost minutes on CPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"{MACHINE}needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def needs_gpus(count: int):
    """Skip a test unless this machine has at least ``count`` CUDA devices."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(
        available < count, reason=f"{MACHINE}needs {count} CUDA GPUs, this machine has {available}"
    )
