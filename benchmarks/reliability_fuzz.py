"""Fuzz scenarios (group ``fuzz``): every reader of untrusted input fed hostile and random input.

*Hypothesis scenarios* run the checks and strategies of ``tests/fuzz_targets.py`` (the ones
``tests/test_fuzz_readers.py`` runs) on fresh examples seeded from ``--seed``: the PubMed and JATS readers,
the corpus JSONL readers, the strict JSONL reader, the instruction-data readers, the chat-template renderer
and hostile XML (billion laughs, quadratic blowup, XXE to a file or to a local server, parameter entities,
external DTDs, XInclude, deep nesting). File inputs go through plain, gzipped and truncated gzip files.
A try is one example. It survived when the target ended with records that can be written as UTF-8 JSON, or
with an ``InputError`` naming the file (strict and lenient modes agreeing; for hostile XML also: nothing
expanded, the secret nowhere, no network access). Any other exception, a failed check, or an example
running past :data:`EXAMPLE_SECONDS` is a failure: hypothesis shrinks it (for at most
:data:`SHRINK_SECONDS`), ``Row.problems`` shows the shrunk example, and a new search with the next seed
goes on with the remaining examples.

*Atheris scenarios* (coverage-guided, when atheris is installed) run ``benchmarks/fuzz_atheris.py`` in a
subprocess on the PubMed and JATS readers and on JSON parsing, for a bounded time. A try is one
execution; an input that fails a check, runs past the time limit or exceeds the memory limit is a failure,
saved under the report's work folder (``--keep DIR`` keeps it) and named in ``Row.problems``.

*Input-limit scenarios* (``node_bomb_pubmed``, ``node_bomb_jats``, ``huge_line_jsonl``, ``wrong_root_xml``) run a
lenient ``corpus build`` over good files and inputs made by ``tests/input_bombs.py``: PubMed and JATS files with
10⁸ empty elements (in one entry, and between good entries), a 2 GB line, an HTML page saved as a PubMed and as a
JATS file. A try is one build. It survived when its peak resident memory (its processes') stayed under
:data:`PEAK_MB`, each bad file is a skip in ``dropped.jsonl.gz`` and in the report, and every good document
(those of the bad files too) is in the corpus; the good documents missing are data lost.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import yaml

from reliability_frame import ENV, REPO, Context, Row, attempt, kill_group, medfoundry, run_scenarios, start

TESTS = REPO / "tests"
HARNESS = Path(__file__).resolve().parent / "fuzz_atheris.py"
EXAMPLE_SECONDS = 10  # one example (or one atheris input) running longer is a failure
SHRINK_SECONDS = 60  # a failure is shrunk for at most this long; the unshrunk example is reported then
MAX_FAILURES = 3  # per target: a search stops at its first failure, a new one goes on, up to this many
HYPOTHESIS_SECONDS = {True: 9, False: 40}  # per hypothesis scenario, with --quick / without
ATHERIS_SECONDS = {True: 10, False: 50}  # per atheris scenario


class _Hang(BaseException):
    """An example ran past :data:`EXAMPLE_SECONDS`. A BaseException: no reader's handler catches it, and
    hypothesis lets it through instead of shrinking it (each shrinking step would take that long)."""


class _OutOfTime(BaseException):
    """The scenario's time (or the time to shrink a failure) is up: hypothesis lets it through."""


@dataclass
class _Search:
    """What the hypothesis searches of one scenario have run."""

    stop: float  # no example starts after this moment
    tries: int = 0
    survived: int = 0
    slowest: float = 0.0
    example: dict | None = None  # the example running, or the first that failed (unshrunk)
    shrinking_until: float | None = None  # set once an example failed: the calls that follow are shrinking it
    problems: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # why searches ended before their number of examples


def _timed(check, example: dict) -> float:
    """``check(**example)``, interrupted by SIGALRM past :data:`EXAMPLE_SECONDS`; returns its duration. A call
    into C that does not return in time is caught when it does."""

    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    began = time.monotonic()
    try:
        check(**example)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - began
    if elapsed > EXAMPLE_SECONDS:
        raise _Hang
    return elapsed


