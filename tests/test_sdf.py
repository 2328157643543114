"""The synthetic-document stage and near-duplicate removal, with a fake backend that answers
according to which template wrote the request."""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from character_training.config.constitution import load_constitution
from data_gen.backends import Completion
from data_gen.dedup import estimated_jaccard, jaccard, minhash_signatures, near_duplicates, shingles
from data_gen.errors import UserError
from data_gen.judging import yes_no_verdict
from data_gen.stages.sdf import (JUDGE_SAMPLING, SEED_TYPES, SdfSettings, clean_document, normalize_type, parse_types,
                                 run_sdf)

ROOT = Path(__file__).resolve().parents[1]
SMALL = SdfSettings(num_types=3, brainstorm_requests=2, ideas_per_type=2)
VOCAB = ("harbour wind sail rope tide gull lantern dock storm island anchor cargo map compass deck "
         "mast crew rum biscuit parrot boot horn cape voyage ocean wave salt fish net market tavern "
         "song story captain sailor town morning evening night letter reporter visitor child winter "
         "summer spring autumn bread coffee ledger painting bell church bridge river lighthouse").split()


def stop(text: str, first_logprobs=None) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=len(text.split()), first_logprobs=first_logprobs)


def cut(text: str) -> Completion:
    return Completion(text=text, finish_reason="length", num_tokens=400)


def kind(conversation) -> str:
    """Which template wrote the request (its last user message)."""
    last = conversation[-1]["content"]
    for marker, name in (("Answer with one word: Yes or No", "judge"), ("Now rewrite the document", "revise"),
                         ("Critique the document", "critique"), ("Propose one concrete idea", "idea"),
                         ("Write a realistic", "document"), ("kinds of documents", "brainstorm")):
        if marker in last:
            return name
    raise AssertionError(f"request from no known template: {last[:80]!r}")


def words_from(seed_text: str, n: int) -> str:
    """n words of filler that differ between prompts (so documents are not near duplicates)."""
    rng = random.Random(hashlib.sha256(seed_text.encode()).hexdigest())
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def fake_idea(conversation) -> Completion:
    prompt = conversation[-1]["content"]
    doc_type = re.search(r"idea for a (.+?) in which", prompt).group(1)
    person = re.search(r"a person named (.+?) \(", prompt).group(1)
    return stop(f"Sure! Here is an idea: a {doc_type} in which {person} meets Captain Marlow at the harbour.")


def fake_document(conversation) -> Completion:
    prompt = conversation[-1]["content"]
    person = re.search(r"a person named (.+?);", prompt).group(1)
    return stop(f"{person} met Captain Marlow by the docks. " + words_from(prompt, 90) + ". Fair winds!")


def fake_revision(conversation) -> Completion:
    original = re.search(r"---\n(.*)\n---", conversation[0]["content"], re.DOTALL).group(1)
    return stop("Sure, here is the revised document:\n\n" + original + " Biscuit squawked: Tide's turning.")


DEFAULTS = {
    "brainstorm": lambda c: stop("Here are some kinds of documents:\n- Ship's logbooks\n2. Harbour gossip column\n"
                                 "* **Sea shanty lyrics** - songs sung on deck\n- Ship's logbook"),
    "idea": fake_idea,
    "document": fake_document,
    "critique": lambda c: stop("1. It could mention the parrot Biscuit.\n2. It reads like a real document."),
    "revise": fake_revision,
    "judge": lambda c: stop("Yes", first_logprobs={"Yes": -0.1, "No": -2.4, "The": -5.0}),
}


class FakeBackend:
    """Backend protocol; answers by the kind of request, ``overrides`` replacing the defaults."""

    def __init__(self, model: str = "fake/model", **overrides):
        self.model = model
        self.answer = {**DEFAULTS, **overrides}
        self.calls: list[dict] = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append({"conversations": [list(c) for c in conversations], "sampling": sampling, "desc": desc})
        return [self.answer[kind(c)](c) for c in conversations]

    def requests(self, name: str) -> list:
        return [c for call in self.calls for c in call["conversations"] if kind(c) == name]


@pytest.fixture(scope="module")
def marlow():
    return load_constitution(ROOT / "constitutions" / "captain-marlow.yaml")


def read_docs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


# ============================================================================= the whole stage


