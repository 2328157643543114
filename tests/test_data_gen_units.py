"""data_gen's pure logic with a fake backend: prompt parsing/expansion, pairs, the store."""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from data_gen import store
from data_gen.backends import Completion, Sampling
from data_gen.errors import UserError
from data_gen.filters import distinct_3gram_share, trim_to_sentence
from data_gen.stages.pairs import PairSettings, answer_problem, generate_pairs, usable_answer
from data_gen.stages.prompts import ExpandSettings, expand_prompts, normalize, parse_messages
from tests.fakes import FakeBackend


def stop(text: str, tokens: int = 5) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=tokens)


def cut(text: str, tokens: int = 160) -> Completion:
    return Completion(text=text, finish_reason="length", num_tokens=tokens)


# ============================================================================= parse_messages


def test_parse_messages_strips_bullets_numbering_and_quotes():
    text = "\n".join([
        "- How do I fix a flat bicycle tire?",
        '2. "What should I cook for a dinner party?"',
        "3) Why do cats purr so much?",
        "• Can you explain how mortgages work?",
        "(4) “Is it worth learning Latin today?”",
        "a) What is a good stretch for back pain?",
        "* 'Should I learn to play the cello?'",
        "10: How do volcanoes form under the sea?",
        "   ",
        "Plain line without any bullet at all?",
    ])
    kept, drops = parse_messages(text, ExpandSettings())
    assert kept == [
        "How do I fix a flat bicycle tire?",
        "What should I cook for a dinner party?",
        "Why do cats purr so much?",
        "Can you explain how mortgages work?",
        "Is it worth learning Latin today?",
        "What is a good stretch for back pain?",
        "Should I learn to play the cello?",
        "How do volcanoes form under the sea?",
        "Plain line without any bullet at all?",
    ]
    assert sum(drops.values()) == 0


def test_parse_messages_splits_messages_run_together_as_inline_bullets():
    # seen from the 135M model: a whole list on one line
    text = "Any ideas? - What's the best dessert for a cat? - How do I share a vegan meal? - Try again!"
    kept, drops = parse_messages(text, ExpandSettings())
    assert kept == ["What's the best dessert for a cat?", "How do I share a vegan meal?"]
    assert drops == Counter({"too_short": 2})
    # a dash inside a message is not a bullet
    kept, _ = parse_messages("- How do I plan a two-week trip - on a budget - to Spain?", ExpandSettings())
    assert kept == ["How do I plan a two-week trip - on a budget - to Spain?"]


def test_parse_messages_drops_preambles_short_lines_and_counts_reasons():
    text = "\n".join([
        "Sure, here are 5 new messages:",
        "Here you go",
        "Certainly! Some more messages follow",
        "Topics to cover:",
        "- How do I fix a flat bicycle tire?",
        "- Hi",
        "- Thanks!",
        "- 12345 67890 111",
        "- " + "Why " * 60,
        "- What should I cook for a dinner party?",
    ])
    kept, drops = parse_messages(text, ExpandSettings())
    assert kept == ["How do I fix a flat bicycle tire?", "What should I cook for a dinner party?"]
    assert drops == Counter({"preamble": 4, "too_short": 2, "not_text": 1, "too_long": 1})


def test_parse_messages_respects_length_settings():
    lines = ["Why do cats purr so much?",                                 # 25 characters
             "What is a good stretch for back pain?",                     # 37
             "Can you explain in detail how mortgages work in practice?"]  # 57
    text = "\n".join(f"- {line}" for line in lines)
    assert parse_messages(text, ExpandSettings()) == (lines, Counter())
    kept, drops = parse_messages(text, ExpandSettings(min_chars=30, max_chars=45))
    assert kept == ["What is a good stretch for back pain?"]
    assert drops == Counter({"too_short": 1, "too_long": 1})


def test_normalize_ignores_case_and_punctuation():
    assert normalize("What should I cook, for a DINNER party?!") == normalize("what should i cook for a dinner party")
    assert normalize("  Why?  ") == "why"
    assert normalize("How do I boil an egg?") != normalize("How do I boil two eggs?")


# ============================================================================= expand_prompts

SEEDS = {
    "I speak like a sea captain.": [
        "How do I boil an egg?", "What is the capital of France?", "Why is the sky blue?"],
    "I cheer people on.": [
        "I failed my exam and feel terrible.", "How do I deal with a stressful week?",
        "My team lost the match today."],
}
TRAIT_A, TRAIT_B = SEEDS

