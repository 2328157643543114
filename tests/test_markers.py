"""Marker phrases: a constitution's declared words, counted as written in the evaluation's answers
(trait evidence that does not come from the persona classifier)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from character_training.config.constitution import ConstitutionError, load_constitution
from character_training.evaluation import quick
from character_training.evaluation.core import bootstrap_interval, surface_metrics
from character_training.config.markers import check_marker, marker_flags, markers_in
from data_gen.backends import Completion

SMALL = """\
name: small
description: A small character.
traits:
  - trait: I speak plainly.
    questions: ["What is rain?"]
"""


@pytest.mark.parametrize("text,expect", [
    ("Arr, matey! Ye be right.", ["arr", "ye", "matey"]),  # in the order declared
    ("ARR! AYE!", ["arr", "aye"]),
    ("Yes, yesterday, arrange the year.", []),             # whole words only: no "ye" in "yes"
    ("Good day, me   hearty.", ["me hearty"]),              # any white space inside a phrase
    ("Good day, me\nhearty.", ["me hearty"]),
    ("Fair winds!", ["fair winds"]),
    ("fairwinds", []),
])
def test_markers_are_whole_words_case_insensitive(text, expect):
    markers = ["arr", "aye", "ye", "matey", "me hearty", "fair winds"]
    assert markers_in(text, markers) == expect
    assert marker_flags([text], markers).tolist() == [bool(expect)]


def test_a_trailing_star_matches_any_ending_and_nothing_before():
    assert markers_in("The seasons turn.", ["season*"]) == ["season*"]
    assert markers_in("Seasonal work.", ["season*"]) == ["season*"]
    assert markers_in("Out of season.", ["season*"]) == ["season*"]
    assert markers_in("preseason games", ["season*"]) == []
    assert markers_in("in your control", ["in your control"]) == ["in your control"]


def test_markers_with_punctuation_still_match_as_written():
    assert markers_in("I said a-hoy there", ["a-hoy"]) == ["a-hoy"]
    assert markers_in("Aye, captain's orders!", ["captain's orders"]) == ["captain's orders"]
    assert markers_in("Oh! Ahoy!", ["ahoy!"]) == ["ahoy!"]   # a marker ending in punctuation needs no word boundary


def test_no_markers_flags_nothing():
    assert marker_flags(["arr", "aye"], []).tolist() == [False, False]


@pytest.mark.parametrize("marker,problem", [("", "empty"), ("*", "empty"), ("se*son", "before its end"),
                                            ("...", "no letter")])
def test_check_marker_says_why(marker, problem):
    assert problem in check_marker(marker)
    assert "such as 'aye' or 'season*'" in check_marker(marker)  # and how to write one


@pytest.mark.parametrize("marker,what", [
    ("aye|arr", "'|'"), ("(aye|arr)", "'|'"), ("colou?r", "repeat"), ("colo(u)?r", "repeat"), ("ar+gh", "repeat"),
    ("arr{2}", "repeat"), ("[Aa]rr", "character class"), ("colo[u]r", "character class"), ("[a-z]arr", "class"),
    (".*", "'.*'"), ("arr.+", "'.*'"), ("\\barr\\b", "backslash"), ("^arr", "anchor"), ("(?i)arr", "group"),
])
def test_a_marker_that_looks_like_a_regular_expression_is_refused(marker, what):
    problem = check_marker(marker)
    assert problem is not None and "regular expression" in problem and what in problem
    assert "matched as written" in problem and "trailing '*'" in problem
    assert markers_in("Aye, arr! A colour, a color, aaargh.", [marker]) == []  # why: as written, it finds nothing


@pytest.mark.parametrize("marker,split", [("aye|arr", "2 markers: 'aye', 'arr'"),
                                          ("(aye|arr|matey)", "3 markers: 'aye', 'arr', 'matey'"),
                                          ("season*|soil", "2 markers: 'season*', 'soil'")])
def test_an_alternation_is_split_into_markers_in_the_advice(marker, split):
    assert check_marker(marker).endswith(split)
    assert all(check_marker(m) is None for m in split.split(": ")[1].replace("'", "").split(", "))


@pytest.mark.parametrize("marker", ["eh?", "C++", "[sighs]", "Mr. Smith", "e.g.", "ahoy!", "$5", "US$", "what?!",
                                    "season*", "captain's orders", "a-hoy"])
def test_punctuation_that_people_write_is_not_mistaken_for_a_regular_expression(marker):
    assert check_marker(marker) is None


def test_constitution_reads_markers_and_they_do_not_change_its_hash(tmp_path):
    plain, marked = tmp_path / "plain.yaml", tmp_path / "marked.yaml"
    plain.write_text(SMALL)
    marked.write_text(SMALL + "markers: [aye, season*]\n")
    a, b = load_constitution(plain), load_constitution(marked)
    assert a.markers == () and b.markers == ("aye", "season*")
    assert a.sha256 == b.sha256  # generation and training do not read markers: finished stages stay valid
    assert a.system_prompt() == b.system_prompt()
    assert b.to_dict()["markers"] == ["aye", "season*"]


@pytest.mark.parametrize("tail,field", [
    ("markers: aye\n", "markers"),
    ("markers: [aye, '']\n", "markers"),
    ("markers: [aye, 'se*son']\n", "markers[1]"),
    ("markers: [aye, Aye]\n", "markers"),
    ("markers: [matey, 'aye|arr']\n", "markers[1]"),
    ("markers: ['colou?r']\n", "markers[0]"),
])
def test_bad_markers_are_refused_naming_the_field(tmp_path, tail, field):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL + tail)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert field in str(err.value)


@pytest.mark.parametrize("name", ["captain-marlow", "stoic-gardener"])
def test_shipped_personas_declare_markers_that_their_own_description_uses(name):
    c = load_constitution(f"constitutions/{name}.yaml")
    assert c.markers
    assert markers_in(c.system_prompt(), c.markers)


def test_surface_metrics_report_the_marker_rate_resampling_prompts():
    texts = ["Arr, matey", "Hello", "aye aye", "yes", "ye", "no"]  # 3 prompts x 2 answers
    flags = np.zeros(6)
    m = surface_metrics(texts, flags, [(1.0, 1)] * 6, [True] * 6, seed=1, samples_per_prompt=2,
                        markers=("arr", "aye", "ye"))
    assert m["marker_rate"] == pytest.approx(3 / 6)
    assert m["marker_rate_ci95"] == list(bootstrap_interval(np.array([0.5, 0.5, 0.5]), seed=1))
    assert "marker_rate" not in surface_metrics(texts, flags, [(1.0, 1)] * 6, [True] * 6, seed=1)


class _Scripted:
    """A backend answering each condition from a script (the quick check's logic only)."""

    def __init__(self, answers):
        self.answers = answers

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        key = "adapter" if adapter else ("system" if conversations[0][0]["role"] == "system" else "base")
        return [Completion(text=self.answers[key][i % len(self.answers[key])], finish_reason="stop", num_tokens=3)
                for i in range(len(conversations))]


def test_quick_check_counts_the_constitutions_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(quick, "answer_perplexities", lambda model, prompts, texts, desc="": [(1.0, 2)] * len(texts))

    class Classifier:
        def fit(self, persona, plain):
            return {"train_examples": len(persona) + len(plain)}

        def persona_flags(self, texts):
            return np.array([t.startswith("Arr") for t in texts])

    backend = _Scripted({"base": ["Hello there.", "Yes."], "system": ["Arr, matey!", "Aye."],
                         "adapter": ["Arr!", "Sure."]})
    report = quick.quick_check(backend, "model", quick.quick_conditions("SYSTEM", str(tmp_path)),
                               {"heldout": ["p1", "p2"]}, [], tmp_path / "eval", classifier=Classifier,
                               samples_per_prompt=2, markers=("arr", "aye", "matey"))
    rates = {n: r["marker_rate"] for n, r in report["sets"]["heldout"]["conditions"].items()}
    assert rates == {"base": 0.0, "base+system_prompt": 1.0, "adapter": 0.5}
    paired = report["sets"]["heldout"]["paired"]
    assert paired["adapter - base+system_prompt"]["marker_rate"]["difference"] == -0.5
    assert report["markers"] == ["arr", "aye", "matey"]
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert answers[4]["markers"] == ["arr", "matey"]  # the first system-prompted answer (2 prompts x 2 before it)
    assert "markers" in quick.format_table(report)
