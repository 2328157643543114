"""Paired comparisons of evaluation conditions ("adapter" against "base+system_prompt").

Every condition answers the same prompts, each ``samples_per_prompt`` times, with the same
per-request seed for the same (prompt, sample) in every condition: a condition's values are an
array of shape (prompts * k,), prompt-major (the k answers to a prompt in a row), aligned across
conditions. So the difference of two conditions is measured prompt by prompt: the bootstrap
resamples prompts and takes the SAME resampled prompts in both arms, i.e. it resamples the
per-prompt differences. How hard or easy a prompt is (the prompt-to-prompt variance, usually
the largest part) then cancels; two independent intervals, one per arm, count it twice and
can hide a real difference behind it.

``mde`` (minimal detectable difference): the true difference that this many prompts, with the
per-prompt differences as spread as observed, would find (95% interval excluding zero) with
80% probability, by the normal approximation: about 2.8 * sd / sqrt(prompts). A measured
difference well below it says little either way: ask more prompts (``prompts_for_half_width``).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

NAN = float("nan")


def _numbers(values: ArrayLike, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be numbers: {int((~np.isfinite(array)).sum())} of {len(array)} "
                         "are NaN or infinite (score every answer, or drop the prompt from every condition)")
    return array


def _interval(means: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles; the upper end is taken as the lower end of the negated
    means, so that negating the values (swapping two arms) negates the interval to the last bit."""
    return float(np.percentile(means, 2.5)), -float(np.percentile(-means, 2.5))


def prompt_means(values: ArrayLike, samples_per_prompt: int) -> np.ndarray:
    """(prompts,): the mean of each prompt's ``samples_per_prompt`` consecutive answers."""
    array = np.asarray(values, dtype=float).reshape(-1)
    if samples_per_prompt < 1 or len(array) % samples_per_prompt:
        raise ValueError(f"{len(array)} values do not split into prompts of {samples_per_prompt} answers each")
    return array.reshape(-1, samples_per_prompt).mean(axis=1)


def minimal_detectable_difference(per_prompt_differences_sd: float, prompts: int, *,
                                  alpha: float = 0.05, power: float = 0.8) -> float:
    """(z_{1-alpha/2} + z_power) * sd / sqrt(prompts): 2.8 * sd / sqrt(prompts) at the defaults."""
    if prompts < 2:
        return NAN
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * per_prompt_differences_sd / math.sqrt(prompts)


def prompts_for_half_width(sd: float, target_half_width: float) -> int:
    """Prompts needed for a 95% half-width 1.96 * sd / sqrt(n) <= target (at least 2)."""
    if target_half_width <= 0:
        raise ValueError(f"target half-width must be positive, not {target_half_width}")
    return max(2, math.ceil((NormalDist().inv_cdf(0.975) * sd / target_half_width) ** 2))


def paired_difference(a: ArrayLike, b: ArrayLike, *, samples_per_prompt: int = 1,
                      seed: int = 0, resamples: int = 2000) -> dict:
    """a - b paired by prompt: the difference of the means, its 95% percentile bootstrap
    interval over prompts (the same resampled prompts for both arms), and ``mde``."""
    a, b = _numbers(a, "a"), _numbers(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired arms must answer the same prompts: {len(a)} values against {len(b)}")
    d = prompt_means(a, samples_per_prompt) - prompt_means(b, samples_per_prompt)
    n = len(d)
    if n == 0:
        return {"difference": NAN, "ci95": [NAN, NAN], "half_width": NAN, "prompts": 0,
                "above_zero": False, "below_zero": False, "mde": NAN}
    rng = np.random.default_rng(seed)
    lo, hi = _interval(d[rng.integers(0, n, size=(resamples, n))].mean(axis=1))
    sd = float(d.std(ddof=1)) if n > 1 else NAN
    return {"difference": float(a.mean()) - float(b.mean()), "ci95": [lo, hi], "half_width": (hi - lo) / 2,
            "prompts": n, "above_zero": lo > 0, "below_zero": hi < 0, "mde": minimal_detectable_difference(sd, n)}


def paired_table(conditions: dict[str, ArrayLike], pairs: list[tuple[str, str]], *,
                 samples_per_prompt: int = 1, seed: int = 0, resamples: int = 2000) -> dict[str, dict]:
    """{"A - B": paired_difference(A, B)} for each pair whose two conditions are both present."""
    return {f"{x} - {y}": paired_difference(conditions[x], conditions[y], samples_per_prompt=samples_per_prompt,
                                            seed=seed, resamples=resamples)
            for x, y in pairs if x in conditions and y in conditions}


def clustered_interval(values: ArrayLike, clusters: ArrayLike, *, seed: int = 0,
                       resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``, resampling clusters (prompts)
    with replacement: a drawn cluster brings all its values, and the resample's mean is the mean
    over all of them. Clusters are numbered in the sorted order of their labels."""
    values = _numbers(values)
    labels = np.asarray(clusters).reshape(-1)
    if len(labels) != len(values):
        raise ValueError(f"{len(values)} values but {len(labels)} cluster labels")
    if len(values) == 0:
        return (NAN, NAN)
    _, cluster = np.unique(labels, return_inverse=True)
    sums, counts = np.bincount(cluster, weights=values), np.bincount(cluster).astype(float)
    m = len(sums)
    idx = np.random.default_rng(seed).integers(0, m, size=(resamples, m))
    return _interval(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
