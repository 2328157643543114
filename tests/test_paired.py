"""Paired differences between evaluation conditions (evaluation/paired.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from character_training.evaluation.core import bootstrap_interval
from character_training.evaluation.paired import (clustered_interval, minimal_detectable_difference,
                                                   paired_difference, paired_table, prompt_means,
                                                   prompts_for_half_width)


def looped_interval(means: list[float]) -> list[float]:
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def test_constant_per_prompt_difference_has_a_zero_width_interval():
    b = np.arange(40) / 64  # exact in binary: every per-prompt difference is exactly 0.25
    out = paired_difference(b + 0.25, b)
    assert out["difference"] == pytest.approx(0.25, abs=1e-12)
    assert out["ci95"] == [0.25, 0.25]
    assert out["half_width"] == 0.0
    assert out["prompts"] == 40 and out["above_zero"] and not out["below_zero"]
    assert out["mde"] == pytest.approx(0.0, abs=1e-12)


def test_interval_matches_a_looped_bootstrap_of_per_prompt_differences():
    rng = np.random.default_rng(7)
    a, b = rng.uniform(size=30), rng.uniform(size=30)
    out = paired_difference(a, b, seed=3, resamples=500)
    d = [x - y for x, y in zip(a, b)]
    idx = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    means = [sum(d[i] for i in row) / 30 for row in idx]
    assert out["ci95"] == pytest.approx(looped_interval(means), abs=1e-12)
    assert out["difference"] == pytest.approx(float(np.mean(d)), abs=1e-12)
    assert out["half_width"] == pytest.approx((out["ci95"][1] - out["ci95"][0]) / 2, abs=1e-15)
    assert out["mde"] == pytest.approx(minimal_detectable_difference(float(np.std(d, ddof=1)), 30))


def test_pairing_cancels_the_prompt_to_prompt_variance():
    rng = np.random.default_rng(0)
    prompt_level = rng.normal(0.0, 1.0, size=200)
    b = prompt_level + rng.normal(0.0, 0.01, size=200)
    a = prompt_level + 0.1 + rng.normal(0.0, 0.01, size=200)
    paired = paired_difference(a, b)
    assert paired["half_width"] < 0.02 and paired["above_zero"]
    for arm in (a, b):
        lo, hi = bootstrap_interval(arm)
        assert (hi - lo) / 2 > 5 * paired["half_width"]
        assert (hi - lo) / 2 > 0.1  # each arm's own interval is wider than the difference itself


def test_swapping_the_arms_negates_difference_and_interval_exactly():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=60), rng.uniform(size=60)
    ab, ba = paired_difference(a, b, samples_per_prompt=3), paired_difference(b, a, samples_per_prompt=3)
    assert ba["difference"] == -ab["difference"]
    assert ba["ci95"] == [-ab["ci95"][1], -ab["ci95"][0]]
    assert ba["half_width"] == ab["half_width"] and ba["mde"] == ab["mde"]
    assert (ab["above_zero"], ab["below_zero"]) == (ba["below_zero"], ba["above_zero"])


def test_samples_per_prompt_averages_each_prompts_answers_before_differencing():
    a = np.array([1.0, 0.0] * 25)
    b = np.array([0.0, 1.0] * 25)
    per_prompt = paired_difference(a, b, samples_per_prompt=2)
    per_answer = paired_difference(a, b, samples_per_prompt=1)
    assert per_prompt["prompts"] == 25 and per_answer["prompts"] == 50
    assert per_prompt["ci95"] == [0.0, 0.0]  # every prompt's two answers average to 0.5 in both arms
    assert per_answer["half_width"] > 0.2  # answer by answer the differences are +1 and -1
    assert per_prompt == paired_difference(prompt_means(a, 2), prompt_means(b, 2))


def test_prompt_means():
    assert prompt_means([1, 2, 3, 5], 2).tolist() == [1.5, 4.0]
    with pytest.raises(ValueError, match="do not split"):
        prompt_means([1, 2, 3], 2)


def test_paired_table_skips_absent_conditions():
    conditions = {"adapter": np.array([1.0, 1.0, 0.0, 1.0]), "base": np.array([0.0, 1.0, 0.0, 0.0])}
    table = paired_table(conditions, [("adapter", "base"), ("adapter", "base+system_prompt")], samples_per_prompt=2)
    assert list(table) == ["adapter - base"]
    assert table["adapter - base"] == paired_difference(conditions["adapter"], conditions["base"], samples_per_prompt=2)


def test_clustered_interval_matches_a_looped_bootstrap_with_unequal_clusters():
    rng = np.random.default_rng(4)
    sizes = [1, 5, 2, 8, 3, 1, 4]
    clusters = [f"p{c}" for c, s in enumerate(sizes) for _ in range(s)]
    values = rng.normal(size=len(clusters))
    got = clustered_interval(values, clusters, seed=2, resamples=400)
    labels = sorted(set(clusters))
    members = {label: [v for v, c in zip(values, clusters) if c == label] for label in labels}
    means = []
    for row in np.random.default_rng(2).integers(0, len(labels), size=(400, len(labels))):
        drawn = [v for i in row for v in members[labels[i]]]
        means.append(sum(drawn) / len(drawn))
    assert list(got) == pytest.approx(looped_interval(means), abs=1e-12)


def test_a_large_cluster_is_not_many_independent_draws():
    per_prompt = np.random.default_rng(5).uniform(size=10)
    one = clustered_interval(per_prompt, np.arange(10))
    twenty = clustered_interval(np.repeat(per_prompt, 20), np.repeat(np.arange(10), 20))
    assert twenty[1] - twenty[0] == pytest.approx(one[1] - one[0], abs=1e-12)
    independent = bootstrap_interval(np.repeat(per_prompt, 20))
    assert independent[1] - independent[0] < (one[1] - one[0]) / 2


def test_minimal_detectable_difference_and_prompts_needed():
    assert minimal_detectable_difference(0.5, 100) == pytest.approx(0.14, abs=1e-3)
    assert minimal_detectable_difference(0.5, 100) == pytest.approx(2.8016 * 0.05, abs=1e-4)
    assert math.isnan(minimal_detectable_difference(0.5, 1))
    assert prompts_for_half_width(0.5, 0.1) == 97


def test_nan_and_bad_lengths_raise():
    with pytest.raises(ValueError, match="must be numbers"):
        paired_difference([0.1, float("nan")], [0.2, 0.3])
    with pytest.raises(ValueError, match="must be numbers"):
        paired_difference([0.1, 0.2], [float("nan"), 0.3])
    with pytest.raises(ValueError, match="must be numbers"):
        clustered_interval([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="do not split"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], samples_per_prompt=2)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def test_empty_arms_give_nan_fields():
    out = paired_difference([], [])
    assert out["prompts"] == 0 and not out["above_zero"] and not out["below_zero"]
    assert all(math.isnan(x) for x in [out["difference"], *out["ci95"], out["half_width"], out["mde"]])
    assert all(math.isnan(x) for x in clustered_interval([], []))
