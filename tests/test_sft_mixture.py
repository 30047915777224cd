"""Mixtures: requested shares achieved in examples or response tokens, whole sources, repeat limits, report."""

from __future__ import annotations

import numpy as np
import pytest

from medfoundry.errors import ConfigError
from medfoundry.sft.config import MixtureConfig
from medfoundry.sft.mixture import Pool, mixture_markdown, mixture_report, plan_mixture


def pool(name: str, n: int, weight: float | None, mean_response: int, seed: int = 0) -> Pool:
    response = np.random.default_rng(seed).integers(1, 2 * mean_response, size=n)
    return Pool(name, weight, response, response + 50)


def test_example_shares_are_met_with_up_and_down_sampling():
    pools = [pool("medqa", 1000, 0.5, 40), pool("alpaca", 5000, 0.3, 100, 1), pool("cot", 100, 0.2, 300, 2)]
    plan = plan_mixture(pools, MixtureConfig(total=4000), seed=0)
    report = mixture_report(pools, plan, MixtureConfig(total=4000))
    assert {n: len(p) for n, p in plan.items()} == {"medqa": 2000, "alpaca": 1200, "cot": 800}
    assert report["sources"]["cot"]["epochs"] == 8.0 and report["sources"]["alpaca"]["epochs"] == pytest.approx(0.24)
    assert np.bincount(plan["cot"]).min() == 8  # whole passes: every example equally often
    assert len(np.unique(plan["alpaca"])) == 1200  # a down-sampled source repeats nothing
    assert report["sources"]["medqa"]["share_examples"] == 0.5
    assert plan_mixture(pools, MixtureConfig(total=4000), seed=0)["alpaca"].tolist() == plan["alpaca"].tolist()


def test_response_token_shares_are_met_within_one_example():
    pools = [pool("short", 3000, 0.25, 10), pool("long", 800, 0.75, 400, 1)]
    cfg = MixtureConfig(by="response_tokens", total=600_000)
    report = mixture_report(pools, plan_mixture(pools, cfg, seed=5), cfg)
    for name, share in (("short", 0.25), ("long", 0.75)):
        assert report["sources"][name]["share_response_tokens"] == pytest.approx(share, abs=0.002)
    assert report["response_tokens"] == pytest.approx(600_000, abs=800)


def test_default_size_repeats_no_weighted_source_and_unweighted_sources_come_whole():
    pools = [pool("a", 1000, 0.5, 20), pool("b", 300, 0.5, 20)]
    plan = plan_mixture(pools, MixtureConfig(), seed=0)
    assert {n: len(p) for n, p in plan.items()} == {"a": 300, "b": 300}
    anchored = [pool("whole", 600, None, 20), pool("extra", 100, 0.25, 20)]
    plan = plan_mixture(anchored, MixtureConfig(), seed=0)
    assert (
        len(plan["whole"]) == 600 and sorted(plan["whole"].tolist()) == list(range(600)) and len(plan["extra"]) == 200
    )


def test_too_many_repeats_is_an_error_naming_the_source():
    pools = [pool("big", 10_000, 0.5, 20), pool("tiny", 10, 0.5, 20)]
    with pytest.raises(
        ConfigError, match=r"source 'tiny' would be repeated 100.0 times .* more than mixture.max_repeat 10.0"
    ):
        plan_mixture(pools, MixtureConfig(total=2000), seed=0)


def test_a_weighted_source_without_examples_is_an_error():
    with pytest.raises(ConfigError, match="source 'empty' has no training examples left"):
        plan_mixture([pool("a", 10, 0.5, 5), pool("empty", 0, 0.5, 5)], MixtureConfig(), seed=0)


def test_markdown_reports_requested_against_achieved():
    pools = [pool("medqa", 1000, 0.6, 40), pool("alpaca", 5000, None, 100, 1)]
    report = mixture_report(pools, plan_mixture(pools, MixtureConfig(), seed=0), MixtureConfig())
    table = mixture_markdown(report)
    assert "| medqa | 60.0% | 60.0% | 7,500 |" in table and "| alpaca | whole | 40.0% | 5,000 |" in table
