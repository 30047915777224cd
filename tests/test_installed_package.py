"""medfoundry as a user installs it (a wheel, not this checkout), run from a folder outside the checkout: ``eval``
finds its packaged task YAMLs and reads the benchmark files from ``$MEDFOUNDRY_BENCHMARKS``; without it (nor
``benchmarks_dir``) it says so in one line naming both, instead of guessing a folder beside the installed package.

The wheel is built from a copy of the sources (``pip wheel --no-deps``) and installed with ``--no-deps`` into a
fresh venv whose site-packages also sees the dev venv's dependencies through a ``.pth`` line: a folder added that
way has its own ``.pth`` files ignored, so the dev venv's editable finder for medfoundry is not installed, and the
test checks that ``medfoundry`` comes from the new venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO, shared
from test_eval_run import tiny_model


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The new venv's bin folder, with the wheel of this checkout's sources installed in it."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # everything is here: nothing is fetched
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)], root, env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("medfoundry-*.whl")

    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip()
    )
    (site / "zz-dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], root, env)
    assert done.returncode == 0, done.stderr[-3000:]
    where = _run([str(python), "-c", "import medfoundry; print(medfoundry.__file__)"], root, env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout  # the wheel's, not the checkout's
    return target / "bin"


def test_eval_from_an_installed_package(installed, tmp_path):
    benchmarks = shared("benchmarks")
    model = tiny_model(tmp_path / "tiny", 0)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MEDFOUNDRY_BENCHMARKS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MEDFOUNDRY_NO_TCMALLOC="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    argv = [str(installed / "medfoundry"), "eval", "--model", str(model), "--tasks", "pubmedqa", "--limit", "2"]
    argv += ["--set", "threads=1", "--set", "bootstrap_iters=0", "--quiet"]

    missing = _run([*argv, "--output", str(outside / "none")], outside, env)
    assert missing.returncode == 2, missing.stdout + missing.stderr[-3000:]
    error = missing.stderr.strip()
    assert error.count("\n") == 0 and "Traceback" not in error, error
    assert error.startswith("error: task pubmedqa (") and "no local file for its 'test' split" in error
    assert "set benchmarks_dir in the eval config" in error and "MEDFOUNDRY_BENCHMARKS environment variable" in error
    assert str(installed.parent) in error  # the packaged task YAML, read from the installed package

    done = _run([*argv, "--output", str(outside / "out")], outside, {**env, "MEDFOUNDRY_BENCHMARKS": str(benchmarks)})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert (outside / "out" / "tiny" / "results.json").is_file() and "PubMedQA" in done.stdout
