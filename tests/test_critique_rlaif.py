"""The critique and RLAIF stages with fake backends: request shapes, cleaning, drops, the
judge's probabilities and position-bias cancelling, and the TRL formats of their outputs."""
from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from character_training.config.constitution import constitution_from_dict
from data_gen.backends import Completion
from data_gen.errors import UserError
from data_gen.judging import choice_verdict, letter_from_logprobs, letter_from_text
from data_gen.stages.critique import CritiqueSettings, clean_critique, clean_revision, run_critique
from data_gen.stages.rlaif import RlaifSettings, run_rlaif
from data_gen.store import read_jsonl
from tests.fakes import FakeBackend

PRINCIPLES = ["Choose the response that sounds most like an old sea captain.",
              "Choose the response that gives correct, useful information.",
              "Choose the response that is kind and encouraging."]
PROMPTS = ["How do I boil an egg?", "What is inflation?", "Why is the sky blue?", "What makes a good friend?"]


def constitution(principles=PRINCIPLES):
    return constitution_from_dict({
        "name": "captain-test",
        "description": "You are Captain Test, an old sea captain who talks like a pirate.",
        "traits": [{"trait": "I speak like an old sea captain.", "questions": ["How do I boil an egg?"]}],
        "principles": list(principles),
    })


def stop(text: str, **kwargs) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=5, **kwargs)


def cut(text: str) -> Completion:
    return Completion(text=text, finish_reason="length", num_tokens=200)


def load_dataset(path):
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")


# ============================================================================= critique


def step_of(conversation) -> str:
    """Which step a critique-stage request is, from its shape."""
    if conversation[-1]["role"] == "user" and "rewrite your last response" in conversation[-1]["content"]:
        return "revision"
    if conversation[-1]["role"] == "user" and "Critique your last response" in conversation[-1]["content"]:
        return "critique"
    return "answer"


def critique_responder(revise=lambda prompt, n: f"Sure, here is the revised response:\n\nArr, {prompt} (v{n})"):
    def respond(conversation):
        prompt = next(m["content"] for m in conversation if m["role"] == "user")
        kind = step_of(conversation)
        if kind == "answer":
            return stop(f"A plain answer to {prompt}")
        if kind == "critique":
            return stop("Critique: the response does not sound like a sea captain.")
        version = int(re.search(r"\(v(\d+)\)", conversation[-4]["content"]).group(1)) + 1 \
            if "(v" in conversation[-4]["content"] else 1
        return stop(revise(prompt, version))
    return respond


def test_critique_without_principles_is_a_user_error_before_any_generation(tmp_path):
    backend = FakeBackend(critique_responder())
    with pytest.raises(UserError, match=r"captain-test.*principles:"):
        run_critique(backend, constitution(principles=[]), PROMPTS, tmp_path)
    with pytest.raises(UserError, match="principles:"):
        run_rlaif(backend, constitution(principles=[]), PROMPTS, tmp_path)
    assert backend.calls == []
    assert not (tmp_path / "sft.jsonl").exists()


def test_critique_bad_options_are_user_errors_before_generation(tmp_path):
    backend = FakeBackend(critique_responder())
    with pytest.raises(UserError, match="answer_system_prompt"):
        run_critique(backend, constitution(), PROMPTS, tmp_path, settings=CritiqueSettings(answer_system_prompt="x"))
    with pytest.raises(UserError, match="rounds"):
        run_critique(backend, constitution(), PROMPTS, tmp_path, settings=CritiqueSettings(rounds=0))
    assert backend.calls == []