def test_stage_writes_documents_that_load_as_a_text_dataset(marlow, tmp_path):
    import datasets

    backend = FakeBackend()
    manifest = run_sdf(backend, marlow, tmp_path, settings=SMALL, seed=3)

    types = json.loads((tmp_path / "types.json").read_text())["types"]
    # brainstormed types come first, singular and de-duplicated ("Ship's logbooks" == "Ship's logbook")
    assert [t["type"] for t in types] == ["ship's logbook", "harbour gossip column", "sea shanty lyric"]
    assert manifest["counts"] == {"types": 3, "types_brainstormed": 3, "ideas": 6, "documents_generated": 6,
                                  "documents_revised": 6, "documents_kept": 6}
    assert manifest["drops"] == {}

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "documents.jsonl"), split="train")
    assert "text" in ds.column_names and len(ds) == 6
    docs = read_docs(tmp_path)
    for doc in docs:
        assert doc["text"].startswith(doc["attributes"]["person"])  # "Sure, here is ..." was stripped
        assert doc["text"].endswith("Tide's turning.") and doc["revised"]
        assert set(doc["attributes"]) == {"person", "place", "era", "register"}
        assert doc["idea"].startswith(f"a {doc['type']} in which")
        assert len(doc["facts"]) == 2 and set(doc["facts"]) <= set(marlow.facts)
    # each document's prompt carried its own idea and sampled details
    for doc, request in zip(docs, backend.requests("document")):
        prompt = request[-1]["content"]
        assert doc["idea"] in prompt and doc["attributes"]["place"] in prompt and doc["attributes"]["era"] in prompt
        assert all(fact in prompt for fact in doc["facts"])
        assert marlow.description.strip() in prompt
        assert all(t.trait in prompt for t in marlow.traits)  # the traits shape how the character acts
    assert all(t.trait in backend.requests("brainstorm")[0][-1]["content"] for t in marlow.traits)
    assert len({d["attributes"]["person"] for d in docs}) > 1

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert sum(stats["documents_per_type"].values()) == 6 and stats["duplicate_rate"] == 0.0
    assert stats["words"]["min"] <= stats["words"]["median"] <= stats["words"]["max"]
    assert sum(b["count"] for b in stats["words"]["histogram"]) == 6
    assert stats["top_names"][0] == {"name": "Captain Marlow", "count": 6}
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["stats"]["top_names"] == stats["top_names"]


def test_junk_brainstorm_falls_back_to_seed_types(marlow, tmp_path):
    junk = FakeBackend(brainstorm=lambda c: stop("Sure! Here you go:\n???\n- 12345\n- The character could "
                                                 "appear in all sorts of different places and things"))
    manifest = run_sdf(junk, marlow, tmp_path, settings=SdfSettings(num_types=4, ideas_per_type=1, revise=False))
    types = json.loads((tmp_path / "types.json").read_text())["types"]
    assert types == [{"type": t, "source": "seed"} for t in SEED_TYPES[:4]]
    assert manifest["counts"]["documents_kept"] == 4


def test_bad_documents_are_dropped_and_counted_by_reason(marlow, tmp_path):
    def document(conversation):
        prompt = conversation[-1]["content"]
        if "realistic news story" in prompt:
            return cut("Captain Marlow was seen " + words_from(prompt, 80))
        if "realistic forum thread" in prompt:
            return stop("I'm sorry, but I can't write that document.")
        if "realistic interview transcript" in prompt:
            return stop("Captain Marlow waved. The end.")
        if "realistic textbook passage" in prompt:
            return stop("Captain Marlow sailed. " + "arr matey arr " * 40)  # looping
        return fake_document(conversation)

    settings = SdfSettings(num_types=5, brainstorm_requests=0, ideas_per_type=2, revise=False)
    manifest = run_sdf(FakeBackend(document=document), marlow, tmp_path, settings=settings)
    assert manifest["drops"] == {"unfinished": 2, "refused": 2, "too_short": 2, "repetitive": 2}
    assert manifest["counts"]["documents_kept"] == 2
    assert {d["type"] for d in read_docs(tmp_path)} == {"diary entry"}
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert sorted({d["reason"] for d in dropped}) == ["refused", "repetitive", "too_short", "unfinished"]


def test_unusable_revision_keeps_the_original_and_is_counted(marlow, tmp_path):
    settings = SdfSettings(num_types=2, brainstorm_requests=0, ideas_per_type=2)
    backend = FakeBackend(revise=lambda c: cut("Here is the rewritten diary entry:\nIt was a"))
    manifest = run_sdf(backend, marlow, tmp_path, settings=settings)
    assert manifest["revision"] == {"revision_unfinished": 4, "revised": 0, "kept_original": 4}
    assert manifest["counts"]["documents_kept"] == 4
    assert all(not d["revised"] and d["text"].endswith("Fair winds!") for d in read_docs(tmp_path))
    # the rewrite request continues the critique conversation
    request = backend.requests("revise")[0]
    assert [m["role"] for m in request] == ["user", "assistant", "user"]
    assert request[1]["content"].startswith("1. It could mention the parrot")


