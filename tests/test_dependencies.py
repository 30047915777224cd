"""Dependency hygiene: every package the code imports is declared in pyproject.toml (as a dependency or in the
extra that medfoundry.extras names for it), and a feature whose extra is missing says which extra to install."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from medfoundry.extras import EXTRA_OF, MissingExtra, require

SRC = REPO / "src" / "medfoundry"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def _imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the package, minus the standard library and medfoundry itself."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"medfoundry", "__future__"}


def test_every_imported_package_is_declared():
    """A module imported by the code comes from a declared dependency, or from the extra medfoundry.extras names
    for it (and that extra lists it)."""
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}
    owners = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(_imported_modules()):
        distributions = {_name(d) for d in owners.get(module, [])}
        assert distributions, f"{module} is imported but no installed distribution provides it"
        declared = core | extras.get(EXTRA_OF.get(module, ""), set())
        if not distributions & declared:
            undeclared.append(f"{module} (from {', '.join(sorted(distributions))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_extra_named_by_the_code_exists_and_dev_installs_them_all():
    extras = PYPROJECT["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    everything = "".join(extras["all"])
    assert all(extra in everything for extra in set(EXTRA_OF.values()))
    assert "medfoundry[all]" in extras["dev"]


def test_lower_bounds_match_the_apis_used():
    """torch.nn.utils.get_total_norm (gradient clipping) appeared in torch 2.6; the library caps stay on the
    minor versions this checkout is tested with."""
    pins = {_name(r): r for r in PYPROJECT["dependencies"]}
    assert pins["torch"] == "torch>=2.6"
    for name in ("transformers", "datatrove"):
        upper = re.search(r"<(\d+)\.(\d+)", pins[name])
        assert upper, f"{name} has no upper bound on its minor version"
        major, minor = (int(x) for x in importlib.metadata.version(name).split(".")[:2])
        assert (major, minor) < (int(upper[1]), int(upper[2])), f"installed {name} is outside {pins[name]}"


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled package looks like to import
    with pytest.raises(MissingExtra, match=r"W&B logging needs wandb, which is not installed: pip install "
                       r"'medfoundry\[tracking\]'"):  # fmt: skip
        require("wandb", "W&B logging")


BLOCKER = """
import sys
from importlib.abc import MetaPathFinder
BLOCKED = set(sys.argv[1].split(","))
class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
from medfoundry.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _without(modules: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, modules, *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    (tmp_path / "model").mkdir()
    gguf = _without("gguf", "convert", str(tmp_path / "model"), str(tmp_path / "out.gguf"), "--to", "gguf")
    assert gguf.returncode == 2, gguf.stderr
    assert gguf.stderr.strip().splitlines()[-1] == (
        "error: GGUF export needs gguf, which is not installed: pip install 'medfoundry[gguf]'"
    )
    serve = _without("fastapi,uvicorn", "serve", str(tmp_path / "model"))
    assert serve.returncode == 2, serve.stderr
    assert "pip install 'medfoundry[serve]'" in serve.stderr.strip().splitlines()[-1]