@pytest.mark.parametrize("raw, clean", [
    ("Sure, here is the revised response:\n\nArr, boil it.", "Arr, boil it."),
    ("Revision: Arr, boil it.", "Arr, boil it."),
    ("**Revised response:**\nArr, boil it.", "Arr, boil it."),
    ("Here's my revised response, in the voice of a sea captain:\nArr, boil it.", "Arr, boil it."),
    ("Sure, I can revise my response.\n\nArr, boil it.", "Arr, boil it."),
    ("Critique: too plain.\n\nRevision: Arr, boil it.", "Arr, boil it."),
    ('Here is the rewritten response that follows the principle better:\n"Arr, boil it."', "Arr, boil it."),
    ("Arr, boil it.\n\nI hope this helps!", "Arr, boil it."),
    # Content stays: an answer about exams may have a "Revision:" line; a list may open with a colon.
    ("Study tips:\nRevision: start early.", "Study tips:\nRevision: start early."),
    ("Here are three steps:\n1. Boil water.", "Here are three steps:\n1. Boil water."),
])
def test_clean_revision_strips_boilerplate_and_labels(raw, clean):
    assert clean_revision(raw) == clean


def test_clean_critique_strips_a_leading_label():
    assert clean_critique("**Critique:** Too plain.") == "Too plain."
    assert clean_critique("Here is my critique: Too plain.") == "Too plain."
    assert clean_critique("Too plain: no sea words.") == "Too plain: no sea words."