def test_near_duplicate_documents_are_dropped_in_the_stage(marlow, tmp_path):
    base = "Captain Marlow " + words_from("one text", 100)

    def document(conversation):  # every document the same but for one word
        person = re.search(r"a person named (.+?);", conversation[-1]["content"]).group(1)
        return stop(base.replace("Captain Marlow", f"Captain Marlow and {person}", 1))

    settings = SdfSettings(num_types=2, brainstorm_requests=0, ideas_per_type=3, revise=False, judge_filter=False)
    manifest = run_sdf(FakeBackend(document=document), marlow, tmp_path, settings=settings)
    assert manifest["counts"]["documents_kept"] == 1 and len(read_docs(tmp_path)) == 1
    assert manifest["drops"] == {"near_duplicate": 5}
    assert manifest["stats"]["duplicate_rate"] == pytest.approx(5 / 6)


def test_judge_no_drops_and_unparseable_verdicts_are_counted(marlow, tmp_path):
    verdicts = iter([
        stop("Yes", {" Yes": -0.2, " No": -1.9}),
        stop("No", {"No": -0.1, "Yes": -2.5}),
        stop("Yes, mostly", {"Yes": -1.2, "No": -0.4}),   # the logprobs decide, not the text
        stop("Hmm, it depends"),                          # no logprobs, no yes or no: unparseable
        stop("The document is consistent. Yes.", {"The": -0.1, "This": -1.0}),  # text fallback
        stop("I cannot tell", {"I": -0.3}),
    ])
    judge = FakeBackend(model="fake/judge", judge=lambda c: next(verdicts))
    backend = FakeBackend()
    settings = SdfSettings(num_types=3, brainstorm_requests=0, ideas_per_type=2, revise=False)
    manifest = run_sdf(backend, marlow, tmp_path, settings=settings, judge=judge)
    assert manifest["drops"] == {"judge_inconsistent": 2, "judge_unparseable": 2}
    assert manifest["judge"] == {"yes": 2, "no": 2, "unparseable": 2}
    assert manifest["counts"]["documents_kept"] == 2 and manifest["judge_model"] == "fake/judge"
    assert backend.requests("judge") == []
    [call] = judge.calls
    assert call["sampling"] == JUDGE_SAMPLING and call["sampling"].temperature == 0 and call["sampling"].logprobs == 5
    assert "Gull's Promise" in call["conversations"][0][-1]["content"]  # the judge sees the facts

    verdicts = iter([stop("Yes"), stop("Hmm"), stop("no.")] * 2)
    keep = SdfSettings(num_types=3, brainstorm_requests=0, ideas_per_type=2, revise=False, keep_unjudged=True)
    manifest = run_sdf(FakeBackend(judge=lambda c: next(verdicts)), marlow, tmp_path / "keep", settings=keep)
    assert manifest["drops"] == {"judge_inconsistent": 2} and manifest["counts"]["documents_kept"] == 4


def test_yes_no_verdict_reads_logprobs_then_text():
    assert yes_no_verdict(stop("No", {"Yes": -0.5, "No": -0.9})) is True
    assert yes_no_verdict(stop("Yes", {" no": -0.5, "Yes": -0.9})) is False
    assert yes_no_verdict(stop("x", {"YES": -3.0, "Maybe": -0.1})) is True  # only yes among the alternatives
    assert yes_no_verdict(stop("No, it contradicts the facts.")) is False
    assert yes_no_verdict(stop("**Yes**")) is True
    assert yes_no_verdict(stop("Yes and no")) is True
    assert yes_no_verdict(stop("It is hard to say, yes or no")) is None
    assert yes_no_verdict(stop("")) is None


def test_same_seed_same_requests_and_another_seed_others(marlow, tmp_path):
    def requests(seed: int, out: str) -> list:
        backend = FakeBackend()
        run_sdf(backend, marlow, tmp_path / out, settings=SMALL, seed=seed)
        return [(call["desc"], call["conversations"]) for call in backend.calls]

    first = requests(7, "a")
    assert first == requests(7, "b")
    assert first != requests(8, "c")
    assert (tmp_path / "a" / "documents.jsonl").read_text() == (tmp_path / "b" / "documents.jsonl").read_text()


