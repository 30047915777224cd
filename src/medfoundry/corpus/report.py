"""``report.md`` and ``composition.png`` for a built corpus."""

from __future__ import annotations

from pathlib import Path

from medfoundry.extras import pyplot
from medfoundry.io import atomic_path, write_text
from medfoundry.manifest import Manifest


def composition_chart(path: Path, mixture: dict) -> bool:
    """Draw the chart; False when matplotlib is absent (the report then goes without it)."""
    plt = pyplot("the corpus composition chart")
    if plt is None:
        return False
    names = list(mixture)
    available = [mixture[n]["available_chars"] / 1e6 for n in names]
    achieved = [mixture[n]["achieved_chars"] / 1e6 for n in names]
    shares = [100 * mixture[n]["achieved_share"] for n in names]
    requested = [None if mixture[n]["requested_share"] is None else 100 * mixture[n]["requested_share"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], available, width=0.4, label="available (after dedup)")
    left.bar([i + 0.2 for i in x], achieved, width=0.4, label="in train split")
    left.set_xticks(list(x), names, rotation=20)
    left.set_yscale("log")
    left.set_ylabel("million characters (log scale)")
    left.legend()
    left.set_title("Characters per source")
    bars = right.bar(x, shares, color="tab:green", label="achieved")
    right.bar_label(bars, labels=[f"{v:.2f}%" for v in shares], fontsize=8)
    for i, req in enumerate(requested):
        if req is not None:
            right.hlines(
                req,
                i - 0.4,
                i + 0.4,
                colors="black",
                linestyles="dashed",
                label="requested" if i == 0 or all(r is None for r in requested[:i]) else None,
            )
    right.set_xticks(list(x), names, rotation=20)
    right.set_ylabel("% of train characters")
    right.set_title("Train mixture")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_share(value) -> str:
    return "whole" if value is None else f"{100 * value:.2f}%"


def _mixture_table(mixture: dict) -> str:
    tokens = all("achieved_tokens" in m for m in mixture.values())
    header = [
        "source",
        "requested",
        "achieved (chars)",
        *(["achieved (tokens)"] if tokens else []),
        "factor",
        "available chars",
        "train chars",
        *(["train tokens"] if tokens else []),
    ]
    rows = []
    for name, m in mixture.items():
        row = [name, _fmt_share(m["requested_share"]), f"{100 * m['achieved_share']:.2f}%"]
        row += [f"{100 * m['achieved_token_share']:.2f}%"] if tokens else []
        row += [m["factor"], f"{m['available_chars']:,}", f"{m['achieved_chars']:,}"]
        row += [f"{m['achieved_tokens']:,}"] if tokens else []
        rows.append(row)
    return _table(header, rows)


def write_report(out_dir: Path, manifest: Manifest, drops: list[dict]) -> None:
    details, counts = manifest.details, manifest.counts
    charted = composition_chart(out_dir / "composition.png", details["mixture"])
    per = details["per_source"]
    sources = list(details["mixture"])
    parts = [
        "# Corpus report",
        f"medfoundry {manifest.medfoundry_version} · build `{manifest.key}` · {counts['extract_tasks']} extract "
        f"tasks · {manifest.timings['total_s']:.1f} s",
        f"Documents read: **{counts['documents_in']:,}** · train: **{counts['documents_train']:,}** · "
        f"val: **{counts['documents_val']:,}**",
        "## Sources",
        _table(
            ["source", "read", "train docs", "train chars", "val docs"],
            [
                [
                    s,
                    per["read"].get(s, 0),
                    per["train"].get(s, {}).get("docs", 0),
                    f"{per['train'].get(s, {}).get('chars', 0):,}",
                    per["val"].get(s, {}).get("docs", 0),
                ]
                for s in sources
            ],
        ),
        "## Mixture (train split)",
        *(["![composition](composition.png)"] if charted else []),
        _mixture_table(details["mixture"]),
        *[
            f"**Short of its weight:** `{name}` would need more than `mix.max_repeat` copies of its documents "
            f"to reach {100 * m['requested_share']:.2f}%; it got {100 * m['achieved_share']:.2f}%."
            for name, m in details["mixture"].items()
            if m["capped_by_max_repeat"]
        ],
        "## Dropped documents by reason",
        _table(
            ["stage/reason", *sources],
            [[k, *[v.get(s, 0) for s in sources]] for k, v in sorted(details["dropped"].items())],
        )
        if details["dropped"]
        else "Nothing was dropped.",
        "Every dropped document is listed with its reason in `dropped.jsonl.gz`.",
    ]
    decontam = details["decontamination"]
    if not decontam:
        parts.append("## Decontamination")
        parts.append(
            "**Disabled** (`decontam.enabled: false`): this corpus was not checked against any evaluation set."
        )
    else:
        parts.append("## Decontamination index")
        parts.append(
            f"{decontam['ngram']}-gram overlap; {decontam['pubmedqa_test_pmids']} PubMedQA test PMIDs matched by id."
        )
        parts.append(
            _table(
                ["benchmark", "test items", "n-grams", f"items shorter than {decontam['ngram']} words (not matchable)"],
                [[b, v["items"], v["ngrams"], v["short_items"]] for b, v in decontam["benchmarks"].items()],
            )
        )
    for stage, title in (
        ("decontaminate", "Decontamination: removed documents"),
        ("read", "Skipped input (lenient mode)"),
    ):
        listed = [d for d in drops if d["stage"] == stage and d["reason"] != "no_abstract"]
        parts.append(f"## {title}")
        parts.append(
            _table(
                ["id", "source", "reason", "detail"], [[d["id"], d["source"], d["reason"], d["detail"]] for d in listed]
            )
            if listed
            else "None."
        )
    parts.append("## Stages")
    parts.append(
        _table(
            ["stage", "seconds", "tasks", "peak memory of a process (MB)"],
            [[k, f"{v['seconds']:.2f}", v["tasks"], f"{v['peak_rss_mb']:,.0f}"] for k, v in details["stages"].items()],
        )
    )
    parts.append(f"Total: {manifest.timings['total_s']:.2f} s.")
    parts.append(
        _table(
            ["extract step", "CPU seconds (all tasks)"],
            [[s["name"], f"{s['time_s'] or 0:.2f}"] for s in details["extract_steps"]],
        )
    )
    write_text(out_dir / "report.md", "\n\n".join(parts) + "\n")