def test_critique_one_round_conversation_shapes_outputs_and_boilerplate(tmp_path):
    backend = FakeBackend(critique_responder())
    manifest = run_critique(backend, constitution(), PROMPTS, tmp_path, seed=3)

    assert [c["desc"] for c in backend.calls] == ["critique: first answers", "critique: critiques (round 1)",
                                                  "critique: revisions (round 1)"]
    answer, critique, revision = (c["conversations"] for c in backend.calls)
    assert all(len(c) == len(PROMPTS) for c in (answer, critique, revision))  # every prompt in one batch
    assert answer[0] == [{"role": "user", "content": PROMPTS[0]}]  # no system prompt by default
    assert [m["role"] for m in critique[0]] == ["user", "assistant", "user"]
    assert critique[0][1]["content"] == f"A plain answer to {PROMPTS[0]}"
    assert [m["role"] for m in revision[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert revision[0][3]["content"] == "the response does not sound like a sea captain."  # label stripped
    dialogues = read_jsonl(tmp_path / "dialogues.jsonl")
    for conversation, dialogue in zip(critique, dialogues):
        assert dialogue["rounds"][0]["principle"] in conversation[2]["content"]  # the request cites it

    sft = read_jsonl(tmp_path / "sft.jsonl")
    assert sft[0] == {"messages": [{"role": "user", "content": PROMPTS[0]},
                                   {"role": "assistant", "content": f"Arr, {PROMPTS[0]} (v1)"}]}
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert pairs[0]["chosen"][0]["content"] == f"Arr, {PROMPTS[0]} (v1)"
    assert pairs[0]["rejected"][0]["content"] == f"A plain answer to {PROMPTS[0]}"
    assert manifest["counts"]["sft"] == len(PROMPTS)
    assert manifest["counts"]["pairs"] == len(PROMPTS) and manifest["counts"]["requests"] == 3 * len(PROMPTS)
    assert sum(manifest["principle_usage"].values()) == len(PROMPTS)
    assert set(manifest["principle_usage"]) <= set(PRINCIPLES)

    sft_ds, pairs_ds = load_dataset(tmp_path / "sft.jsonl"), load_dataset(tmp_path / "pairs.jsonl")
    assert sft_ds.column_names == ["messages"] and len(sft_ds) == len(PROMPTS)
    assert sorted(pairs_ds.column_names) == ["chosen", "prompt", "rejected"]
    assert pairs_ds[0]["prompt"][0]["role"] == "user" and pairs_ds[0]["chosen"][0]["role"] == "assistant"


def test_critique_multi_round_revises_the_latest_revision(tmp_path):
    backend = FakeBackend(critique_responder())
    manifest = run_critique(backend, constitution(), PROMPTS[:2], tmp_path, settings=CritiqueSettings(rounds=3))

    assert len(backend.calls) == 1 + 2 * 3
    for k in range(3):
        critique = backend.calls[1 + 2 * k]["conversations"][0]
        expected = f"A plain answer to {PROMPTS[0]}" if k == 0 else f"Arr, {PROMPTS[0]} (v{k})"
        assert critique[1] == {"role": "assistant", "content": expected}
        assert len(critique) == 3  # each round starts again from the prompt and the latest answer
    dialogue = read_jsonl(tmp_path / "dialogues.jsonl")[0]
    assert [r["revision"] for r in dialogue["rounds"]] == [f"Arr, {PROMPTS[0]} (v{n})" for n in (1, 2, 3)]
    assert dialogue["final"] == f"Arr, {PROMPTS[0]} (v3)"
    assert read_jsonl(tmp_path / "pairs.jsonl")[0]["rejected"][0]["content"] == f"A plain answer to {PROMPTS[0]}"
    assert sum(manifest["principle_usage"].values()) == 2 * 3


def test_critique_with_the_constitution_as_system_prompt_keeps_it_out_of_the_data(tmp_path):
    c = constitution()
    backend = FakeBackend(critique_responder())
    run_critique(backend, c, PROMPTS[:1], tmp_path, settings=CritiqueSettings(answer_system_prompt="constitution"))
    for call in backend.calls:
        assert call["conversations"][0][0] == {"role": "system", "content": c.system_prompt()}
    assert all(m["role"] != "system" for r in read_jsonl(tmp_path / "sft.jsonl") for m in r["messages"])


def test_critique_chain_breaks_are_dropped_and_counted_by_step(tmp_path):
    def respond(conversation):
        prompt = conversation[0]["content"]
        kind = step_of(conversation)
        if kind == "answer":
            return cut("A plain answer that goes on") if prompt == PROMPTS[0] else stop(f"A plain answer to {prompt}")
        if kind == "critique":
            if prompt == PROMPTS[1]:
                return stop("I'm sorry, but I can't help with that.")
            return stop("Too plain.")
        if prompt == PROMPTS[2]:
            return stop("Sure, here is the revised response:")  # nothing after the boilerplate
        if prompt == PROMPTS[3] and "(v1)" in conversation[1]["content"]:
            return stop("   ")  # round 2 breaks: the whole chain goes, no fallback to round 1
        return stop(f"Arr, {prompt} (v1)")

    backend = FakeBackend(respond)
    manifest = run_critique(backend, constitution(), PROMPTS + ["Tell me a story."], tmp_path,
                            settings=CritiqueSettings(rounds=2))
    assert manifest["drops"]["chains"] == {"initial_unfinished": 1, "critique_refused": 1, "revision_empty": 2}
    assert manifest["counts"]["sft"] == 1 and manifest["counts"]["dropped_chains"] == 4
    # Broken chains get no further requests.
    assert len(backend.calls[1]["conversations"]) == 4 and len(backend.calls[2]["conversations"]) == 3
    dialogues = read_jsonl(tmp_path / "dialogues.jsonl")
    assert [d["dropped"] for d in dialogues] == ["initial_unfinished", "critique_refused", "revision_empty",
                                                 "revision_empty", None]
    assert dialogues[3]["final"] is None
    assert read_jsonl(tmp_path / "sft.jsonl")[0]["messages"][0]["content"] == "Tell me a story."


def test_critique_unchanged_revisions_make_no_pair(tmp_path):
    backend = FakeBackend(critique_responder(revise=lambda prompt, n: f"Revision: a plain answer to {prompt}!"))
    manifest = run_critique(backend, constitution(), PROMPTS, tmp_path)
    assert manifest["counts"]["sft"] == len(PROMPTS) and manifest["counts"]["pairs"] == 0
    assert manifest["drops"]["pairs"] == {"unchanged": len(PROMPTS)}


def test_critique_requests_are_deterministic_for_a_seed(tmp_path):
    many = [f"Question number {i}?" for i in range(20)]

    def requests(seed):
        backend = FakeBackend(critique_responder())
        run_critique(backend, constitution(), many, tmp_path / str(seed), seed=seed,
                     settings=CritiqueSettings(rounds=2))
        return [c["conversations"] for c in backend.calls]

    assert requests(0) == requests(0)
    assert requests(0) != requests(1)  # a different seed draws different principles


# ============================================================================= rlaif judging


def test_letter_probability_from_logprobs():
    assert letter_from_logprobs({"A": math.log(0.8), " B": math.log(0.2)}) == pytest.approx(0.8)
    # Spellings of a letter add up; other tokens are ignored.
    assert letter_from_logprobs({"A": math.log(0.3), " A": math.log(0.3), "b": math.log(0.2),
                                 "The": math.log(0.2)}) == pytest.approx(0.75)
    assert letter_from_logprobs({"B": math.log(0.01)}) == pytest.approx(0.0)
    assert letter_from_logprobs({"The": -0.1, "**": -2.0}) is None
    assert letter_from_logprobs(None) is None


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), (" B", "B"), ("(A)", "A"), ("Answer: B", "B"), ("Response A", "A"), ("**B**", "B"),
    ("The answer is A", "A"), ("B.", "B"),
    ("Both", None), ("Assistant", None), ("I think", None), ("", None), ("a", None),
])
def test_letter_from_text(text, letter):
    assert letter_from_text(text) == letter