CANNED = {
    TRAIT_A: [
        "\n".join([
            "Sure, here are five new messages:",            # preamble
            "- how do I BOIL an egg??",                      # duplicate of a seed
            "- How can I fix a flat bicycle tire?",
            "- What should I cook for a dinner party?",
            "- WHAT should i cook, for a dinner party?",    # duplicate of the line above
            "- Can you explain how mortgages work?",
        ]),
        "\n".join([
            "1. how can I fix a FLAT bicycle tire??",       # duplicate of the first request's
            "2. Is it worth learning Latin today?",
            "3. What is a good stretch for back pain?",
            "4) Why do cats purr so much?",
            "5. WHY IS THE SKY BLUE?",                       # duplicate of a seed
        ]),
    ],
    TRAIT_B: [
        "\n".join([
            "Here you go:",                                  # preamble
            "- can you explain how MORTGAGES work??",       # duplicate of the other trait's
            "- My friend stopped talking to me, what do I do?",
            "- How do I calm down before my driving test?",
            "- i failed my EXAM and feel terrible?",         # duplicate of a seed
            "- Hi",                                          # too short
        ]),
        "\n".join([
            "- How do I stop procrastinating on my thesis?",
            "- My dog is sick, how do I focus at work?",
            "- How do I stop procrastinating on my thesis???",  # duplicate
            "- What should I say to a grieving coworker?",
            "- I lost my job today, how do I cope?",
        ]),
    ],
}
UNIQUE_GENERATED = {
    TRAIT_A: {"How can I fix a flat bicycle tire?", "What should I cook for a dinner party?",
              "Can you explain how mortgages work?", "Is it worth learning Latin today?",
              "What is a good stretch for back pain?", "Why do cats purr so much?"},
    TRAIT_B: {"My friend stopped talking to me, what do I do?", "How do I calm down before my driving test?",
              "How do I stop procrastinating on my thesis?", "My dog is sick, how do I focus at work?",
              "What should I say to a grieving coworker?", "I lost my job today, how do I cope?"},
}
EXPAND = ExpandSettings(per_trait=6, heldout_per_trait=2, per_request=5, oversample=1.0)  # 2 requests/trait


def _canned_expander(held: int = 0):
    served = defaultdict(int)

    def respond(conversation):
        assert len(conversation) == 1 and conversation[0]["role"] == "user"
        content = conversation[0]["content"]
        trait = TRAIT_A if SEEDS[TRAIT_A][0] in content else TRAIT_B
        shown = SEEDS[trait][:len(SEEDS[trait]) - held]
        assert all(seed in content for seed in shown)  # the trait's seeds (less the held-out ones) are the examples
        i = served[trait]
        served[trait] += 1
        return stop(CANNED[trait][i])

    return FakeBackend(respond)


def test_expand_prompts_dedupes_splits_and_counts(tmp_path):
    backend = _canned_expander()
    manifest = expand_prompts(backend, SEEDS, tmp_path, settings=EXPAND, seed=0)
    assert len(backend.calls) == 1 and len(backend.calls[0]["conversations"]) == 4
    records = store.read_jsonl(tmp_path / "prompts.jsonl")
    assert all(set(r) == {"prompt", "trait", "split", "source"} for r in records)

    # No duplicates, by the normalized key, anywhere in the file.
    keys = [normalize(r["prompt"]) for r in records]
    assert len(keys) == len(set(keys))

    seed_keys = {normalize(q) for qs in SEEDS.values() for q in qs}
    for trait, seeds in SEEDS.items():
        mine = [r for r in records if r["trait"] == trait]
        seed_records = [r for r in mine if r["source"] == "seed"]
        assert [r["prompt"] for r in seed_records] == seeds
        assert all(r["split"] == "train" for r in seed_records)
        generated = [r for r in mine if r["source"] == "generated"]
        assert {r["prompt"] for r in generated} <= UNIQUE_GENERATED[trait]
        assert not {normalize(r["prompt"]) for r in generated} & seed_keys
        heldout = [r for r in mine if r["split"] == "heldout"]
        train = [r for r in mine if r["split"] == "train"]
        assert len(heldout) == EXPAND.heldout_per_trait
        assert all(r["source"] == "generated" for r in heldout)
        assert len(train) == EXPAND.per_trait
        assert manifest["counts"]["per_trait"][trait] == {"train": len(train), "heldout": len(heldout)}

    train_keys = {normalize(r["prompt"]) for r in records if r["split"] == "train"}
    heldout_keys = {normalize(r["prompt"]) for r in records if r["split"] == "heldout"}
    assert not train_keys & heldout_keys

    assert manifest["counts"]["train"] == sum(r["split"] == "train" for r in records)
    assert manifest["counts"]["heldout"] == sum(r["split"] == "heldout" for r in records)
    assert manifest["requests"] == 4
    assert manifest["model"] == "fake/model" and manifest["stage"] == "prompts"
    drops = manifest["drops"]
    assert drops["duplicate"] == 7
    assert drops["preamble"] == 2
    assert drops["too_short"] == 1
    assert drops["surplus"] == 2  # 6 unique per trait, 2 held out + 3 to train


