"""Accuracy metrics, their standard errors and group averages, computed as lm-eval computes them.

* ``acc``: the choice with the highest log-likelihood.
* ``acc_norm``: log-likelihood divided by the choice's length in characters. lm-eval measures the
  choice string itself (``doc_to_choice``), not the continuation with its leading space, so for
  letter choices (``A``/``B``/``C``/``D``: MedQA, MedMCQA, MMLU) every length is 1 and acc_norm equals
  acc; it only differs where the choices are words or option texts (PubMedQA's yes/no/maybe).
* ``acc_bytes``: the same with the UTF-8 byte length.

Ties go to the first choice (``numpy.argmax``). Standard errors: ``{metric}_stderr`` is lm-eval's
``mean_stderr`` (sample standard deviation over sqrt(n)), kept for comparability;
``{metric}_bootstrap_stderr`` resamples the questions (seeded, ``bootstrap_iters`` times). A group
(MMLU-medical) averages its tasks weighted by their sizes, with lm-eval's pooled standard error;
its bootstrap resamples within each task.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

NA = "N/A"
BOOTSTRAP_CHUNK = 100  # resamples drawn at once: bounds memory at CHUNK x questions


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties, as ``numpy.argmax``."""
    return max(range(len(values)), key=values.__getitem__)


def choice_predictions(logliks: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """The predicted choice index under each accuracy metric."""
    return {
        "acc": argmax(logliks),
        "acc_norm": argmax([ll / len(c) for ll, c in zip(logliks, choices)]),
        "acc_bytes": argmax([ll / len(c.encode("utf-8")) for ll, c in zip(logliks, choices)]),
    }


def mean_stderr(values: Sequence[float]) -> float | str:
    """lm-eval's ``mean_stderr``; "N/A" below two values, as lm-eval reports it."""
    if len(values) < 2:
        return NA
    return statistics.stdev(values) / math.sqrt(len(values))


def bootstrap_stderr(
    strata: Sequence[Sequence[float]], weights: Sequence[float], *, iters: int, seed: int
) -> float | str:
    """Bootstrap standard error of ``sum(w_i * mean_i) / sum(w_i)``, resampling within each stratum."""
    if iters < 2 or sum(len(s) for s in strata) < 2:
        return NA
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(s, dtype=np.float64) for s in strata]
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    estimates = np.empty(iters)
    for start in range(0, iters, BOOTSTRAP_CHUNK):
        m = min(BOOTSTRAP_CHUNK, iters - start)
        means = np.stack([a[rng.integers(0, len(a), (m, len(a)))].mean(axis=1) for a in arrays], axis=1)
        estimates[start : start + m] = means @ w
    return float(np.std(estimates, ddof=1))


def summarize(per_doc: dict[str, Sequence[float]], *, iters: int, seed: int) -> dict:
    """lm-eval-style ``metric,none`` keys with their standard errors, from per-question values."""
    out: dict = {}
    for metric, values in per_doc.items():
        out[f"{metric},none"] = statistics.fmean(values)
        out[f"{metric}_stderr,none"] = mean_stderr(values)
        if iters:
            out[f"{metric}_bootstrap_stderr,none"] = bootstrap_stderr([values], [1.0], iters=iters, seed=seed)
    return out


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's ``pooled_sample_stderr``: the stderr of a size-weighted mean of subtask means."""
    pooled_var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(pooled_var / sum(sizes))


def summarize_group(
    members: Sequence[dict[str, Sequence[float]]], *, weight_by_size: bool, iters: int, seed: int
) -> dict:
    """A group's metrics from its members' per-question values (each member a metric -> values mapping)."""
    out: dict = {}
    shared = [m for m in members[0] if all(m in member and member[m] for member in members)]
    for metric in shared:
        strata = [member[metric] for member in members]
        sizes = [len(s) for s in strata]
        weights = sizes if weight_by_size else [1] * len(strata)
        means = [statistics.fmean(s) for s in strata]
        out[f"{metric},none"] = sum(w * m for w, m in zip(weights, means)) / sum(weights)
        stderrs = [mean_stderr(s) for s in strata]
        if NA in stderrs:
            out[f"{metric}_stderr,none"] = NA
        elif weight_by_size:
            out[f"{metric}_stderr,none"] = pooled_stderr(stderrs, sizes)
        else:  # lm-eval's unweighted_mean_stderr
            out[f"{metric}_stderr,none"] = math.sqrt(sum(se**2 for se in stderrs)) / len(stderrs)
        if iters:
            out[f"{metric}_bootstrap_stderr,none"] = bootstrap_stderr(strata, weights, iters=iters, seed=seed)
    return out