def test_verdict_prefers_logprobs_and_falls_back_to_text():
    assert choice_verdict(stop("B", first_logprobs={"A": math.log(0.6), "B": math.log(0.4)})) == (pytest.approx(0.6), "logprobs")
    assert choice_verdict(stop("(B)", first_logprobs={"(": -0.01})) == (0.0, "text")
    assert choice_verdict(stop("Hmm", first_logprobs=None)) == (None, "unparseable")


@pytest.mark.parametrize("bad, field", [
    (dict(min_margin=1.5), "min_margin"), (dict(min_margin=-0.1), "min_margin"),
    (dict(min_answer_chars=-1), "min_answer_chars"), (dict(max_answer_chars=0), "max_answer_chars"),
    (dict(min_answer_chars=50, max_answer_chars=40), "max_answer_chars"),
    (dict(min_distinct_3grams=1.2), "min_distinct_3grams"), (dict(judge_max_tokens=0), "judge_max_tokens"),
    (dict(judge_logprobs=-1), "judge_logprobs"), (dict(candidates_system_prompt="pirate"), "candidates_system_prompt"),
])
def test_rlaif_settings_refuse_values_out_of_range_naming_the_field(bad, field):
    with pytest.raises(UserError, match=rf"^{field}: "):
        RlaifSettings(**bad)
    assert RlaifSettings(min_margin=0.0, judge_logprobs=0, candidates_system_prompt="constitution").min_margin == 0.0


JUDGE_PROMPT = re.compile(r"\[Response A\]\n(.*)\n\[End of response A\]\n\n\[Response B\]\n(.*)\n\[End of response B\]",
                          re.DOTALL)


def judge_responses(conversation) -> tuple[str, str]:
    return JUDGE_PROMPT.search(conversation[-1]["content"]).groups()


def candidates_backend():
    """Two different samples per prompt: the n-th occurrence of a conversation is sample n."""
    seen: Counter = Counter()

    def respond(conversation):
        if "[Response A]" in conversation[-1]["content"]:
            raise AssertionError("the candidate backend was asked to judge")
        prompt = conversation[-1]["content"]
        seen[prompt] += 1
        return stop(f"Ahoy! Arr, about {prompt}" if seen[prompt] % 2 else f"Plainly, about {prompt}")
    return FakeBackend(respond)


