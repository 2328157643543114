"""Contamination check: drop evaluation prompts that training already saw, and count them.

An evaluation prompt that appeared in training (as a training prompt, inside an answer, or
quoted in a synthetic document) measures what the model remembers, not how it generalizes.
So every evaluation passes its prompts through :func:`check_contamination` together with the
training texts (prompts, answers, documents) before scoring, scores only ``kept`` and reports
``counts()``.

A prompt is dropped for the first of these rules that holds against some training text:

1. ``normalized``: equal after :func:`normalize` (NFKC, lowercase, punctuation turned into
   spaces, white space collapsed): exact duplicates and case/punctuation/space variants.
2. ``quoted``: the normalized prompt, at least ``min_quote_words`` words long, occurs as a
   contiguous run of words inside a longer normalized training text (a prompt quoted in a
   document or in an answer).
3. ``ngram``: at least ``ngram_threshold`` of the prompt's word n-grams occur in the training
   text, or the Jaccard similarity of the two texts' word 5-gram sets is at least 0.6, or that of
   their word *sets* is at least 0.8 (a near duplicate: a word or two changed; one word changed
   in the middle of a 12-word prompt breaks most of its n-grams but leaves a word-set Jaccard of
   11/13 = 0.85). A prompt shorter than n words uses n-grams of its own length (at least 3); a
   prompt under 3 words is checked by rule 1 only, and the word-set test needs 4 distinct words.

The quote test runs before the n-gram test: a quoted prompt has all of its n-grams in the
document, so in the other order every quote would be reported as an n-gram overlap.

Speed: the training texts are scanned once, for the prompts' n-grams and words only, into an
index n-gram (or word) -> ids of the training texts that hold it. Overlaps are counted from that
index, and a prompt is only ever compared with training texts sharing an n-gram with it, or, for
the word-set test, one of its rarest words: a word-set Jaccard of 0.8 leaves at most a fifth of
the prompt's words out of the text, so the text holds one of any (that many + 1) of them.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

from data_gen.dedup import jaccard, shingles

REASONS = ("normalized", "ngram", "quoted")
JACCARD_N, JACCARD_THRESHOLD = 5, 0.6
WORD_SET_THRESHOLD, WORD_SET_MIN_WORDS = 0.8, 4
MATCH_CHARS = 200  # how much of the matching training text a dropped record keeps


@dataclass(frozen=True)
class Contamination:
    """The clean prompts, in input order, and one record per dropped prompt: ``prompt``,
    ``reason`` (one of REASONS), ``match`` (the training text, first 200 characters) and
    ``overlap`` (the n-gram share or Jaccard similarity; 1.0 for the other reasons)."""

    kept: list[str]
    dropped: list[dict]

    def counts(self) -> dict:
        by_reason = dict.fromkeys(REASONS, 0)
        for record in self.dropped:
            by_reason[record["reason"]] += 1
        return {"checked": len(self.kept) + len(self.dropped), "kept": len(self.kept),
                "dropped": len(self.dropped), "by_reason": by_reason}


def normalize(text: str) -> str:
    """Unicode NFKC, lowercase, punctuation replaced by spaces, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _ngrams(words: tuple[str, ...], k: int) -> set[tuple[str, ...]]:
    return {words[i:i + k] for i in range(len(words) - k + 1)}