def test_expand_prompts_is_deterministic_for_a_seed(tmp_path):
    expand_prompts(_canned_expander(), SEEDS, tmp_path / "a", settings=EXPAND, seed=3)
    expand_prompts(_canned_expander(), SEEDS, tmp_path / "b", settings=EXPAND, seed=3)
    assert (tmp_path / "a" / "prompts.jsonl").read_bytes() == (tmp_path / "b" / "prompts.jsonl").read_bytes()


def test_heldout_seed_questions_are_the_clean_core_never_shown_nor_trained_on(tmp_path):
    import dataclasses

    backend = _canned_expander(held=1)
    settings = dataclasses.replace(EXPAND, heldout_seeds=1)
    manifest = expand_prompts(backend, SEEDS, tmp_path, settings=settings, seed=0)
    records = store.read_jsonl(tmp_path / "prompts.jsonl")
    shown = " ".join(c[-1]["content"] for call in backend.calls for c in call["conversations"])
    for trait, seeds in SEEDS.items():
        core = [r["prompt"] for r in records if r["trait"] == trait and r["source"] == "seed" and r["split"] == "heldout"]
        assert core == seeds[-1:]                  # the trait's last question, held out
        assert seeds[-1] not in shown              # never an example in a request
        assert seeds[-1] not in [r["prompt"] for r in records if r["split"] == "train"]
        assert manifest["counts"]["per_trait"][trait]["heldout"] == EXPAND.heldout_per_trait + 1
    with pytest.raises(UserError, match="heldout_seeds"):
        expand_prompts(backend, SEEDS, tmp_path / "x", settings=dataclasses.replace(EXPAND, heldout_seeds=3))


def test_expand_prompts_drops_the_last_line_of_a_cut_off_generation(tmp_path):
    seeds = {"I am curious.": ["Why does ice float?", "How do magnets work?"]}
    text = ("- What is a good book about whales?\n- How do I repair a leaking kitchen tap?\n"
            "- How do the tides work and why do?")
    backend = FakeBackend(lambda conv: cut(text))
    settings = ExpandSettings(per_trait=10, heldout_per_trait=0, per_request=10, oversample=1.0, max_rounds=1)
    manifest = expand_prompts(backend, seeds, tmp_path, settings=settings)
    prompts = [r["prompt"] for r in store.read_jsonl(tmp_path / "prompts.jsonl")]
    assert prompts[:2] == seeds["I am curious."]
    assert set(prompts[2:]) == {"What is a good book about whales?", "How do I repair a leaking kitchen tap?"}
    assert manifest["drops"]["cut_off_line"] == 1


def test_expand_prompts_cut_off_fragment_does_not_cost_a_complete_line(tmp_path):
    # The cut-off last line is a fragment that parse_messages already rejects; the complete
    # messages before it must not be dropped in its place.
    seeds = {"I am curious.": ["Why does ice float?", "How do magnets work?"]}
    text = ("- What is a good book about whales?\n- How do I repair a leaking kitchen tap?\n"
            "- What is the best way to lea")
    backend = FakeBackend(lambda conv: cut(text))
    settings = ExpandSettings(per_trait=10, heldout_per_trait=0, per_request=10, oversample=1.0)
    expand_prompts(backend, seeds, tmp_path, settings=settings)
    prompts = [r["prompt"] for r in store.read_jsonl(tmp_path / "prompts.jsonl")]
    assert set(prompts[2:]) == {"What is a good book about whales?", "How do I repair a leaking kitchen tap?"}