def _runner(check, search: _Search):
    """The function hypothesis calls with each example: counts tries until one fails, then only reruns the
    candidates of the shrinking, within its time."""

    def run(example: dict) -> None:
        if search.shrinking_until is not None:
            if time.monotonic() > search.shrinking_until:
                raise _OutOfTime
            _timed(check, example)
            return
        if time.monotonic() > search.stop:
            raise _OutOfTime
        search.example = example
        search.tries += 1
        try:
            search.slowest = max(search.slowest, _timed(check, example))
        except Exception:
            search.shrinking_until = time.monotonic() + SHRINK_SECONDS
            raise
        search.survived += 1

    return run


def _saved(ctx: Context, scenario: str, text: str) -> Path:
    folder = ctx.work / "fuzz" / scenario
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"failure-{len(list(folder.glob('failure-*')))}.txt"
    path.write_text(text, encoding="utf-8", errors="backslashreplace")
    return path


def _short(text: str, size: int) -> str:
    """``text``, with its middle cut out when it is longer than ``size`` characters (examples can be 100 kB)."""
    return text if len(text) <= size else f"{text[: size - 150]} ...[{len(text)} characters]... {text[-100:]}"


def _shrunk(exc: BaseException) -> str:
    """The exception, where it was raised and the (shrunk) example hypothesis attached to it."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    notes = " ".join(" ".join(note.split()) for note in getattr(exc, "__notes__", []))
    return f"{type(exc).__name__}{where}: {str(exc)[:300]} {notes}"


def _search(ctx: Context, name: str, target, examples: int, search: _Search, first_seed: int) -> None:
    """Hypothesis searches of ``target`` (a ``fuzz_targets.Target`` whose check takes only the strategies'
    arguments) until ``examples`` more tries, the time, or :data:`MAX_FAILURES` failures are reached."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    wanted = search.tries + examples
    for round_ in range(MAX_FAILURES):
        search.shrinking_until = None
        test = settings(
            max_examples=wanted - search.tries,
            deadline=None,
            derandomize=False,
            database=None,
            report_multiple_bugs=False,
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )(seed(first_seed + round_)(given(st.fixed_dictionaries(target.strategies))(_runner(target.check, search))))
        try:
            with contextlib.redirect_stdout(sys.stderr):  # hypothesis's notes: the report's stdout is its table
                test()
            if search.tries < wanted:
                search.stopped.append("hypothesis ran out of new examples")
            return
        except _Hang:
            problem = f"hang: an example ran more than {EXAMPLE_SECONDS}s: {search.example!r}"
        except _OutOfTime:
            if search.shrinking_until is None:
                search.stopped.append("time limit reached")
                return
            problem = f"shrinking stopped after {SHRINK_SECONDS}s; unshrunk example: {search.example!r}"
        except Exception as exc:  # a failed check, or what the reader raised: hypothesis has shrunk it
            problem = _shrunk(exc)
        path = _saved(ctx, name, problem)
        search.problems.append(f"{_short(problem, 700)} (saved to {path})")
        ctx.log(f"  {name}: FAILED: {_short(problem, 300)}")
        if search.tries >= wanted:
            return
    search.stopped.append(f"stopped after {MAX_FAILURES} failures")