def test_rlaif_position_biased_judge_cancels_out(tmp_path):
    judge = FakeBackend(lambda c: stop("A", first_logprobs={"A": math.log(0.99), "B": math.log(0.01)}), "fake/judge")
    manifest = run_rlaif(candidates_backend(), constitution(), PROMPTS, tmp_path, judge=judge)

    assert manifest["order_agreement"] == 0.0
    assert manifest["position_bias"] == pytest.approx(0.49)
    assert manifest["counts"]["pairs"] == 0 and manifest["drops"] == {"low_margin": len(PROMPTS)}
    assert read_jsonl(tmp_path / "pairs.jsonl") == []
    assert all(j["margin"] == pytest.approx(0.0) and not j["kept"] for j in read_jsonl(tmp_path / "judgments.jsonl"))
    assert manifest["judge_model"] == "fake/judge"


def test_rlaif_consistent_judge_agrees_and_picks_the_right_candidate(tmp_path):
    def respond(conversation):
        a, b = judge_responses(conversation)
        return stop("A" if "Ahoy" in a else "B")  # no logprobs: the verdict comes from the text

    backend = candidates_backend()
    judge = FakeBackend(respond, "fake/judge")
    manifest = run_rlaif(backend, constitution(), PROMPTS, tmp_path, judge=judge, seed=1)

    assert manifest["order_agreement"] == 1.0 and manifest["position_bias"] == pytest.approx(0.0)
    assert manifest["verdict_sources"] == {"logprobs": 0, "text": 2 * len(PROMPTS), "unparseable": 0}
    assert manifest["counts"]["pairs"] == len(PROMPTS)
    # Both samples of a conversation are in the one candidates batch, next to each other.
    assert len(backend.calls) == 1 and backend.calls[0]["conversations"][0] == backend.calls[0]["conversations"][1]
    assert backend.calls[0]["conversations"][0] == [{"role": "user", "content": PROMPTS[0]}]
    # Both orders, A/B then B/A, in one judge batch with greedy one-letter sampling and logprobs.
    (call,) = judge.calls
    assert judge_responses(call["conversations"][0]) == tuple(reversed(judge_responses(call["conversations"][1])))
    assert call["sampling"].temperature == 0 and call["sampling"].max_tokens <= 4 and call["sampling"].logprobs == 20

    judgments = read_jsonl(tmp_path / "judgments.jsonl")
    for n, j in enumerate(judgments):
        for order in (2 * n, 2 * n + 1):  # each order's request cites that prompt's principle
            assert j["principle"] in PRINCIPLES and j["principle"] in call["conversations"][order][0]["content"]
        assert j["kept"] and j["margin"] == 1.0
    pairs = load_dataset(tmp_path / "pairs.jsonl")
    assert sorted(pairs.column_names) == ["chosen", "prompt", "rejected"]
    for row in pairs:
        assert row["chosen"][0]["content"].startswith("Ahoy") and row["rejected"][0]["content"].startswith("Plainly")
        assert [m["role"] for m in row["prompt"]] == ["user"]


def test_rlaif_logprob_probabilities_and_margin(tmp_path):
    def respond(conversation):
        a, _ = judge_responses(conversation)
        if "Ahoy" in a:  # order 1 (the "Ahoy" candidate is candidate 1): P(A) = .8
            return stop("A", first_logprobs={"A": math.log(0.8), " B": math.log(0.2)})
        return stop("B", first_logprobs={" A": math.log(0.3), "B": math.log(0.7)})  # order 2: P(B) = .7

    manifest = run_rlaif(candidates_backend(), constitution(), PROMPTS[:1], tmp_path, judge=FakeBackend(respond))
    (j,) = read_jsonl(tmp_path / "judgments.jsonl")
    assert [v["p_a"] for v in j["verdicts"]] == [pytest.approx(0.8), pytest.approx(0.3)]
    assert j["p_candidate_1"] == pytest.approx(0.75) and j["margin"] == pytest.approx(0.5)
    assert j["chosen"] == 1 and j["kept"]
    assert manifest["verdict_sources"]["logprobs"] == 2
    assert manifest["position_bias"] == pytest.approx((0.8 + 0.3) / 2 - 0.5)

    # The same judgment under a stricter margin is dropped and counted.
    manifest = run_rlaif(candidates_backend(), constitution(), PROMPTS[:1], tmp_path / "strict",
                         judge=FakeBackend(respond), settings=RlaifSettings(min_margin=0.6))
    assert manifest["drops"] == {"low_margin": 1} and manifest["counts"]["pairs"] == 0