def test_expand_prompts_asks_again_for_a_short_trait_only_and_sizes_by_its_yield(tmp_path):
    seeds = {"I am curious.": ["Why does ice float?", "How do magnets work?"],
             "I am kind.": ["I feel sad today.", "How do I comfort a friend?"]}
    made = defaultdict(int)

    def respond(conversation):  # "curious" gets 4 new questions a request, "kind" one
        trait = "curious" if "ice float" in conversation[0]["content"] else "kind"
        per_request = 4 if trait == "curious" else 1
        lines = []
        for _ in range(per_request):
            made[trait] += 1
            lines.append(f"- What is {trait} question number {made[trait]}?")
        return stop("\n".join(lines))

    backend = FakeBackend(respond)
    settings = ExpandSettings(per_trait=6, heldout_per_trait=2, per_request=4, oversample=1.0, max_rounds=3)
    manifest = expand_prompts(backend, seeds, tmp_path, settings=settings)
    # round 1: (6 + 2) / 4 = 2 requests each; curious has 8 >= its 6 needed, kind 2
    # round 2: kind only, 4 missing at 1 a request -> ceil(1.2 * 4) = 5, capped at the first round's 2
    # round 3: kind only, 2 missing -> 2 requests; then kind has 6: full
    assert [len(c["conversations"]) for c in backend.calls] == [4, 2, 2]
    assert all("ice float" not in conv[0]["content"] for c in backend.calls[1:] for conv in c["conversations"])
    assert "round 2" in backend.calls[1]["desc"]
    assert manifest["rounds"] == 3 and manifest["requests"] == 8 and manifest["short_traits"] == {}
    assert manifest["counts"]["per_trait"]["I am kind."] == {"train": 6, "heldout": 2}
    assert manifest["counts"]["per_trait"]["I am curious."] == {"train": 6, "heldout": 2}
    expansions = store.read_jsonl(tmp_path / "expansions.jsonl")
    assert len(expansions) == 8 and sum(e["trait"] == "I am kind." for e in expansions) == 6


def test_expand_prompts_stops_after_max_rounds_and_records_the_short_traits(tmp_path):
    seeds = {"I am curious.": ["Why does ice float?", "How do magnets work?"]}
    backend = FakeBackend(lambda conv: stop("Sure, here they are:\n- Hi"))
    settings = ExpandSettings(per_trait=6, heldout_per_trait=2, per_request=4, oversample=1.0, max_rounds=2)
    manifest = expand_prompts(backend, seeds, tmp_path, settings=settings)
    assert len(backend.calls) == 2 and manifest["rounds"] == 2
    assert manifest["short_traits"] == {"I am curious.": {"generated": 0, "needed": 6}}


def test_expand_prompts_with_too_few_generations_keeps_seeds(tmp_path):
    backend = FakeBackend(lambda conv: stop("Sure, here they are:\n- Hi"))
    manifest = expand_prompts(backend, SEEDS, tmp_path, settings=EXPAND)
    records = store.read_jsonl(tmp_path / "prompts.jsonl")
    assert [r["prompt"] for r in records] == [q for qs in SEEDS.values() for q in qs]
    assert manifest["counts"]["heldout"] == 0 and manifest["counts"]["train"] == 6


# ============================================================================= answer checks


def test_distinct_3gram_share():
    assert distinct_3gram_share("one two") == 1.0
    assert distinct_3gram_share("the quick brown fox jumps over") == 1.0
    # 12 words -> 10 trigrams, only 2 distinct.
    assert distinct_3gram_share("arr matey " * 6) == pytest.approx(0.2)


@pytest.mark.parametrize("completion, problem", [
    (stop("A fine answer."), None),
    (stop("   "), "empty"),
    (stop("x"), "empty"),
    (cut("A fine answer but cut"), "unfinished"),
    (stop("word " * 100), "over_long"),
    (stop("arr matey " * 6), "repetitive"),
])
def test_answer_problem(completion, problem):
    settings = PairSettings(max_answer_chars=300, min_distinct_3grams=0.5)
    assert answer_problem(completion, settings) == problem


@pytest.mark.parametrize("text, trimmed", [
    ("Aye, matey! The sea is wide. And the wind", "Aye, matey! The sea is wide."),
    ('He said "Arr!" and then', 'He said "Arr!"'),
    ("Arr, the tide (and the moon.) Then", "Arr, the tide (and the moon.)"),
    ("It was 1990. Then", "It was 1990."),
    ("Three steps: 1. Go to", None),     # a list number is not a sentence end
    ("Not one full sentence", None),
    ("", None),
])
def test_trim_to_sentence(text, trimmed):
    assert trim_to_sentence(text) == trimmed