def _run_targets(ctx: Context, name: str, description: str, targets: list, tries: int) -> Row:
    """One row for hypothesis searches of ``targets``, sharing the scenario's examples and time."""
    began = time.monotonic()
    search = _Search(stop=began)
    for k, target in enumerate(targets, 1):  # each target gets its share of the examples and of the time
        search.stop = min(began + HYPOTHESIS_SECONDS[ctx.quick] * k / len(targets), ctx.deadline)
        _search(ctx, name, target, tries // len(targets), search, ctx.seed * 1000 + 100 * k)
    row = Row(
        "fuzz",
        description,
        tries=search.tries,
        survived=search.survived,
        problems=search.problems,
        seconds=round(time.monotonic() - began, 1),
    )
    row.detail = f"hypothesis, seed {ctx.seed}; slowest example {search.slowest:.2f}s"
    if search.stopped:
        row.detail += f"; {', '.join(dict.fromkeys(search.stopped))} ({search.tries} of {tries} examples)"
    return row


def _hypothesis_scenario(name: str, description: str, *targets: str):
    """A scenario searching ``fuzz_targets.TARGETS[t]`` for each of ``targets``."""

    def scenario(ctx: Context, tries: int) -> Row:
        fuzz_targets = importlib.import_module("fuzz_targets")
        bound = [_bound(ctx, fuzz_targets.TARGETS[t]) for t in targets]
        return _run_targets(ctx, name, description, bound, tries)

    return scenario


def _bound(ctx: Context, target):
    """``target`` with the renderers it needs (built once per report) given."""
    if not target.renderers:
        return target
    if "renderers" not in ctx.cache:
        root = ctx.work / "fuzz" / "tokenizers"
        root.mkdir(parents=True, exist_ok=True)
        ctx.cache["renderers"] = importlib.import_module("fuzz_targets").build_renderers(root)
    return replace(target, check=partial(target.check, ctx.cache["renderers"]), renderers=False)


def hostile_xml(ctx: Context, tries: int) -> Row:
    """Hostile XML aimed at a secret file and at a local server that records every connection."""
    fuzz_targets = importlib.import_module("fuzz_targets")
    secret = ctx.work / "fuzz" / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(fuzz_targets.SECRET)
    with fuzz_targets.recording_server() as (url, requests):
        target = fuzz_targets.Target(
            partial(fuzz_targets.check_hostile, requests=requests),
            {"document": fuzz_targets.hostile_documents(secret, url), "gz": fuzz_targets.GZ},
        )
        row = _run_targets(ctx, "fuzz_hostile_xml", "hypothesis: hostile XML", [target], tries)
    row.detail += f"; the local server saw {len(requests)} connections or requests"
    return row


# -- atheris ---------------------------------------------------------------------------------------

ATHERIS_TARGETS = {"pubmed_xml": "PubMed XML", "jats": "JATS", "jsonl": "JSON lines and arrays"}


def _atheris_failures(folder: Path, text: str) -> list[str]:
    """The inputs libFuzzer saved (crash-, timeout-, oom-...), each with what happened."""
    exception = re.search(r"=== Uncaught Python exception: ===\s*\n(.*?)\n\s*\n", text, re.S)
    error = re.search(r"ERROR: (libFuzzer: .*)", text)  # a timeout or out of memory: libFuzzer's own words
    if exception:  # the exception, and the innermost frame of its traceback
        lines = exception.group(1).splitlines()
        reason = " ".join([lines[0], *[line.strip() for line in lines if line.strip().startswith("File ")][-1:]])
    else:
        reason = error.group(1) if error else " ".join(text[-300:].split())
    return [
        f"{path.name.split('-')[0]}: {reason}; input ({path.stat().st_size} bytes) saved to {path}"
        for path in sorted((folder / "crashes").glob("*"))
        if path.is_file()
    ]


def _run_atheris(ctx: Context, target: str, runs: int, seconds: int, folder: Path) -> int | None:
    """``fuzz_atheris.py`` on ``target`` in its own process group, its log in ``folder``: its exit status, or None
    when it did not stop in time and was killed."""
    argv = [
        sys.executable,
        str(HARNESS),
        target,
        str(folder),
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        f"-seed={ctx.seed + 1}",
        f"-timeout={EXAMPLE_SECONDS}",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    proc = start(argv, folder / "libfuzzer.log")
    try:
        return proc.wait(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None


def _atheris_scenario(target: str):
    def scenario(ctx: Context, runs: int) -> Row:
        row = Row("fuzz", f"atheris: {ATHERIS_TARGETS[target]}")
        seconds = int(min(ATHERIS_SECONDS[ctx.quick], ctx.time_left()))
        if importlib.util.find_spec("atheris") is None:
            row.detail = "skipped: atheris not installed (pip install atheris)"
            return row
        if seconds < 2:
            row.detail = "skipped: time budget reached"
            return row
        folder = ctx.work / "fuzz" / f"atheris_{target}"
        folder.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        code = _run_atheris(ctx, target, runs, seconds, folder)
        row.seconds = round(time.monotonic() - began, 1)
        text = (folder / "libfuzzer.log").read_text(errors="replace")
        row.problems = _atheris_failures(folder, text)
        if code != 0 and not row.problems:
            row.problems = [f"{'did not stop' if code is None else f'exit {code}'}: {' '.join(text[-600:].split())}"]
        executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text) or re.findall(r"^#(\d+)", text, re.M)
        row.tries = max(int(executed[-1]) if executed else 0, len(row.problems))
        row.survived = row.tries - len(row.problems)
        coverage = re.findall(r"cov: (\d+) ft: \d+ corp: (\d+)", text)
        row.detail = f"atheris, seed {ctx.seed + 1}, {seconds}s" + (
            f"; coverage {coverage[-1][0]} edges, corpus {coverage[-1][1]} inputs" if coverage else ""
        )
        return row

    return scenario


# -- input limits (issue 18): node bombs, a 2 GB line, files that are not what their source says ---------------

BOMB_ELEMENTS = 10**8  # ~400 MB of XML in a ~400 KB .gz: 17 GB of parsed tree for a reader that keeps it all
HUGE_LINE = 2 << 30
PEAK_MB = 1024
# runs argv and prints [exit status, peak resident MB of it and its descendants]
_PEAK = (
    "import json, resource, subprocess, sys; code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(json.dumps([code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))"
)


def _bomb_inputs(kind: str):
    """A good file, a bomb of one entry holding 10⁸ elements and a bomb of 10⁸ siblings between good entries."""

    def write(root: Path, bombs) -> tuple[dict[str, str], int]:
        folder, suffix = ("pubmed", "xml") if kind == "pubmed" else ("pmc", "nxml")
        prefix = "PMC" if kind == "jats" else ""
        ids = {name: tuple(f"{prefix}{n}{k}" for k in range(3)) for n, name in enumerate(("good", "entry", "siblings"))}
        bombs.node_bomb(root / folder / f"good.{suffix}.gz", kind, "siblings", 0, ids["good"])
        for shape in ("entry", "siblings"):
            bombs.node_bomb(root / folder / f"{shape}.{suffix}.gz", kind, shape, BOMB_ELEMENTS, ids[shape])
        reason = {"entry": "MAX_ENTRY_MARKUP", "siblings": "unexpected <a>"}
        return {f"{shape}.{suffix}.gz": reason[shape] for shape in ("entry", "siblings")}, 6

    return write


def _huge_line_inputs(root: Path, bombs) -> tuple[dict[str, str], int]:
    """A 2 GB line between two good lines."""
    bombs.huge_jsonl(root / "jsonl" / "huge.jsonl", HUGE_LINE)
    return {"huge.jsonl": "MAX_LINE_BYTES"}, 2


def _wrong_root_inputs(root: Path, bombs) -> tuple[dict[str, str], int]:
    """An HTML page saved as a PubMed file and as a JATS file, beside good ones."""
    bombs.html_page(root / "pubmed" / "page.xml")
    bombs.html_page(root / "pmc" / "page.nxml")
    bombs.node_bomb(root / "pubmed" / "good.xml", "pubmed", "siblings", 0)
    bombs.node_bomb(root / "pmc" / "good.nxml", "jats", "siblings", 0)
    return {"page.xml": "not a PubMed file", "page.nxml": "not a JATS file"}, 4


def _limits_config(root: Path, out: Path) -> Path:
    """A lenient build of whatever is under ``root``: pubmed/, pmc/, jsonl/, two files at a time. Near-duplicate
    detection and the language filter are off (the good documents are short and alike: all must come out);
    ``split_mb`` is raised, as every task of a split file reads all of it, and a 2 GB file would be 128 tasks."""
    sources = [
        {"name": name, "kind": kind, "paths": [str(root / name / "*")]}
        for name, kind in (("pubmed", "pubmed_xml"), ("pmc", "jats"), ("jsonl", "jsonl"))
        if any((root / name).glob("*"))
    ]
    config = {
        "output_dir": str(out),
        "workers": 2,
        "strict": False,
        "split_mb": 1e6,
        "sources": sources,
        "clean": {"min_chars": 5, "min_words": 2, "language": None},
        "dedup": {"near": {"enabled": False}},
        "decontam": {"enabled": False},
        "split": {"val_fraction": 0.0},
    }
    path = out.parent / "corpus.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _skipped_in_report(out: Path) -> dict[str, str]:
    """File name -> reason of each skipped file that both ``dropped.jsonl.gz`` and the report's "Skipped input"
    name."""
    with gzip.open(out / "dropped.jsonl.gz", "rt", encoding="utf-8") as fh:
        details = [d["detail"] for d in map(json.loads, fh) if d["stage"] == "read"]
    section = (out / "report.md").read_text().split("## Skipped input (lenient mode)")[1].split("\n## ")[0]
    named = {Path(detail.split(":")[0]).name: detail for detail in details}
    return {name: detail for name, detail in named.items() if name in section}


def _limits_scenario(name: str, description: str, write):
    """A lenient ``corpus build`` over the inputs ``write(root, input_bombs)`` makes, which returns the files to be
    skipped (name -> a word of the reason) and how many good documents they and the others hold. Survived: the
    build ran with a peak resident memory under :data:`PEAK_MB`, each of those files is a skip in
    ``dropped.jsonl.gz`` and in the report, and every good document is in the corpus (those missing are data lost)."""

    def scenario(ctx: Context, tries: int) -> Row:
        bombs = importlib.import_module("input_bombs")
        folder = ctx.work / "limits" / name
        root = folder / "in"
        for sub in ("pubmed", "pmc", "jsonl"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        expected, good = write(root, bombs)
        peaks: list[float] = []

        def one(i: int) -> tuple[bool, int, str]:
            out = folder / f"try{i}" / "corpus"
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-c", _PEAK, *medfoundry("corpus", "build", str(_limits_config(root, out)))]
            run = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
            code, peak = json.loads(run.stdout.splitlines()[-1])
            peaks.append(peak)
            if code != 0:
                return False, good, f"corpus build exited with {code}: {' '.join(run.stderr[-600:].split())}"
            kept = json.loads((out / "manifest.json").read_text())["counts"]["documents_train"]
            skipped = _skipped_in_report(out)
            unreported = [f for f, word in expected.items() if word not in skipped.get(f, "")]
            note = f"peak {peak:.0f} MB, {kept} of {good} good documents, skipped: {sorted(skipped)}"
            if unreported:
                note += f"; not reported as skipped: {unreported}"
            return peak < PEAK_MB and not unreported and kept == good, max(0, good - kept), note

        row = attempt(ctx, Row("fuzz", description), tries, one)
        if peaks:
            row.detail = (row.detail + "; " if row.detail else "") + f"peak RSS {max(peaks):.0f} MB (limit {PEAK_MB})"
        return row

    return scenario


FUZZ_SCENARIOS = {  # name: (function, tries with --quick, tries without): examples, or atheris executions
    "fuzz_pubmed_xml": (_hypothesis_scenario("fuzz_pubmed_xml", "hypothesis: PubMed XML", "pubmed_xml"), 500, 4000),
    "fuzz_jats": (_hypothesis_scenario("fuzz_jats", "hypothesis: JATS", "jats"), 600, 5000),
    "fuzz_corpus_jsonl": (
        _hypothesis_scenario("fuzz_corpus_jsonl", "hypothesis: corpus JSONL", "corpus_jsonl"),
        600,
        6000,
    ),
    "fuzz_strict_jsonl": (
        _hypothesis_scenario("fuzz_strict_jsonl", "hypothesis: strict JSONL", "strict_jsonl"),
        800,
        8000,
    ),
    "fuzz_instruction_data": (
        _hypothesis_scenario("fuzz_instruction_data", "hypothesis: instruction data", "instruction_data"),
        600,
        6000,
    ),
    "fuzz_chat_template": (
        _hypothesis_scenario(
            "fuzz_chat_template", "hypothesis: chat-template renderer", "renderer", "renderer_any_roles"
        ),
        600,
        5000,
    ),
    "fuzz_hostile_xml": (hostile_xml, 400, 3000),
    "atheris_pubmed_xml": (_atheris_scenario("pubmed_xml"), 1_000_000, 100_000_000),
    "atheris_jats": (_atheris_scenario("jats"), 1_000_000, 100_000_000),
    "atheris_jsonl": (_atheris_scenario("jsonl"), 1_000_000, 100_000_000),
    "node_bomb_pubmed": (
        _limits_scenario("node_bomb_pubmed", "PubMed: 10^8-element node bombs", _bomb_inputs("pubmed")),
        1,
        2,
    ),
    "node_bomb_jats": (_limits_scenario("node_bomb_jats", "JATS: 10^8-element node bombs", _bomb_inputs("jats")), 1, 2),
    "huge_line_jsonl": (_limits_scenario("huge_line_jsonl", "JSONL: a 2 GB line", _huge_line_inputs), 1, 2),
    "wrong_root_xml": (
        _limits_scenario("wrong_root_xml", "PubMed/JATS: an HTML page as the file", _wrong_root_inputs),
        1,
        3,
    ),
}


def fuzz_scenarios(ctx: Context) -> list[Row]:
    if not any(ctx.wants(name) for name in FUZZ_SCENARIOS):
        return []
    if importlib.util.find_spec("hypothesis") is None:
        return [Row("fuzz", "all fuzz scenarios", detail="skipped: needs hypothesis (the dev extras)")]
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))  # fuzz_targets: the strategies and checks the tests use
    return run_scenarios(ctx, "fuzz", FUZZ_SCENARIOS)