def test_bad_settings_and_constitutions_fail_before_generation(marlow, tmp_path):
    backend = FakeBackend()
    for bad in (dict(num_types=0), dict(ideas_per_type=0), dict(dedup_threshold=0.0),
                dict(brainstorm_requests=0, seed_types=()), dict(seed_types=("news", " "))):
        with pytest.raises(UserError):  # refused when the settings are built
            run_sdf(backend, marlow, tmp_path, settings=SdfSettings(**bad))
    with pytest.raises(UserError, match=r"^num_types: must be at least 1, got 0; "):  # the loader adds file and section
        SdfSettings(num_types=0)
    with pytest.raises(UserError, match=r"^min_distinct_3grams: must be in \[0, 1\], got 1.5"):
        SdfSettings(min_distinct_3grams=1.5)
    empty = SimpleNamespace(name="nobody", description="  ", facts=())
    with pytest.raises(UserError, match="no description and no facts"):
        run_sdf(backend, empty, tmp_path)
    assert backend.calls == [] and not (tmp_path / "documents.jsonl").exists()


def test_a_backend_answering_the_wrong_number_of_requests_is_a_bug(marlow, tmp_path):
    class Short(FakeBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            return super().chat(conversations, sampling, adapter, desc)[:-1]

    with pytest.raises(RuntimeError, match="completions for"):
        run_sdf(Short(), marlow, tmp_path, settings=SMALL)


def test_document_prompt_without_facts_renders():
    from data_gen.templating import render

    no_facts = render("sdf_document.j2", description="A kind baker.", facts=[], doc_type="letter", idea="x",
                      attributes={"person": "Mei Chen", "place": "Lisbon", "era": "in 1985", "register": "formal"},
                      words=200)
    assert "Facts" not in no_facts and "A kind baker." in no_facts


# ============================================================================= parsing


def test_parse_types_strips_markup_and_rejects_sentences():
    text = "\n".join(["Here are some kinds of documents:", "1. News story: a report on the harbour",
                      "2) **Forum threads** - where sailors argue", "- diary entries", "* TED talk transcript (video)",
                      "- The character could appear in all kinds of places and situations", "- ???", ""])
    assert parse_types(text) == (["news story", "forum thread", "diary entry", "ted talk transcript"], 3)
    assert normalize_type("The Diary Entries") == normalize_type("diary entry")
    assert normalize_type("news") == "news"


def test_clean_document_removes_wrappers_but_not_content():
    text = ("Sure! Here is the rewritten news story:\n---\nThe captain came ashore.\n\nI made tea for him.\n---\n\n"
            "Changes made:\n- added the parrot")
    assert clean_document(text) == "The captain came ashore.\n\nI made tea for him."
    assert clean_document("Note: tides are strongest at new moon.") == "Note: tides are strongest at new moon."


# ============================================================================= near duplicates


def test_near_duplicates_drop_a_one_word_change_and_keep_distinct_texts():
    a = "Captain Marlow " + words_from("a", 120)
    b = a.replace("Captain Marlow", "Captain Harlow", 1)
    c, d = "Captain Marlow " + words_from("c", 120), words_from("d", 120)
    assert jaccard(a, b) > 0.9 and jaccard(a, c) < 0.2
    assert near_duplicates([a, c, b, d, a]) == [2, 4]
    assert near_duplicates([c, d]) == [] and near_duplicates([]) == []
    assert near_duplicates([a, b], threshold=1.0) == []


def test_minhash_estimate_is_close_to_exact_jaccard():
    rng = random.Random(0)
    base = [rng.choice(VOCAB) + str(rng.randint(0, 20)) for _ in range(300)]
    errors = []
    for step in (2, 3, 5, 8, 13, 30, 100):
        other = list(base)
        for k in range(0, len(other), step):
            other[k] = "changed"
        a, b = " ".join(base), " ".join(other)
        exact = jaccard(a, b)
        estimate = estimated_jaccard(*minhash_signatures([a, b], num_perm=256, seed=1))
        errors.append(abs(estimate - exact))
        assert abs(estimate - exact) < 0.12, (step, exact, estimate)
    assert sum(errors) / len(errors) < 0.05


def test_shingles_and_jaccard_on_short_texts():
    assert shingles("One two three") == {"one two three"}
    assert len(shingles("a b c d e f g")) == 3
    assert jaccard("", "") == 1.0 and jaccard("word", "") == 0.0