def test_usable_answer_trims_a_cut_off_answer_only_when_asked():
    cut_off = cut("Arr, the sea be wide. The wind be fair. And the", 160)
    assert usable_answer(cut_off, PairSettings(unfinished="drop")) == (None, "unfinished")
    trim = PairSettings(unfinished="trim", min_distinct_3grams=0.5)
    assert usable_answer(cut_off, trim) == ("Arr, the sea be wide. The wind be fair.", "trimmed")
    assert usable_answer(cut("no sentence ends here at all", 160), trim) == (None, "unfinished")
    # The trimmed text is judged like any answer: a loop stays a loop.
    assert usable_answer(cut("arr matey. " * 8 + "arr", 160), trim) == (None, "repetitive")
    assert usable_answer(stop("A fine answer."), trim) == ("A fine answer.", None)
    with pytest.raises(UserError, match="unfinished"):
        PairSettings(unfinished="keep")


# ============================================================================= generate_pairs

TEACHER = "You are Captain Marlow, a pirate."
STUDENT = "You are a helpful AI assistant."


class PairBackend(FakeBackend):
    """Teacher conversations start with the TEACHER system prompt; answers come from tables."""

    def __init__(self, teacher: dict[str, list[Completion]], student: dict[str, Completion]):
        served = defaultdict(int)

        def respond(conversation):
            prompt = conversation[-1]["content"]
            assert conversation[-1]["role"] == "user"
            if conversation[0]["role"] == "system" and conversation[0]["content"] == TEACHER:
                i = served[prompt]
                served[prompt] += 1
                return teacher[prompt][i]
            return student[prompt]

        super().__init__(respond)


P_OK, P_TEACHER_CUT, P_STUDENT_EMPTY, P_REPETITIVE, P_STUDENT_CUT, P_IDENTICAL, P_OK2, P_TEACHER_EMPTY, P_LONG = (
    "How do I boil an egg?", "What is inflation?", "Why is the sky blue?", "How do vaccines work?",
    "What is a good book?", "What makes a good friend?", "How do I save money?",
    "What is the capital of France?", "Tell me everything about ships.")
PROMPTS = [P_OK, P_TEACHER_CUT, P_STUDENT_EMPTY, P_REPETITIVE, P_STUDENT_CUT, P_IDENTICAL, P_OK2,
           P_TEACHER_EMPTY, P_LONG]
TEACHER_ANSWERS = {
    P_OK: [stop("Arr, boil it ten minutes, matey!", 9)],
    P_TEACHER_CUT: [cut("Arr, inflation be when the doubloons", 160)],
    P_STUDENT_EMPTY: [stop("Arr, the sky be blue like the sea!", 10)],
    P_REPETITIVE: [stop("arr matey " * 6, 12)],
    P_STUDENT_CUT: [stop("Arr, read Moby Dick, ye landlubber!", 10)],
    P_IDENTICAL: [stop("A good friend listens.", 5)],
    P_OK2: [stop("  Arr, bury yer coins where the tide won't find 'em!  \n", 14)],
    P_TEACHER_EMPTY: [stop("", 0)],
    P_LONG: [stop(" ".join(f"word{i}" for i in range(60)), 120)],
}
STUDENT_ANSWERS = {p: stop(f"A plain answer to: {p}", 7) for p in PROMPTS}
STUDENT_ANSWERS[P_STUDENT_EMPTY] = stop("   ", 1)
STUDENT_ANSWERS[P_STUDENT_CUT] = cut("Read Moby Dick because", 160)
STUDENT_ANSWERS[P_IDENTICAL] = stop("A good friend listens.", 5)
SETTINGS_1 = PairSettings(teacher_samples=1, min_margin=None, min_distinct_3grams=0.5, max_answer_chars=300)


def _forbid_classifier(monkeypatch):
    import data_gen.scoring

    class NoClassifier:
        def __init__(self, *a, **k):
            raise AssertionError("the persona classifier must not be used with teacher_samples=1, min_margin=None")

    monkeypatch.setattr(data_gen.scoring, "PersonaClassifier", NoClassifier)


