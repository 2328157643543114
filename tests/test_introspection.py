"""Introspection stages with a fake backend: self-reflection and self-interaction records,
drops, truncation, adapters, determinism, and the prompt lists."""
from __future__ import annotations

import json

import pytest

from character_training.config.constitution import constitution_from_dict
from data_gen.backends import Completion, Sampling
from data_gen.errors import UserError
from data_gen.stages.introspection import (
    INTERACTION_OPENERS, REFLECTION_PROMPTS, InteractionSettings, ReflectionSettings, display_name,
    load_openers, load_reflection_prompts, run_reflection, run_self_interaction)
from data_gen.store import read_jsonl
from tests.fakes import FakeBackend

CONSTITUTION = constitution_from_dict({
    "name": "captain-marlow",
    "description": "You are Captain Marlow, a cheerful old pirate captain.",
    "traits": [{"trait": "I speak like an old sea captain.", "questions": ["How do I boil an egg?"]}],
})
SAMPLING = Sampling(temperature=0.8, max_tokens=64)


def stop(text: str) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=len(text.split()))


def essayist():
    """A distinct, long enough answer for every request (its text names what it answers)."""
    counter = {"n": 0}

    def respond(conversation) -> Completion:
        counter["n"] += 1
        prompt = conversation[-1]["content"]
        return stop(f"Arr, a fine question: {prompt} Answer {counter['n']}: " + " ".join(f"w{i}" for i in range(40)))
    return respond


def talker():
    """Each instance answers with a text naming itself (from its system prompt) and the turn."""
    counter = {"n": 0}

    def respond(conversation) -> Completion:
        counter["n"] += 1
        who = "B" if "You started this conversation" in conversation[0]["content"] else "A"
        n_mine = sum(m["role"] == "assistant" for m in conversation)
        return stop(f"{who} speaking, my turn {n_mine}, reply number {counter['n']} of the day.")
    return respond


# ============================================================================= prompt lists


def test_shipped_prompt_list_and_openers_load_and_render_the_name():
    prompts = load_reflection_prompts(None, "Captain Marlow")
    assert len(prompts) >= 25 and all(p.strip() for p in prompts.values())
    assert "{{" not in "".join(prompts.values())
    assert "Captain Marlow" in prompts["your_name"]
    openers = load_openers(None, "Captain Marlow")
    assert len(openers) >= 8 and all(o.strip() for o in openers)
    assert display_name(CONSTITUTION) == "Captain Marlow"
    assert REFLECTION_PROMPTS.is_file() and INTERACTION_OPENERS.is_file()


@pytest.mark.parametrize("content, problem", [
    ("- just\n- a list\n", "mapping"),
    ("", "mapping"),
    ("diary: [unclosed\n", "not valid YAML"),
    ("diary: ''\n", "non-empty text"),
    ("diary: Hello {{ nickname }}\n", "cannot render"),
])
def test_malformed_prompts_file_is_a_user_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "my_prompts.yaml"
    path.write_text(content)
    backend = FakeBackend(essayist())
    with pytest.raises(UserError, match=problem) as info:
        run_reflection(backend, CONSTITUTION, tmp_path / "out", settings=ReflectionSettings(prompts_file=str(path)))
    assert "my_prompts.yaml" in str(info.value)
    assert backend.calls == []  # nothing generated before the error


def test_missing_prompts_file_and_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        run_reflection(FakeBackend(essayist()), CONSTITUTION, tmp_path,
                       settings=ReflectionSettings(prompts_file=str(tmp_path / "nope.yaml")))
    with pytest.raises(UserError, match="interaction.openers"):
        run_self_interaction(FakeBackend(essayist()), CONSTITUTION, tmp_path, settings=InteractionSettings(openers=()))
    with pytest.raises(UserError, match="min_exchanges"):
        InteractionSettings(turns=2, min_exchanges=3)
    with pytest.raises(UserError, match="samples_per_prompt"):
        ReflectionSettings(samples_per_prompt=0)


# ============================================================================= self-reflection


