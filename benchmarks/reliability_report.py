"""Reliability report: fault, fuzz and load scenarios, each tried several times within a time budget.

Prints progress on stderr, then a table (scenario, tries, survived, faults injected, data lost, server
errors, seconds) and, as the last line of stdout, one JSON object: ``scenarios``, ``tries``, ``failures``,
``docs_lost``, ``server_errors``, ``seconds`` and every row. Target: zero failures, zero documents lost,
zero server errors; the exit status is 1 otherwise.

    python benchmarks/reliability_report.py --quick          # 1-2 tries per scenario: ~2.5 minutes on 2 cores
    python benchmarks/reliability_report.py                  # 4-12 tries per scenario: ~20 minutes
    python benchmarks/reliability_report.py --only pretrain_sigkill --seed 3 --keep /tmp/rr

``tests/test_faults_long.py`` (``make test-long``) runs the fault scenarios below with their full number
of tries and asserts that every try survived.

Scenario groups. A group is a function ``(ctx: Context) -> list[Row]`` listed in :data:`GROUPS`; each
:class:`Row` is one scenario: how many tries, how many survived (ended as the scenario requires), the
documents lost or duplicated, server errors. A new group (fuzzing, server load...) is a function of that
shape, here or imported here, added to :data:`GROUPS`; it should use ``ctx.tries(quick, full)`` and stop
starting tries once ``ctx.time_left()`` is gone, so the whole report stays within ``--budget``.

Groups: ``faults`` (:mod:`reliability_faults`), ``fuzz`` (:mod:`reliability_fuzz`), ``server``
(:mod:`reliability_server`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from reliability_faults import FAULT_SCENARIOS, fault_scenarios
from reliability_frame import Context, Row
from reliability_fuzz import FUZZ_SCENARIOS, fuzz_scenarios
from reliability_server import SERVER_SCENARIOS, server_scenarios

# Groups: name -> function (ctx) -> rows. Fuzz and server-load groups are added here the same way, and
# their scenario names to SCENARIOS (for --only), each group running those for which ctx.wants(name).
GROUPS: dict[str, Callable[[Context], list[Row]]] = {
    "faults": fault_scenarios,
    "fuzz": fuzz_scenarios,
    "server": server_scenarios,
}
SCENARIOS: dict[str, str] = {name: "faults" for name in FAULT_SCENARIOS}  # scenario -> its group
SCENARIOS.update({name: "fuzz" for name in FUZZ_SCENARIOS})
SCENARIOS.update({name: "server" for name in SERVER_SCENARIOS})


# -- output ------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    header = ("group", "scenario", "tries", "survived", "faults injected", "data lost", "server errors", "seconds")
    lines = [
        (
            r.group,
            r.scenario,
            str(r.tries),
            str(r.survived),
            str(r.injected),
            str(r.data_lost),
            str(r.server_errors),
            f"{r.seconds:.0f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[k]) for line in lines)) if lines else len(h) for k, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    for r in rows:
        out += [f"  {r.scenario}: {r.detail}"] if r.detail else []
        out += [f"  {r.scenario}: {p}" for p in r.problems]
    return "\n".join(out)


def summary(rows: list[Row], seconds: float, args) -> dict:
    return {
        "scenarios": sum(r.tries > 0 for r in rows),
        "tries": sum(r.tries for r in rows),
        "failures": sum(r.failures for r in rows),
        "docs_lost": sum(r.data_lost for r in rows),
        "server_errors": sum(r.server_errors for r in rows),
        "seconds": round(seconds, 1),
        "quick": args.quick,
        "seed": args.seed,
        "rows": [{**asdict(r), "failures": r.failures} for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one or two tries per scenario (a few minutes)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"groups ({', '.join(GROUPS)}) or scenarios (faults: {', '.join(FAULT_SCENARIOS)}) to run",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill points and damage")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which no new try starts (default 900 with --quick, 3600 without)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary folder, removed)"
    )
    args = parser.parse_args()
    unknown = [n for n in args.only or [] if n not in GROUPS and n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown group or scenario: {', '.join(unknown)}")
    groups = {
        name: group
        for name, group in GROUPS.items()
        if args.only is None or name in args.only or any(SCENARIOS[n] == name for n in args.only if n in SCENARIOS)
    }
    scenarios = [n for n in args.only or [] if n in SCENARIOS]
    budget = args.budget if args.budget is not None else (900 if args.quick else 3600)
    work = args.keep or Path(tempfile.mkdtemp(prefix="medfoundry_reliability_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ctx = Context(
        quick=args.quick,
        work=work,
        seed=args.seed,
        deadline=started + budget,
        only=set(scenarios) if scenarios and not any(n in GROUPS for n in args.only) else None,
    )
    rows: list[Row] = []
    try:
        for name, group in groups.items():
            ctx.log(f"group {name}")
            rows += group(ctx)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result = summary(rows, time.monotonic() - started, args)
    print(table(rows))
    print(json.dumps(result))
    return 0 if result["failures"] == 0 and result["docs_lost"] == 0 and result["server_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