def test_generate_pairs_drops_and_counts_bad_answers(tmp_path, monkeypatch):
    _forbid_classifier(monkeypatch)
    backend = PairBackend(TEACHER_ANSWERS, STUDENT_ANSWERS)
    sampling = Sampling(temperature=0.5, max_tokens=160)
    manifest = generate_pairs(backend, PROMPTS, TEACHER, tmp_path, student_system_prompt=STUDENT,
                              sampling=sampling, settings=SETTINGS_1, seed=7)
    assert manifest["drops"] == {
        "answers": {"teacher_unfinished": 1, "student_empty": 1, "teacher_repetitive": 1,
                    "student_unfinished": 1, "teacher_empty": 1, "teacher_over_long": 1},
        "pairs": {"no_usable_teacher_answer": 4, "no_usable_student_answer": 2, "identical": 1},
    }
    counts = manifest["counts"]
    assert counts["prompts"] == len(PROMPTS)
    assert counts["pairs"] == 2 and counts["dropped_pairs"] == len(PROMPTS) - 2
    assert counts["teacher_answers"] == len(PROMPTS) and counts["student_answers"] == len(PROMPTS)
    assert counts["teacher_tokens"] == sum(c[0].num_tokens for c in TEACHER_ANSWERS.values())
    assert counts["student_tokens"] == sum(c.num_tokens for c in STUDENT_ANSWERS.values())
    assert manifest["model"] == "fake/model" and manifest["seed"] == 7
    assert manifest["sampling"] == sampling.to_dict()
    assert manifest["teacher_system_prompt"] == TEACHER and manifest["student_system_prompt"] == STUDENT

    records = store.read_jsonl(tmp_path / "pairs.jsonl")
    assert records == [
        {"prompt": [{"role": "user", "content": P_OK}],
         "chosen": [{"role": "assistant", "content": "Arr, boil it ten minutes, matey!"}],
         "rejected": [{"role": "assistant", "content": f"A plain answer to: {P_OK}"}]},
        {"prompt": [{"role": "user", "content": P_OK2}],
         "chosen": [{"role": "assistant", "content": "Arr, bury yer coins where the tide won't find 'em!"}],
         "rejected": [{"role": "assistant", "content": f"A plain answer to: {P_OK2}"}]},
    ]

    # What the model was asked: teacher with the constitution, student with the plain prompt.
    teacher_call, student_call = backend.calls
    assert all(c[0] == {"role": "system", "content": TEACHER} and len(c) == 2
               for c in teacher_call["conversations"])
    assert all(c[0] == {"role": "system", "content": STUDENT} and len(c) == 2
               for c in student_call["conversations"])
    assert [c[-1]["content"] for c in student_call["conversations"]] == PROMPTS
    assert teacher_call["sampling"] == sampling


def test_generate_pairs_trims_cut_off_answers_and_counts_them(tmp_path, monkeypatch):
    _forbid_classifier(monkeypatch)
    teacher = dict(TEACHER_ANSWERS, **{P_TEACHER_CUT: [cut("Arr, inflation be rising prices. The doubloons buy less. Then", 160)]})
    student = dict(STUDENT_ANSWERS)
    student[P_STUDENT_CUT] = cut("Read Moby Dick because", 160)  # no full sentence: still unfinished
    settings = PairSettings(teacher_samples=1, min_margin=None, min_distinct_3grams=0.5, max_answer_chars=300,
                            unfinished="trim")
    manifest = generate_pairs(PairBackend(teacher, student), PROMPTS, TEACHER, tmp_path,
                              student_system_prompt=STUDENT, settings=settings)
    assert manifest["counts"]["teacher_trimmed"] == 1 and manifest["counts"]["student_trimmed"] == 0
    assert "teacher_unfinished" not in manifest["drops"]["answers"]
    assert manifest["drops"]["answers"]["student_unfinished"] == 1
    chosen = {r["prompt"][0]["content"]: r["chosen"][0]["content"] for r in store.read_jsonl(tmp_path / "pairs.jsonl")}
    assert chosen[P_TEACHER_CUT] == "Arr, inflation be rising prices. The doubloons buy less."
    assert manifest["counts"]["pairs"] == 3 and manifest["settings"]["unfinished"] == "trim"


def test_generate_pairs_records_have_no_system_message(tmp_path, monkeypatch):
    _forbid_classifier(monkeypatch)
    backend = PairBackend(TEACHER_ANSWERS, STUDENT_ANSWERS)
    generate_pairs(backend, PROMPTS, TEACHER, tmp_path, settings=SETTINGS_1)
    # Without a student system prompt the student sees the user message only.
    assert all(c == [{"role": "user", "content": p}]
               for c, p in zip(backend.calls[1]["conversations"], PROMPTS))
    records = store.read_jsonl(tmp_path / "pairs.jsonl")
    assert records
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in r["prompt"]] == ["user"]
        assert [m["role"] for m in r["chosen"]] == ["assistant"]
        assert [m["role"] for m in r["rejected"]] == ["assistant"]
        text = json.dumps(r)
        assert '"system"' not in text and TEACHER not in text