def test_rlaif_unparseable_verdicts_and_bad_candidates_are_counted(tmp_path):
    samples_seen = Counter()

    def candidates(conversation):
        prompt = conversation[-1]["content"]
        samples_seen[prompt] += 1
        samples = {PROMPTS[0]: "Ahoy! Arr", PROMPTS[1]: "Same answer."}
        if prompt in samples:
            return stop(samples[prompt])
        if prompt == PROMPTS[2]:
            return cut("It goes on and on")
        return stop(f"Ahoy! {prompt} (sample {samples_seen[prompt]})")

    def respond(conversation):
        return stop("Hmm, tough")  # neither letter, no logprobs

    backend = FakeBackend(candidates)
    manifest = run_rlaif(backend, constitution(), PROMPTS, tmp_path, judge=FakeBackend(respond))
    assert manifest["drops"] == {"candidates_identical": 2, "candidate_unfinished": 1, "judge_unparseable": 1}
    assert manifest["verdict_sources"] == {"logprobs": 0, "text": 0, "unparseable": 2}
    assert manifest["order_agreement"] is None and manifest["position_bias"] is None
    assert manifest["counts"]["pairs"] == 0 and manifest["counts"]["judged"] == 1
    (j,) = read_jsonl(tmp_path / "judgments.jsonl")
    assert j["drop_reason"] == "judge_unparseable" and j["p_candidate_1"] is None


def test_rlaif_judge_defaults_to_the_backend_and_requests_are_deterministic(tmp_path):
    many = [f"Question number {i}?" for i in range(20)]

    def run(seed):
        seen: Counter = Counter()

        def respond(conversation):
            text = conversation[-1]["content"]
            if "[Response A]" in text:
                a, _ = judge_responses(conversation)
                return stop("A" if "Ahoy" in a else "B")
            seen[text] += 1
            return stop(f"Ahoy! {text}" if seen[text] % 2 else f"Plainly, {text}")

        backend = FakeBackend(respond)
        manifest = run_rlaif(backend, constitution(), many, tmp_path / str(seed), seed=seed,
                             settings=RlaifSettings(candidates_system_prompt="constitution"))
        return manifest, [c["conversations"] for c in backend.calls]

    manifest, calls = run(0)
    assert len(calls) == 2 and manifest["judge_model"] == "fake/model" and manifest["counts"]["pairs"] == 20
    assert calls[0][0][0]["role"] == "system"  # candidates answered with the constitution
    assert all(m["role"] != "system" for r in read_jsonl(tmp_path / "0" / "pairs.jsonl") for m in r["prompt"])
    assert calls == run(0)[1]
    assert calls != run(1)[1]  # another seed draws other principles


def test_critique_with_a_student_the_teacher_critiques_and_revises_its_answers(tmp_path):
    """Models by role: the student answers first, the teacher critiques and revises; the manifest
    says which model did which."""
    respond = critique_responder()
    student, teacher = FakeBackend(respond, model="org/student"), FakeBackend(respond, model="org/teacher")
    manifest = run_critique(teacher, constitution(), PROMPTS, tmp_path, seed=3, student=student)
    assert [c["desc"] for c in student.calls] == ["critique: first answers"]
    assert [c["desc"] for c in teacher.calls] == ["critique: critiques (round 1)", "critique: revisions (round 1)"]
    assert manifest["models"] == {"teacher": "org/teacher", "student": "org/student"}
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert pairs[0]["rejected"][0]["content"] == f"A plain answer to {PROMPTS[0]}"  # the student's own answer
