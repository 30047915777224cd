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


def test_find_tcmalloc_prefers_the_minimal_library(monkeypatch, tmp_path):
    """The search itself, on a fake file tree: nothing installed, then the full and the minimal library."""
    monkeypatch.setattr(runtime, "_TCMALLOC_GLOBS", tuple(str(tmp_path) + g for g in runtime._TCMALLOC_GLOBS))
    assert runtime.find_tcmalloc() is None
    libdir = tmp_path / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (libdir / "libtcmalloc.so.4").write_bytes(b"")
    assert runtime.find_tcmalloc() == str(libdir / "libtcmalloc.so.4")
    (libdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert runtime.find_tcmalloc() == str(libdir / "libtcmalloc_minimal.so.4")


def test_find_tcmalloc():
    """On this machine: Debian's libtcmalloc-minimal4, which scripts/setup.sh installs, is found where it is."""
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


def _cli_starts(tmp_path: Path, **extra_env: str) -> list[tuple[str, str, str]]:
    """Run ``medfoundry --version``; a sitecustomize records, in each interpreter started, its pid, whether
    tcmalloc is mapped into it and the re-exec's marker variable."""
    log = tmp_path / "procs.log"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "maps = open('/proc/self/maps').read()\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(f\"{os.getpid()} {'tcmalloc' in maps} {os.environ.get('MEDFOUNDRY_ALLOCATOR_CHECKED')}\\n\")\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "medfoundry", "--version"],
        env={**_cli_env(tmp_path), **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"medfoundry {__version__}"
    return [tuple(line.split()) for line in log.read_text().splitlines()]


def test_cli_reexec_runs(tmp_path):
    starts = _cli_starts(tmp_path)
    if runtime.find_tcmalloc() is None:  # nothing to preload: one start, glibc's malloc
        assert [start[1:] for start in starts] == [("False", "None")]
        return
    # two starts of the same process (execve keeps the pid): glibc first, then tcmalloc preloaded
    (pid1, mapped1, flag1), (pid2, mapped2, flag2) = starts
    assert pid1 == pid2
    assert (mapped1, flag1) == ("False", "None")
    assert (mapped2, flag2) == ("True", "1")


def test_cli_opt_out(tmp_path):
    """MEDFOUNDRY_NO_TCMALLOC=1: one start, no tcmalloc mapped, no re-exec marker (where tcmalloc is installed
    test_cli_reexec_runs shows the same command re-executes without the opt-out)."""
    if runtime.find_tcmalloc() is None:
        pytest.skip(
            "needs Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it): without it nothing re-executes"
        )
    starts = _cli_starts(tmp_path, MEDFOUNDRY_NO_TCMALLOC="1")
    assert [start[1:] for start in starts] == [("False", "None")]


# ---------------------------------------------------------------- device and precision


def test_cpu_has_bf16_matches_cpuid():
    """Against an independent source: torch's cpuinfo library, which executes CPUID itself (it does not read
    /proc/cpuinfo). On this project's AMD EPYC VM, whose hypervisor hides AVX-512, both say no."""
    torch = pytest.importorskip("torch")
    capabilities = torch.cpu.get_capabilities()
    assert runtime.cpu_has_bf16() == bool(capabilities["avx512_bf16"] or capabilities["amx_bf16"])


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        ("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # Zen 4/5, Cooper Lake
        ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n", True),  # Sapphire Rapids
        ("flags\t\t: fpu avx2 avx512f avx512_vnni\n", False),  # Skylake-SP, Ice Lake: AVX-512 but no BF16
        ("flags\t\t: fpu sse4_2 avx avx2 fma\n", False),
        (None, False),  # no /proc/cpuinfo
    ],
)
def test_cpu_has_bf16_reads_the_flags(monkeypatch, cpuinfo, expected):
    import io

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)
    assert runtime.cpu_has_bf16() is expected


def test_resolve_device_precision_on_cpu(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        skip_machine("this test describes a CPU-only machine")
    capabilities = torch.cpu.get_capabilities()  # CPUID, as above
    expected = "bf16" if capabilities["avx512_bf16"] or capabilities["amx_bf16"] else "fp32"
    assert runtime.resolve_device_precision() == ("cpu", expected)
    assert runtime.resolve_device_precision("auto", "auto") == ("cpu", expected)
    assert runtime.resolve_device_precision("cpu", "fp32") == ("cpu", "fp32")
    assert runtime.resolve_device_precision("cpu") == ("cpu", expected)
    for native in (True, False):  # both answers, whichever CPU this is
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda native=native: native)
        assert runtime.resolve_device_precision() == ("cpu", "bf16" if native else "fp32")
        assert runtime.resolve_device_precision("cpu", "fp32") == ("cpu", "fp32")