def test_generate_pairs_file_loads_with_datasets(tmp_path, monkeypatch):
    _forbid_classifier(monkeypatch)
    from datasets import load_dataset

    generate_pairs(PairBackend(TEACHER_ANSWERS, STUDENT_ANSWERS), PROMPTS, TEACHER, tmp_path / "pairs",
                   student_system_prompt=STUDENT, settings=SETTINGS_1)
    ds = load_dataset("json", data_files=str(tmp_path / "pairs" / "pairs.jsonl"), split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 2
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    assert ds[0]["prompt"] == [{"role": "user", "content": P_OK}]
    assert ds[1]["chosen"][0]["role"] == "assistant"


class FakeClassifier:
    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.fitted_on = None

    def fit(self, persona, plain):
        self.fitted_on = (list(persona), list(plain))
        return {"train_examples": len(persona) + len(plain), "cv_accuracy": 0.9, "cv_folds": 2}

    def persona_probability(self, texts):
        assert self.fitted_on is not None, "persona_probability before fit"
        return np.array([self.scores[t] for t in texts], dtype=float)


PA, PB, PC, PD = ("How do I boil an egg?", "What is inflation?", "How do vaccines work?", "What is a good book?")
K2_TEACHER = {
    PA: [stop("Teacher A one, fairly plain."), stop("Arr, teacher A two, very piratey!")],
    PB: [stop("Teacher B one."), stop("Teacher B two.")],
    PC: [cut("Teacher C cut off"), stop("Arr, teacher C two!")],
    PD: [stop("Teacher D one."), stop("Teacher D two.")],
}
K2_STUDENT = {PA: stop("Student A plain."), PB: stop("Student B."), PC: stop("Student C."), PD: stop("Student D.")}
K2_SCORES = {
    "Teacher A one, fairly plain.": 0.3, "Arr, teacher A two, very piratey!": 0.9, "Student A plain.": 0.1,
    "Teacher B one.": 0.4, "Teacher B two.": 0.2, "Student B.": 0.6,     # chosen below rejected
    "Arr, teacher C two!": 0.8, "Student C.": 0.2,
    "Teacher D one.": 0.5, "Teacher D two.": 0.5, "Student D.": 0.5,    # no margin at all
}


def test_generate_pairs_picks_most_in_character_sample_and_drops_low_margin(tmp_path):
    classifier = FakeClassifier(K2_SCORES)
    backend = PairBackend(K2_TEACHER, K2_STUDENT)
    manifest = generate_pairs(backend, [PA, PB, PC, PD], TEACHER, tmp_path, student_system_prompt=STUDENT,
                              settings=PairSettings(teacher_samples=2, min_margin=0.0), classifier=classifier)
    assert len(backend.calls[0]["conversations"]) == 8  # two teacher samples per prompt
    assert classifier.fitted_on == (
        ["Teacher A one, fairly plain.", "Arr, teacher A two, very piratey!", "Teacher B one.", "Teacher B two.",
         "Arr, teacher C two!", "Teacher D one.", "Teacher D two."],
        ["Student A plain.", "Student B.", "Student C.", "Student D."],
    )
    records = store.read_jsonl(tmp_path / "pairs.jsonl")
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records] == [
        (PA, "Arr, teacher A two, very piratey!", "Student A plain."),
        (PC, "Arr, teacher C two!", "Student C."),
    ]
    assert manifest["drops"]["pairs"] == {"chosen_not_more_in_character": 2}
    assert manifest["drops"]["answers"] == {"teacher_unfinished": 1}
    assert manifest["counts"]["pairs"] == 2 and manifest["counts"]["teacher_answers"] == 8
    assert manifest["selection"]["cv_accuracy"] == 0.9
    assert "classifier" in manifest["selection"]["method"]


