"""Accuracy metrics, standard errors and group averages, checked against lm-eval's own functions."""

from __future__ import annotations

import math
import random

import pytest

from medfoundry.eval.metrics import (
    argmax,
    bootstrap_stderr,
    choice_predictions,
    mean_stderr,
    pooled_stderr,
    summarize,
    summarize_group,
)


def test_acc_norm_divides_by_the_choice_length_in_characters():
    # PubMedQA-like: "maybe" is long, so its total log-likelihood is low but per character it wins
    assert choice_predictions([-2.4, -2.5, -3.5], ["yes", "no", "maybe"]) == {"acc": 0, "acc_norm": 2, "acc_bytes": 2}
    # letters: every length is 1, acc_norm == acc (lm-eval measures "A", not " A")
    assert choice_predictions([-3.0, -1.0, -2.0, -5.0], list("ABCD")) == {"acc": 1, "acc_norm": 1, "acc_bytes": 1}
    # bytes differ from characters for non-ASCII choices
    assert choice_predictions([-6.0, -5.0], ["ééé", "aaaa"]) == {"acc": 1, "acc_norm": 1, "acc_bytes": 0}


def test_ties_go_to_the_first_choice_like_numpy():
    import numpy as np

    for values in ([-1.0, -1.0, -2.0], [-3.0, -2.0, -2.0], [0.0]):
        assert argmax(values) == int(np.argmax(values))


def test_stderrs_match_lm_eval():
    from lm_eval.api.metrics import mean_stderr as lm_mean_stderr
    from lm_eval.api.metrics import pooled_sample_stderr

    rng = random.Random(0)
    groups = [[float(rng.random() < p) for _ in range(n)] for p, n in ((0.3, 135), (0.6, 265), (0.5, 100))]
    for values in groups:
        assert mean_stderr(values) == pytest.approx(lm_mean_stderr(values), rel=1e-12)
    sizes, stderrs = [len(g) for g in groups], [mean_stderr(g) for g in groups]
    assert pooled_stderr(stderrs, sizes) == pytest.approx(float(pooled_sample_stderr(stderrs, sizes)), rel=1e-12)
    assert mean_stderr([1.0]) == "N/A"


def test_group_is_the_size_weighted_mean_as_lm_eval():
    from lm_eval.api.metrics import aggregate_subtask_metrics

    members = [{"acc": [1.0] * 30 + [0.0] * 70}, {"acc": [1.0] * 9 + [0.0] * 1}]
    group = summarize_group(members, weight_by_size=True, iters=200, seed=0)
    assert (
        group["acc,none"]
        == pytest.approx(aggregate_subtask_metrics([0.3, 0.9], [100, 10], True))
        == pytest.approx(39 / 110)
    )
    assert group["acc_stderr,none"] == pytest.approx(pooled_stderr([mean_stderr(m["acc"]) for m in members], [100, 10]))
    unweighted = summarize_group(members, weight_by_size=False, iters=0, seed=0)
    assert unweighted["acc,none"] == pytest.approx(0.6) and "acc_bootstrap_stderr,none" not in unweighted


def test_bootstrap_is_seeded_and_agrees_with_the_analytic_stderr():
    values = [float(i % 3 == 0) for i in range(600)]
    a = bootstrap_stderr([values], [1.0], iters=2000, seed=1)
    assert (
        a
        == bootstrap_stderr([values], [1.0], iters=2000, seed=1)
        != bootstrap_stderr([values], [1.0], iters=2000, seed=2)
    )
    assert a == pytest.approx(mean_stderr(values), rel=0.08)
    assert bootstrap_stderr([[1.0]], [1.0], iters=100, seed=0) == "N/A"


def test_summarize_keys_follow_lm_eval():
    out = summarize({"acc": [1.0, 0.0, 1.0, 1.0]}, iters=100, seed=0)
    assert set(out) == {"acc,none", "acc_stderr,none", "acc_bootstrap_stderr,none"}
    assert out["acc,none"] == 0.75 and out["acc_stderr,none"] == pytest.approx(0.5 / math.sqrt(4))
