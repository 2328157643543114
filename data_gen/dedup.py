"""Near-duplicate removal: MinHash signatures over word 5-gram shingles, LSH banding to find
candidate pairs, and an exact Jaccard check of each candidate.

A document is dropped when its shingle set's Jaccard similarity with an earlier kept document
reaches the threshold (the first of a group is kept). Only numpy: the k-th hash function is
``mix(x XOR mask_k)`` over 64-bit shingle hashes x, ``mix`` being splitmix64's finalizer (a
bijection of 64-bit integers that scrambles every bit). A linear ``a * x + b mod p`` with
small ``a`` nearly keeps the order of x, which correlates the permutations and ruins the
estimate.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

_EMPTY = np.iinfo(np.uint64).max  # the signature of a text without words


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of lowercased word n-grams; a text shorter than n words is one shingle."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word n-gram sets (two empty texts: 1.0)."""
    sa, sb = shingles(a, n), shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _hash64(shingle: str) -> int:
    return int.from_bytes(hashlib.blake2b(shingle.encode("utf-8"), digest_size=8).digest(), "little")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (multiplication wraps modulo 2^64 on purpose)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def minhash_signatures(texts: list[str], num_perm: int = 128, seed: int = 0, n: int = 5) -> np.ndarray:
    """One row of ``num_perm`` minimum hash values per text (uint64)."""
    masks = np.random.default_rng(seed).integers(0, _EMPTY, size=num_perm, dtype=np.uint64, endpoint=True)
    signatures = np.full((len(texts), num_perm), _EMPTY, dtype=np.uint64)
    for i, text in enumerate(texts):
        x = np.fromiter((_hash64(s) for s in shingles(text, n)), dtype=np.uint64)
        if x.size:
            signatures[i] = _mix(x[:, None] ^ masks[None, :]).min(axis=0)
    return signatures


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash's estimate of the Jaccard similarity: the share of equal signature positions."""
    return float(np.mean(sig_a == sig_b))


@lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the area of false positives below
    the threshold plus false negatives above it, under P(candidate) = 1 - (1 - s^rows)^bands."""
    s_low = np.linspace(0.0, threshold, 101)
    s_high = np.linspace(threshold, 1.0, 101)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_pos = np.trapezoid(1 - (1 - s_low ** rows) ** bands, s_low)
            false_neg = np.trapezoid((1 - s_high ** rows) ** bands, s_high)
            if false_pos + false_neg < best_error:
                best, best_error = (bands, rows), false_pos + false_neg
    return best


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, seed: int = 0,
                    n: int = 5) -> list[int]:
    """Indices of texts to drop, ascending: each is a near duplicate (Jaccard of word n-grams
    >= threshold) of an earlier kept text."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not texts:
        return []
    bands, rows = lsh_bands(threshold, num_perm)
    signatures = minhash_signatures(texts, num_perm, seed, n)
    shingle_sets = [shingles(t, n) for t in texts]
    buckets: dict[tuple[int, bytes], list[int]] = {}
    drop = []
    for i in range(len(texts)):
        keys = [(band, signatures[i, band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        if any(_jaccard_sets(shingle_sets[i], shingle_sets[j]) >= threshold for j in sorted(candidates)):
            drop.append(i)
            continue
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return drop


def _jaccard_sets(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