class _TrainingIndex:
    """The normalized training texts, a lookup of them, and n-gram -> training text ids for
    the n-grams in ``wanted`` (n-gram length -> the prompts' n-grams of that length)."""

    def __init__(self, training_texts: list[str], wanted: dict[int, set], wanted_words: set[str]):
        self.texts = [normalize(t) for t in training_texts]
        self.exact: dict[str, int] = {}
        self.postings: dict[tuple, list[int]] = defaultdict(list)
        self.word_postings: dict[str, list[int]] = defaultdict(list)
        self.distinct_words: list[int] = []
        for tid, text in enumerate(self.texts):
            self.exact.setdefault(text, tid)
            words = tuple(text.split())
            distinct = set(words)
            self.distinct_words.append(len(distinct))
            for k, grams in wanted.items():
                for gram in _ngrams(words, k) & grams:
                    self.postings[gram].append(tid)
            for word in distinct & wanted_words:
                self.word_postings[word].append(tid)

    def near_word_set(self, prompt: str):
        """(Jaccard, training id) of the training text whose word set is nearest the prompt's, if
        it reaches WORD_SET_THRESHOLD; the candidates hold one of the prompt's rarest words."""
        mine = set(prompt.split())
        if len(mine) < WORD_SET_MIN_WORDS:
            return None
        rarest = sorted(mine, key=lambda w: (len(self.word_postings.get(w, ())), w))
        missing = math.floor(len(mine) * (1 - WORD_SET_THRESHOLD) + 1e-9)  # prompt words a match can lack
        candidates = {tid for w in rarest[:missing + 1] for tid in self.word_postings.get(w, ())}
        best = None
        for tid in sorted(candidates):
            if self.distinct_words[tid] > len(mine) / WORD_SET_THRESHOLD:
                continue  # too many words of its own to reach the threshold
            theirs = set(self.texts[tid].split())
            similarity = len(mine & theirs) / len(mine | theirs)
            if similarity >= WORD_SET_THRESHOLD and (best is None or similarity > best[0]):
                best = (similarity, tid)
        return best

    def match(self, prompt: str, grams: set, threshold: float, min_quote_words: int):
        """(reason, training id, overlap) of the first rule that holds, or None."""
        if prompt in self.exact:
            return "normalized", self.exact[prompt], 1.0
        if not grams:
            return None
        near = self.near_word_set(prompt)
        shared = Counter(tid for gram in grams for tid in self.postings.get(gram, ()))
        if len(prompt.split()) >= min_quote_words:
            for tid in sorted(tid for tid, count in shared.items() if count == len(grams)):
                if f" {prompt} " in f" {self.texts[tid]} ":
                    return "quoted", tid, 1.0
        # Jaccard >= 0.6 needs |5-grams of the text| <= |5-grams of the prompt| / 0.6, and a
        # text has at least (distinct words / 5) 5-grams: skip the texts too varied to pass.
        max_distinct = 5 * len(shingles(prompt, JACCARD_N)) / JACCARD_THRESHOLD
        hits = []
        for tid, count in sorted(shared.items()):
            share = count / len(grams)
            if share >= threshold:
                hits.append((share, -tid))
            elif self.distinct_words[tid] <= max_distinct:
                similarity = jaccard(prompt, self.texts[tid], JACCARD_N)
                if similarity >= JACCARD_THRESHOLD:
                    hits.append((similarity, -tid))
        if near is not None:
            hits.append((near[0], -near[1]))
        if not hits:
            return None
        overlap, tid = max(hits)
        return "ngram", -tid, overlap


def check_contamination(prompts: list[str], training_texts: list[str], *, n: int = 8,
                        ngram_threshold: float = 0.5, min_quote_words: int = 8) -> Contamination:
    """Split ``prompts`` into the clean ones (kept, in order) and the ones that are
    near-duplicates of, or quoted in, any of ``training_texts`` (see the module docstring)."""
    if n < 1 or not 0.0 < ngram_threshold <= 1.0:
        raise ValueError(f"need n >= 1 and 0 < ngram_threshold <= 1, got {n}, {ngram_threshold}")
    normalized = [normalize(p) for p in prompts]
    prompt_grams = []
    wanted: dict[int, set] = defaultdict(set)
    for text in normalized:
        words = tuple(text.split())
        k = min(n, len(words)) if len(words) >= 3 else 0  # under 3 words: rule 1 only
        grams = _ngrams(words, k) if k else set()
        prompt_grams.append(grams)
        wanted[k] |= grams
    wanted.pop(0, None)
    index = _TrainingIndex(list(training_texts), wanted, {w for text in normalized for w in text.split()})
    kept, dropped = [], []
    for prompt, text, grams in zip(prompts, normalized, prompt_grams):
        hit = index.match(text, grams, ngram_threshold, min_quote_words)
        if hit is None:
            kept.append(prompt)
            continue
        reason, tid, overlap = hit
        dropped.append({"prompt": prompt, "reason": reason,
                        "match": training_texts[tid][:MATCH_CHARS], "overlap": float(overlap)})
    return Contamination(kept=kept, dropped=dropped)