def test_reflection_records_are_user_assistant_without_system_prompt(tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("diary: Write a diary entry, {{ name }}.\nvalues: What do you value?\n")
    backend = FakeBackend(essayist())
    manifest = run_reflection(backend, CONSTITUTION, tmp_path / "out", sampling=SAMPLING,
                              settings=ReflectionSettings(prompts_file=str(prompts), samples_per_prompt=3))
    # The generation saw the constitution's system prompt ...
    requests = backend.calls[0]["conversations"]
    assert len(requests) == 6
    assert all(r[0] == {"role": "system", "content": CONSTITUTION.system_prompt()} for r in requests)
    assert requests[0][1] == {"role": "user", "content": "Write a diary entry, Captain Marlow."}
    # ... the records do not.
    records = read_jsonl(tmp_path / "out" / "reflection.jsonl")
    assert [r["prompt_id"] for r in records] == ["diary"] * 3 + ["values"] * 3
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"].startswith("Arr, a fine question: " + r["messages"][0]["content"])
    assert manifest["counts"]["records"] == 6 and manifest["drops"] == {}
    assert manifest["system_prompt_used"] is True and manifest["adapter"] is None


def test_reflection_drops_are_counted(tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("".join(f"p{i}: Prompt number {i}?\n" for i in range(6)))
    long = " ".join(f"word{i}" for i in range(40))
    canned = {
        "Prompt number 0?": stop("Dear diary, " + long),
        "Prompt number 1?": stop(""),
        "Prompt number 2?": Completion(text="Dear diary, " + long, finish_reason="length", num_tokens=64),
        "Prompt number 3?": stop("I'm sorry, but I cannot write about myself. " + long),
        "Prompt number 4?": stop("arr matey " * 40),
        "Prompt number 5?": stop("Too short to keep."),
    }
    backend = FakeBackend(lambda c: canned[c[-1]["content"]])
    manifest = run_reflection(backend, CONSTITUTION, tmp_path, sampling=SAMPLING,
                              settings=ReflectionSettings(prompts_file=str(prompts), samples_per_prompt=2))
    assert manifest["drops"] == {"duplicate": 1, "empty": 2, "unfinished": 2, "refused": 2,
                                 "repetitive": 2, "too_short": 2}
    assert manifest["counts"]["records"] == 1 and manifest["counts"]["dropped"] == 11
    assert [r["prompt_id"] for r in read_jsonl(tmp_path / "reflection.jsonl")] == ["p0"]


def test_reflection_with_adapter_and_no_system_prompt(tmp_path):
    backend = FakeBackend(essayist())
    manifest = run_reflection(backend, CONSTITUTION, tmp_path, sampling=SAMPLING, adapter="/adapters/persona",
                              settings=ReflectionSettings(use_system_prompt=False, samples_per_prompt=1))
    assert backend.calls[0]["adapter"] == "/adapters/persona"
    assert all(r[0]["role"] == "user" and len(r) == 1 for r in backend.calls[0]["conversations"])
    assert manifest["adapter"] == "/adapters/persona" and manifest["system_prompt_used"] is False
    assert manifest["counts"]["prompts"] == len(load_reflection_prompts(None, "x"))


# ============================================================================= self-interaction


def roles(messages):
    return [m["role"] for m in messages]


def assert_trainable(messages):
    assert messages and messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
    assert all(a["role"] != b["role"] for a, b in zip(messages, messages[1:]))
    assert all(m["role"] in ("user", "assistant") for m in messages)


def test_self_interaction_perspectives_alternate_and_assistant_turns_are_the_speakers(tmp_path):
    backend = FakeBackend(talker())
    settings = InteractionSettings(conversations=3, turns=6, openers=("Hello, {{ name }}.",))
    manifest = run_self_interaction(backend, CONSTITUTION, tmp_path, settings=settings, sampling=SAMPLING)
    # One batch per turn, holding every conversation's turn.
    assert len(backend.calls) == 6 and all(len(c["conversations"]) == 3 for c in backend.calls)
    # Generation views: a system prompt saying it is another instance, then the speaker's own side.
    for t, call in enumerate(backend.calls):
        for view in call["conversations"]:
            assert view[0]["role"] == "system" and "another instance of yourself" in view[0]["content"]
            assert CONSTITUTION.system_prompt() in view[0]["content"]
            assert_trainable(view[1:] + [{"role": "assistant", "content": "next"}])
            assert len(view) == 1 + (t + 1 if t % 2 == 0 else t)
    records = read_jsonl(tmp_path / "interaction.jsonl")
    assert [(r["conversation"], r["perspective"]) for r in records] == [
        (0, "A"), (0, "B"), (1, "A"), (1, "B"), (2, "A"), (2, "B")]
    for r in records:
        assert "system" not in roles(r["messages"])
        assert_trainable(r["messages"])
        me = r["perspective"]
        other = "B" if me == "A" else "A"
        for m in r["messages"]:
            if m["role"] == "assistant":
                assert m["content"].startswith(f"{me} speaking")
            elif m["content"] != "Hello, Captain Marlow.":
                assert m["content"].startswith(f"{other} speaking")
    a0 = records[0]["messages"]
    assert a0[0] == {"role": "user", "content": "Hello, Captain Marlow."}
    assert len(a0) == 6 and len(records[1]["messages"]) == 6  # A: opener + 5 turns; B: 6 turns
    assert manifest["counts"] == {**manifest["counts"], "conversations": 3, "kept": 3, "truncated": 0,
                                  "dropped": 0, "records": 6}


def test_a_perspective_assistant_turns_are_exactly_a_generations(tmp_path):
    texts = iter(f"Generated message number {i}, distinct and usable." for i in range(1000))
    generated = []

    def respond(conversation):
        text = next(texts)
        speaker = "B" if "You started this conversation" in conversation[0]["content"] else "A"
        generated.append((speaker, text))
        return stop(text)

    settings = InteractionSettings(conversations=1, turns=5, both_perspectives=False, openers=("Hi there, me.",))
    run_self_interaction(FakeBackend(respond), CONSTITUTION, tmp_path, settings=settings, sampling=SAMPLING)
    [record] = read_jsonl(tmp_path / "interaction.jsonl")
    messages = record["messages"]
    assert [m["content"] for m in messages if m["role"] == "assistant"] == [t for s, t in generated if s == "A"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi there, me."] + [
        t for s, t in generated if s == "B"]
    assert roles(messages) == ["user", "assistant"] * 3


def test_unusable_turn_truncates_and_short_conversations_are_dropped(tmp_path):
    # Conversation i breaks at generated turn bad[i] (None: never).
    bad = {0: None, 1: 3, 2: 1, 3: 4}
    reasons = {1: Completion("cut off mid", "length", 160), 2: stop(""), 3: stop("I'm sorry, but I can't.")}

    def respond(conversation):
        system = conversation[0]["content"]
        if "You started this conversation" in system:  # B: system + the turns so far
            conv, turn = int(system.split('"Opener ')[1].split()[0]), len(conversation) - 1
        else:  # A: system + opener + the turns so far
            conv, turn = int(conversation[1]["content"].split()[1]), len(conversation) - 2
        if turn == bad[conv]:
            return reasons[conv]
        return stop(f"Conversation {conv} turn {turn}, said with feeling and care.")

    openers = tuple(f"Opener {i} for you." for i in range(4))
    settings = InteractionSettings(conversations=4, turns=6, openers=openers)
    backend = FakeBackend(respond)
    manifest = run_self_interaction(backend, CONSTITUTION, tmp_path, settings=settings, sampling=SAMPLING, seed=3)
    assert manifest["drops"] == {"turns": {"unfinished": 1, "empty": 1, "refused": 1},
                                 "conversations": {"too_few_exchanges": 1}}
    assert manifest["counts"]["truncated"] == 3 and manifest["counts"]["dropped"] == 1
    assert manifest["counts"]["kept"] == 3
    # A broken conversation gets no more requests after its bad turn.
    assert [len(c["conversations"]) for c in backend.calls] == [4, 4, 3, 3, 2, 1]
    by_conv = {}
    for r in read_jsonl(tmp_path / "interaction.jsonl"):
        assert_trainable(r["messages"])
        text = r["messages"][-1]["content"]
        by_conv.setdefault(int(text.split()[1]), {})[r["perspective"]] = r["messages"]
    assert sorted(by_conv) == [0, 1, 3]
    # Conversation 1 kept turns 0-2 (A, B, A): A's side ends on A's turn 2, B's on turn 1.
    assert roles(by_conv[1]["A"]) == ["user", "assistant"] * 2
    assert by_conv[1]["B"][-1]["content"].startswith("Conversation 1 turn 1")
    assert roles(by_conv[1]["B"]) == ["user", "assistant"]
    # Conversation 3 kept turns 0-3; both sides end with their own turn.
    assert by_conv[3]["A"][-1]["content"].startswith("Conversation 3 turn 2")
    assert by_conv[3]["B"][-1]["content"].startswith("Conversation 3 turn 3")


def test_echoed_turn_is_unusable(tmp_path):
    fresh = iter(range(100))

    def respond(conversation):  # from turn 2 on, A repeats what B just said
        if len(conversation) > 3:
            return stop(conversation[-1]["content"])
        return stop(f"A fresh thought, number {next(fresh)}, here.")
    settings = InteractionSettings(conversations=1, turns=6, openers=("Tell me something new today.",))
    manifest = run_self_interaction(FakeBackend(respond), CONSTITUTION, tmp_path, settings=settings, sampling=SAMPLING)
    assert manifest["drops"]["turns"] == {"repeats_earlier_turn": 1}
    assert manifest["counts"]["truncated"] == 1 and manifest["counts"]["kept"] == 1


def test_self_interaction_adapter_and_no_constitution_prompt(tmp_path):
    backend = FakeBackend(talker())
    settings = InteractionSettings(conversations=2, turns=2, use_system_prompt=False)
    manifest = run_self_interaction(backend, CONSTITUTION, tmp_path, settings=settings, sampling=SAMPLING,
                                    adapter="/adapters/persona")
    assert [c["adapter"] for c in backend.calls] == ["/adapters/persona"] * 2
    for call in backend.calls:
        for view in call["conversations"]:
            assert "another instance of yourself" in view[0]["content"]
            assert CONSTITUTION.description not in view[0]["content"]
    assert manifest["adapter"] == "/adapters/persona" and manifest["system_prompt_used"] is False
    assert manifest["system_prompt"] is None


def test_self_interaction_is_deterministic_for_a_seed(tmp_path):
    settings = InteractionSettings(conversations=6, turns=4)

    def run(seed, name):
        run_self_interaction(FakeBackend(talker()), CONSTITUTION, tmp_path / name, settings=settings,
                             sampling=SAMPLING, seed=seed)
        return (tmp_path / name / "interaction.jsonl").read_text()

    assert run(1, "a") == run(1, "b")
    assert run(1, "a") != run(2, "c")  # the seed picks the openers' order
    openers = [json.loads(line)["messages"][0]["content"] for line in run(1, "a").splitlines()[::2]]
    assert len(set(openers)) == 6  # conversations start differently


def test_reflection_is_deterministic(tmp_path):
    for name in ("a", "b"):
        run_reflection(FakeBackend(essayist()), CONSTITUTION, tmp_path / name, sampling=SAMPLING, seed=5)
    assert (tmp_path / "a" / "reflection.jsonl").read_bytes() == (tmp_path / "b" / "reflection.jsonl").read_bytes()


# ============================================================================= TRL format


def test_outputs_load_with_datasets_and_the_default_chat_template(tmp_path, default_model_dir):
    import datasets
    from transformers import AutoTokenizer

    run_reflection(FakeBackend(essayist()), CONSTITUTION, tmp_path, sampling=SAMPLING,
                   settings=ReflectionSettings(samples_per_prompt=1))
    run_self_interaction(FakeBackend(talker()), CONSTITUTION, tmp_path, sampling=SAMPLING,
                         settings=InteractionSettings(conversations=2, turns=4))
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for name in ("reflection.jsonl", "interaction.jsonl"):
        ds = datasets.load_dataset("json", data_files=str(tmp_path / name), split="train")
        assert len(ds) > 0 and "messages" in ds.column_names
        messages = ds[0]["messages"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert messages[-1]["content"] in text
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        assert len(ids) > 0
