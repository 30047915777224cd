"""Threads, allocator and precision: configure(), tcmalloc discovery and re-exec, device/precision choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci_skips import skip_machine
from medfoundry import __version__, runtime

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ALLOCATOR_VARS = ("MEDFOUNDRY_ALLOCATOR_CHECKED", "MEDFOUNDRY_NO_TCMALLOC", "LD_PRELOAD")


@pytest.fixture
def clean_thread_env(monkeypatch):
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield monkeypatch
    if torch is not None:
        torch.set_num_threads(before)


def test_cpu_count_respects_affinity():
    assert runtime.cpu_count() == len(os.sched_getaffinity(0)) >= 1


def test_configure_sets_threads_when_unset(clean_thread_env):
    rt = runtime.configure()
    assert rt.threads >= 1 and rt.threads == runtime.cpu_count()
    for var in THREAD_VARS:
        assert os.environ[var] == str(rt.threads)
    assert rt.allocator in ("tcmalloc", "glibc")
    assert rt.describe() == {"threads": rt.threads, "allocator": rt.allocator}


def test_configure_honours_user_omp_num_threads(clean_thread_env):
    clean_thread_env.setenv("OMP_NUM_THREADS", "1")
    clean_thread_env.setenv("MKL_NUM_THREADS", "7")
    rt = runtime.configure()
    assert rt.threads == 1  # the count reported is the one in effect
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "7"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_configure_ignores_invalid_omp_num_threads(clean_thread_env):
    clean_thread_env.setenv("OMP_NUM_THREADS", "")
    rt = runtime.configure()
    assert rt.threads == runtime.cpu_count() and os.environ["OMP_NUM_THREADS"] == str(rt.threads)


def test_configure_explicit_count_wins(clean_thread_env):
    clean_thread_env.setenv("OMP_NUM_THREADS", "5")
    rt = runtime.configure(2)
    assert rt.threads == 2
    assert all(os.environ[var] == "2" for var in THREAD_VARS)


def test_configure_sets_torch_threads_when_imported(clean_thread_env):
    torch = pytest.importorskip("torch")
    runtime.configure(1)
    assert torch.get_num_threads() == 1


def test_allocator_reported_from_ld_preload(clean_thread_env):
    clean_thread_env.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert runtime.tcmalloc_loaded() and runtime.configure().allocator == "tcmalloc"
    clean_thread_env.delenv("LD_PRELOAD")
    assert not runtime.tcmalloc_loaded() and runtime.configure().allocator == "glibc"


def test_find_tcmalloc():
    lib = runtime.find_tcmalloc()
    if lib is None:
        pytest.skip("needs Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it)")
    assert os.path.isabs(lib) and Path(lib).is_file() and "tcmalloc" in Path(lib).name


# ---------------------------------------------------------------- re-exec with tcmalloc


@pytest.fixture
def fake_execve(monkeypatch):
    for var in ALLOCATOR_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    return calls


def test_reexec_command_and_env(fake_execve, monkeypatch):
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libother.so")
    runtime.maybe_reexec_with_tcmalloc(["corpus", "build", "c.yaml", "--set", "workers=2"])
    ((exe, args, env),) = fake_execve
    assert exe == sys.executable
    assert args == [sys.executable, "-m", "medfoundry", "corpus", "build", "c.yaml", "--set", "workers=2"]
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4:/opt/lib/libother.so"
    assert env["MEDFOUNDRY_ALLOCATOR_CHECKED"] == "1"
    assert os.environ.get("MEDFOUNDRY_ALLOCATOR_CHECKED") is None  # the current process is left alone


@pytest.mark.parametrize(
    "var, value",
    [("MEDFOUNDRY_ALLOCATOR_CHECKED", "1"), ("MEDFOUNDRY_NO_TCMALLOC", "1"), ("LD_PRELOAD", "/x/libtcmalloc.so.4")],
)
def test_no_reexec(fake_execve, monkeypatch, var, value):
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setenv(var, value)
    runtime.maybe_reexec_with_tcmalloc(["--version"])
    assert fake_execve == []


def test_no_reexec_without_tcmalloc(fake_execve, monkeypatch):
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: None)
    runtime.maybe_reexec_with_tcmalloc(["--version"])
    assert fake_execve == []


def _cli_env(extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return env


def test_cli_reexec_runs(tmp_path):
    # a sitecustomize records, in each interpreter started, whether tcmalloc is mapped into it
    log = tmp_path / "procs.log"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "maps = open('/proc/self/maps').read()\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(f\"{os.getpid()} {'tcmalloc' in maps} {os.environ.get('MEDFOUNDRY_ALLOCATOR_CHECKED')}\\n\")\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "medfoundry", "--version"],
        env=_cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"medfoundry {__version__}"
    starts = log.read_text().split("\n")[:-1]
    if runtime.find_tcmalloc() is None:
        assert len(starts) == 1
        return
    # two starts of the same process (execve keeps the pid): glibc first, then tcmalloc preloaded
    (pid1, mapped1, flag1), (pid2, mapped2, flag2) = (line.split() for line in starts)
    assert pid1 == pid2
    assert (mapped1, flag1) == ("False", "None")
    assert (mapped2, flag2) == ("True", "1")


def test_cli_opt_out(tmp_path):
    env = _cli_env()
    env["MEDFOUNDRY_NO_TCMALLOC"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "medfoundry", "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"medfoundry {__version__}"


# ---------------------------------------------------------------- device and precision


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_cpu_has_bf16_matches_cpuinfo():
    flags = _cpu_flags()
    assert runtime.cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_resolve_device_precision_on_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        skip_machine("this test describes a CPU-only machine")
    expected = "bf16" if {"avx512_bf16", "amx_bf16"} & _cpu_flags() else "fp32"
    assert runtime.resolve_device_precision() == ("cpu", expected)
    assert runtime.resolve_device_precision("auto", "auto") == ("cpu", expected)
    assert runtime.resolve_device_precision("cpu", "fp32") == ("cpu", "fp32")
    assert runtime.resolve_device_precision("cpu") == ("cpu", expected)
