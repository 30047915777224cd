"""Mixing instruction sources to requested shares, and reporting requested against achieved.

Shares are of examples or of response tokens (``mixture.by``). A source without a weight is taken
whole, once; weighted sources then fill the rest (their weights are shares of the whole mixture). When
every source is weighted, the mixture is ``mixture.total`` units, or by default the largest size
that repeats no source. A source needing more than ``max_repeat`` passes is an error rather than a
silently over-fitted source. Sampling is whole passes over a source plus a seeded subset for the
fraction, so each example appears a number of times differing by at most one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfoundry.errors import ConfigError
from medfoundry.sft.config import MixtureConfig


@dataclass(frozen=True)
class Pool:
    """The train examples of one source: their count and response (loss-carrying) tokens."""

    name: str
    weight: float | None
    response_tokens: np.ndarray  # per example
    tokens: np.ndarray  # per example, all tokens

    def units(self, by: str) -> np.ndarray:
        return self.response_tokens if by == "response_tokens" else np.ones(len(self.tokens), dtype=np.int64)


def _targets(pools: list[Pool], cfg: MixtureConfig) -> dict[str, float]:
    sizes = {p.name: float(p.units(cfg.by).sum()) for p in pools}
    empty = [p.name for p in pools if sizes[p.name] == 0]
    if empty:
        raise ConfigError(
            f"source {empty[0]!r} has no training examples left (after the validation split, overlap "
            "and length filters): remove it or give it data"
        )
    weighted = [p for p in pools if p.weight is not None]
    whole = {p.name: sizes[p.name] for p in pools if p.weight is None}
    if whole:
        total = sum(whole.values()) / (1 - sum(p.weight for p in weighted))
    else:
        total = cfg.total or min(sizes[p.name] / p.weight for p in weighted)
    return {**whole, **{p.name: p.weight * total for p in weighted}}


def _sample(units: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Example indices (with repeats) whose units sum as close to ``target`` as whole examples allow."""
    total = units.sum()
    passes = int(target // total)
    remainder = target - passes * total
    order = rng.permutation(len(units))
    cumulative = np.concatenate([[0], np.cumsum(units[order])])
    take = int(np.searchsorted(cumulative, remainder))
    if take > 0 and (take >= len(cumulative) or remainder - cumulative[take - 1] <= cumulative[take] - remainder):
        take -= 1
    return np.concatenate([np.tile(np.arange(len(units)), passes), np.sort(order[:take])])


def plan_mixture(pools: list[Pool], cfg: MixtureConfig, seed: int) -> dict[str, np.ndarray]:
    """For each source, the indices of its examples in one mixture epoch (repeats for up-sampled sources)."""
    targets = _targets(pools, cfg)
    plan = {}
    for i, pool in enumerate(pools):
        units = pool.units(cfg.by)
        repeat = targets[pool.name] / units.sum()
        if repeat > cfg.max_repeat:
            raise ConfigError(
                f"source {pool.name!r} would be repeated {repeat:.1f} times to reach its weight {pool.weight} "
                f"({len(units):,} examples, {int(pool.response_tokens.sum()):,} response tokens), more than "
                f"mixture.max_repeat {cfg.max_repeat}: lower its weight or mixture.total, add data, or raise max_repeat"
            )
        plan[pool.name] = _sample(units, targets[pool.name], np.random.default_rng([seed, i]))
    return plan


def mixture_report(pools: list[Pool], plan: dict[str, np.ndarray], cfg: MixtureConfig) -> dict:
    """Requested vs achieved shares, in examples and in response tokens, with each source's passes."""
    examples = {p.name: len(plan[p.name]) for p in pools}
    response = {p.name: int(p.response_tokens[plan[p.name]].sum()) for p in pools}
    tokens = {p.name: int(p.tokens[plan[p.name]].sum()) for p in pools}
    all_examples, all_response = max(sum(examples.values()), 1), max(sum(response.values()), 1)
    sources = {}
    for p in pools:
        available = p.units(cfg.by).sum()
        sources[p.name] = {
            "requested_share": p.weight,
            "available_examples": len(p.tokens),
            "available_response_tokens": int(p.response_tokens.sum()),
            "examples": examples[p.name],
            "response_tokens": response[p.name],
            "tokens": tokens[p.name],
            "epochs": float(p.units(cfg.by)[plan[p.name]].sum() / available),
            "share_examples": examples[p.name] / all_examples,
            "share_response_tokens": response[p.name] / all_response,
        }
    return {
        "by": cfg.by,
        "examples": sum(examples.values()),
        "response_tokens": sum(response.values()),
        "tokens": sum(tokens.values()),
        "sources": sources,
    }


def mixture_markdown(report: dict) -> str:
    """The mixture report as a Markdown table."""
    achieved = "share_examples" if report["by"] == "examples" else "share_response_tokens"
    lines = [
        f"Shares are of {report['by'].replace('_', ' ')}; sources without a weight are taken whole.",
        "",
        "| source | requested | achieved | examples | response tokens | share of examples | "
        "share of response tokens | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["sources"].items():
        requested = "whole" if s["requested_share"] is None else f"{s['requested_share']:.1%}"
        lines.append(
            f"| {name} | {requested} | {s[achieved]:.1%} | {s['examples']:,} | {s['response_tokens']:,} | "
            f"{s['share_examples']:.1%} | {s['share_response_tokens']:.1%} | {s['epochs']:.2f} |"
        )
    lines.append(f"| **total** | | | {report['examples']:,} | {report['response_tokens']:,} | | | |")
    return "\n".join(lines) + "\n"
