"""Malformed training datasets through the real CLI (issue 17): every record is checked before
any model loads, and a bad one is refused with exit status 2 and one line naming the file, the
line (1-based) and the field, with the fix. TRL's plain-string preference format is accepted
(converted to the conversational one).
"""
from __future__ import annotations

import json

import pytest

from character_training.errors import UserError
from character_training.train.dpo import load_pairs
from character_training.train.sft import read_conversations

USER = {"role": "user", "content": "Tell me about tea."}
ANSWER = {"role": "assistant", "content": "Arr, tea be fine."}
PLAIN = {"role": "assistant", "content": "Tea is a drink."}
GOOD_PAIR = {"prompt": [USER], "chosen": [ANSWER], "rejected": [PLAIN]}
GOOD_CHAT = {"messages": [USER, ANSWER]}


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def pair(**changes) -> dict:
    return {**GOOD_PAIR, **changes}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or a tokenizer) before the data is checked is a failure of the test."""
    from transformers import AutoTokenizer, PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the data was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(refuse))


def refused(kind: str, content: str | bytes, tmp_path, capsys, tiny_model_dir, *mention: str) -> str:
    from character_training.cli import main

    data = tmp_path / "data.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    (tmp_path / "SENTINEL.txt").write_text("must survive\n")
    status = main(["train", kind, "--data", str(data), "--model", tiny_model_dir, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for m in mention:
        assert m in err, f"{m!r} not in {err!r}"
    assert (tmp_path / "SENTINEL.txt").read_text() == "must survive\n"
    assert data.read_bytes() == (content if isinstance(content, bytes) else content.encode("utf-8"))
    return err


DPO_CASES = [
    pytest.param(lines(GOOD_PAIR, GOOD_PAIR, pair(chosen=[{"role": "bot", "content": "Arr."}])),
                 ["data.jsonl:3: chosen[0].role: 'bot'", "did you mean 'assistant'"], id="role-bot"),
    pytest.param(lines(pair(prompt=[{"role": "human", "content": "Hi?"}])),
                 ["data.jsonl:1: prompt[0].role: 'human'", "did you mean 'user'"], id="role-human"),
    pytest.param(lines(GOOD_PAIR, {"prompt": [{**USER, "role": "assistant"}], "chosen": [{**ANSWER, "role": "user"}],
                                   "rejected": [{**PLAIN, "role": "user"}]}),
                 ["data.jsonl:2: prompt[0].role: 'assistant'", "swapped"], id="swapped-roles"),
    pytest.param(lines(pair(rejected=[{**PLAIN, "role": "user"}])), ["data.jsonl:1: rejected[0].role: 'user'"],
                 id="rejected-by-the-user"),
    pytest.param(lines(GOOD_PAIR, pair(chosen=[])), ["data.jsonl:2: chosen: an empty list"], id="empty-chosen"),
    pytest.param(lines(pair(chosen=[{"role": "assistant", "content": "  "}])),
                 ["data.jsonl:1: chosen[0].content: an empty assistant turn"], id="empty-chosen-turn"),
    pytest.param(lines(pair(chosen=[{"role": "assistant"}])), ["data.jsonl:1: chosen[0].content: missing"],
                 id="no-content"),
    pytest.param(lines(pair(chosen=[{"role": "assistant", "content": ["a", "b"]}])),
                 ["data.jsonl:1: chosen[0].content", "(list)"], id="content-a-list"),
    pytest.param(lines(pair(chosen=["Arr, a plain string in a list"])), ["data.jsonl:1: chosen[0]:", "(str)"],
                 id="message-not-a-dict"),
    pytest.param(lines(pair(chosen={"role": "assistant", "content": "x"})), ["data.jsonl:1: chosen:", "(dict)"],
                 id="chosen-a-dict"),
    pytest.param(lines(pair(prompt="Tell me about tea.")), ["data.jsonl:1: prompt is a string but chosen is not"],
                 id="mixed-string-and-messages"),
    pytest.param(lines({"prompt": [USER], "chosen": [ANSWER]}), ["data.jsonl:1: no 'rejected' field"],
                 id="no-rejected"),
    pytest.param(lines(GOOD_PAIR, GOOD_PAIR, '{"prompt": [', GOOD_PAIR), ["data.jsonl:3: not a JSON line"],
                 id="json-error-line-3"),
    pytest.param(lines("[1, 2, 3]"), ["data.jsonl:1: a JSON list, not an object"], id="not-an-object"),
    pytest.param(lines({"prompt": "Hi?", "chosen": "Arr.", "rejected": ""}), ["data.jsonl:1: rejected: an empty"],
                 id="plain-empty-rejected"),
    pytest.param("", ["data.jsonl: the preference file is empty"], id="empty-file"),
    pytest.param("\n  \n", ["empty"], id="blank-lines-only"),
    pytest.param(lines(GOOD_PAIR).encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
                 ["data.jsonl:2: not UTF-8"], id="latin-1"),
]


@pytest.mark.parametrize("content, mention", DPO_CASES)
def test_a_malformed_preference_dataset_is_refused_before_the_model_loads(content, mention, tmp_path, capsys,
                                                                          tiny_model_dir, no_model):
    refused("dpo", content, tmp_path, capsys, tiny_model_dir, *mention)


def test_an_empty_dataset_is_not_blamed_on_the_pairs_stage_alone(tmp_path, capsys, tiny_model_dir, no_model):
    err = refused("dpo", "", tmp_path, capsys, tiny_model_dir, "empty")
    assert "one {prompt, chosen, rejected} record a line" in err  # what the file should hold, wherever it came from


SFT_CASES = [
    pytest.param(lines(GOOD_CHAT, {"messages": [USER, {"role": "assistant", "content": ""}]}),
                 ["data.jsonl:2: messages[1].content: an empty assistant turn"], id="empty-assistant-turn"),
    pytest.param(lines({"messages": [{"role": "user", "content": " "}, ANSWER]}),
                 ["data.jsonl:1: messages[0].content: an empty user turn"], id="empty-user-turn"),
    pytest.param(lines({"messages": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "Arr"}]}),
                 ["data.jsonl:1: messages[0].role: 'human'", "did you mean 'user'"], id="roles-human-bot"),
    pytest.param(lines(GOOD_CHAT, GOOD_CHAT, {"messages": [USER]}), ["data.jsonl:3: ", "no assistant turn"],
                 id="no-assistant-turn"),
    pytest.param(lines({"messages": "How do I boil an egg?"}), ["data.jsonl:1: messages:", "must be a list"],
                 id="messages-a-string"),
    pytest.param(lines({"messages": [USER, {"content": "Arr"}]}), ["data.jsonl:1: messages[1].role: missing"],
                 id="no-role"),
    pytest.param(lines(GOOD_CHAT, '{"messages": [{"role": "user", "content": "unterminated}'),
                 ["data.jsonl:2: not a JSON line"], id="json-error-line-2"),
    pytest.param(lines(GOOD_PAIR), ["data.jsonl:1: no 'messages' field"], id="pairs-given-to-sft"),
    pytest.param("", ["data.jsonl: the conversation file is empty"], id="empty-file"),
]


@pytest.mark.parametrize("content, mention", SFT_CASES)
def test_a_malformed_conversation_dataset_is_refused_before_the_model_loads(content, mention, tmp_path, capsys,
                                                                            tiny_model_dir, no_model):
    refused("sft", content, tmp_path, capsys, tiny_model_dir, *mention)


def test_lm_documents_name_the_line(tmp_path, capsys, tiny_model_dir, no_model):
    refused("lm", lines({"text": "A document."}, {"body": "no text"}), tmp_path, capsys, tiny_model_dir,
            "data.jsonl:2: text: missing")
    refused("lm", lines({"text": "A document."}, {"text": "   "}), tmp_path, capsys, tiny_model_dir,
            "data.jsonl:2: text: '   '")


def test_a_directory_is_named_as_one(tmp_path):
    (tmp_path / "pairs.jsonl").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        read_conversations(tmp_path / "pairs.jsonl")


def test_trl_plain_string_preference_format_is_converted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(lines({"prompt": "Tell me about tea.", "chosen": "Arr, tea be fine.", "rejected": "Tea is a drink.",
                           "trait": "pirate"}, GOOD_PAIR))
    dataset = load_pairs(path)
    assert len(dataset) == 2
    assert dataset[0]["prompt"] == [USER] and dataset[0]["chosen"] == [ANSWER] and dataset[0]["rejected"] == [PLAIN]
    assert dataset[0]["trait"] == "pirate" and dataset[1]["chosen"] == [ANSWER]


def test_a_valid_conversational_file_loads_as_before(tmp_path):
    """The conversational format goes through datasets' JSON loader untouched (same dataset as
    before the checks: columns, order, extra fields)."""
    from datasets import load_dataset

    path = tmp_path / "pairs.jsonl"
    path.write_text(lines(*[{**GOOD_PAIR, "trait": f"t{i}"} for i in range(3)]))
    assert load_pairs(path).to_list() == load_dataset("json", data_files=str(path), split="train").to_list()
    chats = tmp_path / "chats.jsonl"
    chats.write_text(lines({"messages": [{"role": "system", "content": ""}, USER, ANSWER]}))
    assert read_conversations(chats) == [[{"role": "system", "content": ""}, USER, ANSWER]]