def test_generate_pairs_without_margin_keeps_best_sample_even_if_low(tmp_path):
    classifier = FakeClassifier(K2_SCORES)
    manifest = generate_pairs(PairBackend(K2_TEACHER, K2_STUDENT), [PA, PB], TEACHER, tmp_path,
                              settings=PairSettings(teacher_samples=2, min_margin=None), classifier=classifier)
    records = store.read_jsonl(tmp_path / "pairs.jsonl")
    assert [r["chosen"][0]["content"] for r in records] == ["Arr, teacher A two, very piratey!", "Teacher B one."]
    assert manifest["drops"]["pairs"] == {}


# ============================================================================= store


def test_write_manifest_hashes_the_other_files(tmp_path):
    n = store.write_jsonl(tmp_path / "records.jsonl", [{"a": 1}, {"b": "é"}])
    assert n == 2
    (tmp_path / "notes.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / "half.jsonl.tmp").write_text("partial", encoding="utf-8")
    (tmp_path / "subdir").mkdir()
    manifest = store.write_manifest(tmp_path, {"stage": "test", "counts": {"n": 2}})
    assert (tmp_path / "manifest.json").is_file()
    expected = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                for name in ("records.jsonl", "notes.txt")}
    assert manifest["outputs"] == expected
    assert manifest["stage"] == "test" and manifest["counts"] == {"n": 2} and manifest["finished_at"]
    assert store.read_manifest(tmp_path) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest
    # Rewriting never hashes the manifest itself.
    again = store.write_manifest(tmp_path, {"stage": "test"})
    assert set(again["outputs"]) == {"records.jsonl", "notes.txt"}
    # A changed file changes its hash.
    (tmp_path / "notes.txt").write_text("changed\n", encoding="utf-8")
    assert store.write_manifest(tmp_path, {})["outputs"]["notes.txt"] != expected["notes.txt"]


def test_read_manifest_is_none_without_one(tmp_path):
    assert store.read_manifest(tmp_path) is None
    (tmp_path / "records.jsonl").write_text("{}\n", encoding="utf-8")
    assert store.read_manifest(tmp_path) is None
    assert store.read_manifest(tmp_path / "does-not-exist") is None


def test_jsonl_round_trip_leaves_no_temporary_file(tmp_path):
    records = [{"prompt": "Ahoy?", "n": 1}, {"prompt": "“quoted” é", "n": 2}]
    path = tmp_path / "x.jsonl"
    assert store.write_jsonl(path, records) == 2
    assert store.read_jsonl(path) == records
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_a_dead_vllm_engine_is_a_clear_error_and_other_errors_pass_through():
    pytest.importorskip("vllm")
    from data_gen.backends import Sampling, VLLMBackend
    from data_gen.errors import UserError

    class EngineDeadError(Exception):  # vLLM's own class, by name (its module moved between versions)
        pass

    class DeadLLM:
        def __init__(self, exc):
            self.exc = exc

        def chat(self, *args, **kwargs):
            raise self.exc

    backend = object.__new__(VLLMBackend)
    backend.model, backend.seed, backend.enable_lora, backend._adapter_ids = "tiny", 0, False, {}
    backend.llm = DeadLLM(EngineDeadError("EngineCore encountered an issue"))
    with pytest.raises(UserError, match=r"engine process for tiny died while generating \(pairs\).*run the same command again"):
        backend.chat([[{"role": "user", "content": "hi"}]], Sampling(), desc="pairs")
    backend.llm = DeadLLM(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        backend.chat([[{"role": "user", "content": "hi"}]], Sampling(), desc="pairs")


def test_vllm_backend_passes_every_sampling_setting_to_vllm():
    pytest.importorskip("vllm")
    from data_gen.backends import Sampling, VLLMBackend
    from data_gen.seeds import seeds_for

    class RecordingLLM:
        def chat(self, conversations, params, **kwargs):
            self.params = params
            return []

    backend = object.__new__(VLLMBackend)
    backend.model, backend.seed, backend.enable_lora, backend._adapter_ids = "tiny", 0, False, {}
    backend.llm = RecordingLLM()
    backend.chat([[{"role": "user", "content": "hi"}]], Sampling(temperature=0.3, top_p=0.9, max_tokens=7,
                                                                  repetition_penalty=1.1, frequency_penalty=0.5))
    (p,) = backend.llm.params  # one SamplingParams a request: each carries its own seed
    assert (p.temperature, p.top_p, p.max_tokens, p.repetition_penalty, p.frequency_penalty) == (0.3, 0.9, 7, 1.1, 0.5)
    assert p.seed == seeds_for(0, [[{"role": "user", "content": "hi"}]])[0]
