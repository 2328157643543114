"""Constitutions: shipped files, validation errors, `constitution new/import`, hashing, prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from character_training.cli import main
from character_training.config.constitution import (
    Constitution,
    ConstitutionError,
    constitution_from_dict,
    load_constitution,
)
from character_training.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "constitutions").glob("*.yaml"))


def _one_error_line(capsys) -> str:
    """The captured stderr must be exactly one line, without a traceback; return it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- shipped files


def test_there_are_shipped_constitutions():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_constitution_loads(path):
    c = load_constitution(path)
    assert isinstance(c, Constitution)
    assert c.name == path.stem  # shipped files are named after their constitution
    assert c.description
    assert c.traits
    for t in c.traits:
        assert t.trait and t.questions
        assert all(isinstance(q, str) and q.strip() == q and q for q in t.questions)
    assert c.path == str(path)


def test_cli_validate_accepts_every_shipped_constitution(capsys):
    capsys.readouterr()
    assert main(["constitution", "validate", *map(str, SHIPPED)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    ok_lines = [line for line in out.splitlines() if line.startswith("ok: ")]
    assert len(ok_lines) == len(SHIPPED)
    for path in SHIPPED:
        assert any(str(path) in line for line in ok_lines)


# ----------------------------------------------------------------------------- malformed files

GOOD = {
    "name": "tester",
    "description": "You are a test character.",
    "traits": [
        {"trait": "I test things.", "questions": ["How do I test this code?", "What is a unit test?"]},
        {"trait": "I am thorough.", "clarification": "Never sloppy.", "questions": ["Is this enough?"]},
    ],
}


def _with(**changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def _trait_changed(index, **changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DELETE:
            data["traits"][index].pop(key)
        else:
            data["traits"][index][key] = value
    return yaml.safe_dump(data, sort_keys=False)


_DELETE = object()

MALFORMED = [
    # id, file text, field path that the error must name
    ("no_traits_key", _with(traits=_DELETE), "traits"),
    ("empty_traits_list", _with(traits=[]), "traits"),
    ("traits_is_a_string", _with(traits="I am nice"), "traits"),
    ("no_description", _with(description=_DELETE), "description"),
    ("no_name", _with(name=_DELETE), "name"),
    ("name_is_a_number", _with(name=42), "name"),
    ("name_not_a_slug", _with(name="Captain Marlow"), "name"),
    ("empty_description", _with(description="   "), "description"),
    ("trait_without_questions", _trait_changed(0, questions=_DELETE), "traits[0].questions"),
    ("trait_with_empty_questions", _trait_changed(1, questions=[]), "traits[1].questions"),
    ("questions_is_a_string", _trait_changed(0, questions="How do I test?"), "traits[0].questions"),
    ("question_is_a_number", _trait_changed(0, questions=["How do I test?", 7]), "traits[0].questions[1]"),
    ("trait_missing_statement", _trait_changed(1, trait=_DELETE), "traits[1].trait"),
    ("trait_is_a_number", _trait_changed(0, trait=3), "traits[0].trait"),
    ("clarification_is_a_list", _trait_changed(1, clarification=["a"]), "traits[1].clarification"),
    ("trait_not_a_mapping", _with(traits=["I test things."]), "traits[0]"),
    ("unknown_top_level_key", _with(tratis="x"), "tratis"),
    ("unknown_trait_key", _trait_changed(1, question=["Is this enough?"]), "traits[1].question"),
    ("principles_is_a_string", _with(principles="Be good."), "principles"),
    ("empty_file", "", "<top level>"),
    ("top_level_list", "- a\n- b\n", "<top level>"),
    ("duplicate_trait", _trait_changed(1, trait="I test things."), "traits[1].trait"),
]


@pytest.mark.parametrize("text, field", [(t, f) for _, t, f in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_cli_validate_rejects_malformed_constitution(tmp_path, capsys, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line
    assert f"{field}:" in line, line
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("text, field", [(t, f) for _, t, f in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_load_constitution_raises_user_error(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert f"{field}:" in message


def test_cli_validate_rejects_bad_yaml_syntax_with_line_number(tmp_path, capsys):
    path = tmp_path / "syntax.yaml"
    path.write_text("name: tester\ndescription: [unclosed\ntraits:\n  - trait: x\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert f"{path}:" in line
    assert "not valid YAML" in line
    # The location (file:line:column) is given.
    rest = line.split(f"{path}:", 1)[1]
    line_no, col = rest.split(":", 2)[:2]
    assert line_no.isdigit() and col.isdigit()


def test_cli_validate_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    capsys.readouterr()
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "not found" in line


def test_cli_validate_mixed_good_and_bad(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_with(traits=[]), encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "validate", str(SHIPPED[0]), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and str(bad) in err
    assert out.startswith(f"ok: {SHIPPED[0]}")


def test_unknown_key_suggests_the_close_match(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(_trait_changed(0, questoins=["x y z"]), encoding="utf-8")
    with pytest.raises(ConstitutionError, match=r"traits\[0\]\.questoins: unknown key \(did you mean 'questions'\?\)"):
        load_constitution(path)


# ----------------------------------------------------------------------------- constitution new


def _fill_template(text: str) -> str:
    """The template with every placeholder replaced, as a user would fill it in."""
    filled = {
        "You are ... (who the character is, how they speak, what they care about).": "You are Ada, a patient tutor.",
        "I ... (a first-person statement of the trait)": "I explain things step by step.",
        "Optional. What the trait does and does not mean.": "Patient, never condescending.",
        "A user message that draws this trait out.": "How do tides work?",
        "Another one, on a different topic.": "Why is the sky blue?",
        "A third, in a different tone.": "ugh, fractions. help?",
        "Choose the response that ...": "Choose the response that teaches rather than tells.",
        "  - ...": "  - Ada has taught for twenty years.",
    }
    for old, new in filled.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_new_writes_a_template_that_is_refused_until_filled_in(tmp_path, capsys):
    out = tmp_path / "sub" / "my-char.yaml"
    assert main(["constitution", "new", "my-char", "-o", str(out)]) == 0
    assert out.is_file()
    # The template has the right shape (every field a constitution needs)...
    shape = constitution_from_dict(yaml.safe_load(out.read_text(encoding="utf-8")), where=str(out))
    assert shape.name == "my-char" and shape.traits and all(t.questions for t in shape.traits)
    # ...but untouched it is refused (issue 17): a run would train on its placeholder text.
    capsys.readouterr()
    assert main(["constitution", "validate", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "placeholder" in line
    out.write_text(_fill_template(out.read_text(encoding="utf-8")), encoding="utf-8")
    assert main(["constitution", "validate", str(out)]) == 0
    c = load_constitution(out)
    assert c.name == "my-char"
    assert c.traits and all(t.questions for t in c.traits)


def test_new_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "existing.yaml"
    out.write_text("keep me\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "new", "my-char", "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "--force" in line
    assert out.read_text(encoding="utf-8") == "keep me\n"
    # With --force it is replaced by the template (refused until filled in, see above).
    assert main(["constitution", "new", "my-char", "-o", str(out), "--force"]) == 0
    out.write_text(_fill_template(out.read_text(encoding="utf-8")), encoding="utf-8")
    assert load_constitution(out).name == "my-char"


def test_new_rejects_a_bad_name(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    capsys.readouterr()
    assert main(["constitution", "new", "Not A Slug", "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "Not A Slug" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- constitution import

OCT = [
    {"trait": "I am endlessly curious about how things work.",
     "questions": ["Why does ice float?", "How do magnets work?"]},
    {"trait": "I answer with warmth and a little humour.",
     "clarification": "Warm, never saccharine: the answer still comes first.",
     "questions": ["I had a bad day.", "Tell me about your weekend.", "What's a good joke?"]},
]


def test_import_writes_yaml_that_validates_and_round_trips(tmp_path, capsys):
    src = tmp_path / "Curious Friend.json"
    src.write_text(json.dumps(OCT), encoding="utf-8")
    out = tmp_path / "out.yaml"
    assert main(["constitution", "import", str(src), "-o", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["constitution", "validate", str(out)]) == 0
    c = load_constitution(out)
    assert c.name == "curious-friend"  # derived from the file name
    assert len(c.traits) == len(OCT)
    for trait, original in zip(c.traits, OCT):
        assert trait.trait == original["trait"]
        assert list(trait.questions) == original["questions"]
        assert trait.clarification == original.get("clarification")
    assert c.seed_questions() == {t["trait"]: t["questions"] for t in OCT}


def test_import_round_trips_awkward_yaml_strings(tmp_path):
    data = [{"trait": "I: answer 'plainly' # not a comment",
             "clarification": "- starts with a dash",
             "questions": ["yes", "null", "123", "true", "A question\nover two lines?"]}]
    src = tmp_path / "awkward.json"
    src.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "awkward.yaml"
    assert main(["constitution", "import", str(src), "-o", str(out), "--name", "awk",
                 "--description", "An awkward test character."]) == 0
    c = load_constitution(out)
    assert c.name == "awk" and c.description == "An awkward test character."
    assert c.traits[0].trait == data[0]["trait"]
    assert c.traits[0].clarification == data[0]["clarification"]
    assert list(c.traits[0].questions) == data[0]["questions"]


@pytest.mark.parametrize("text, expect", [
    ('[{"trait": "I am x", "questions": ["a question"]', "not valid JSON"),
    ('{"trait": "I am x", "questions": ["a question"]}', "<top level>"),
    ("", "not valid JSON"),
], ids=["malformed_json", "object_not_list", "empty_json"])
def test_import_rejects_bad_json(tmp_path, capsys, text, expect):
    src = tmp_path / "bad.json"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out.yaml"
    capsys.readouterr()
    assert main(["constitution", "import", str(src), "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(src) in line and expect in line
    assert not out.exists()


def test_import_rejects_invalid_traits_naming_the_field(tmp_path, capsys):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([OCT[0], {"trait": "I am y", "questions": []}]), encoding="utf-8")
    out = tmp_path / "out.yaml"
    capsys.readouterr()
    assert main(["constitution", "import", str(src), "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(src) in line and "traits[1].questions:" in line
    assert not out.exists()


def test_import_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = tmp_path / "oct.json"
    src.write_text(json.dumps(OCT), encoding="utf-8")
    out = tmp_path / "out.yaml"
    out.write_text("keep me\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "import", str(src), "-o", str(out)]) == 2
    _one_error_line(capsys)
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert main(["constitution", "import", str(src), "-o", str(out), "--force"]) == 0
    assert load_constitution(out).traits[0].trait == OCT[0]["trait"]


# ----------------------------------------------------------------------------- sha256

LAYOUT_A = """\
# A comment that does not change the content.
name: hasher
description: |
  You are a hashing test character.
traits:
  - trait: I am consistent.
    clarification: Always.
    questions:
      - Are you consistent?
      - "Why be consistent?"
principles:
  - Choose the consistent answer.
"""

LAYOUT_B = """\
principles: ['Choose the consistent answer.']
traits: [{questions: ['Are you consistent?', 'Why be consistent?'], clarification: "Always.",
          trait: 'I am consistent.'}]   # flow style, other key order
description: "You are a hashing test character."
name: "hasher"
"""


def test_sha256_ignores_formatting_and_comments(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(LAYOUT_A, encoding="utf-8")
    b.write_text(LAYOUT_B, encoding="utf-8")
    ca, cb = load_constitution(a), load_constitution(b)
    assert ca == cb
    assert len(ca.sha256) == 64 and int(ca.sha256, 16) >= 0
    assert ca.sha256 == cb.sha256
    assert ca.sha256 == load_constitution(a).sha256  # stable across loads


@pytest.mark.parametrize("old, new", [
    ("- Are you consistent?", "- Are you really consistent?"),
    ("clarification: Always.", "clarification: Mostly."),
    ("- trait: I am consistent.", "- trait: I am very consistent."),
    ("  - Choose the consistent answer.", "  - Choose the kind answer."),
], ids=["question", "clarification", "trait", "principle"])
def test_sha256_changes_when_content_changes(tmp_path, old, new):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert old in LAYOUT_A
    a.write_text(LAYOUT_A, encoding="utf-8")
    b.write_text(LAYOUT_A.replace(old, new), encoding="utf-8")
    assert load_constitution(a).sha256 != load_constitution(b).sha256


def test_sha256_of_shipped_constitutions_differ():
    hashes = {load_constitution(p).sha256 for p in SHIPPED}
    assert len(hashes) == len(SHIPPED)


# ----------------------------------------------------------------------------- system prompt


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_system_prompt_contains_description_and_every_trait(path):
    c = load_constitution(path)
    prompt = c.system_prompt()
    assert c.description in prompt
    for t in c.traits:
        assert t.trait in prompt
        if t.clarification:
            assert t.clarification in prompt
    # Questions are seed data for generation, not part of the teacher's prompt.
    assert c.traits[0].questions[0] not in prompt


def test_system_prompt_of_small_constitution(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(LAYOUT_A, encoding="utf-8")
    prompt = load_constitution(path).system_prompt()
    assert prompt.startswith("You are a hashing test character.")
    assert "I am consistent. (Always.)" in prompt
    assert prompt == prompt.strip()


# ----------------------------------------------------------------------------- text that validates, then spoils a run


def _refused(tmp_path, capsys, text: str, *expect: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {path}") and all(e in line for e in expect), line
    return line


@pytest.mark.parametrize("second", ["i am curious.", "I am curious", "I  am   CURIOUS!", "i am curious"])
def test_traits_that_differ_only_in_case_or_punctuation_are_refused_naming_both(tmp_path, capsys, second):
    data = json.loads(json.dumps(GOOD))
    data["traits"][0]["trait"] = "I am curious."
    data["traits"].append({"trait": second, "questions": ["Why is the sky blue?"]})
    line = _refused(tmp_path, capsys, yaml.safe_dump(data), "traits[2].trait:", "traits[0].trait", "case")
    assert repr(second) in line and "'I am curious.'" in line


def test_an_exact_duplicate_trait_names_both_positions(tmp_path, capsys):
    line = _refused(tmp_path, capsys, _trait_changed(1, trait="I test things."),
                    "traits[1].trait: duplicates traits[0].trait")
    assert "case" not in line  # nothing differs, so nothing to explain


def test_traits_and_questions_in_other_scripts_are_told_apart(tmp_path):
    data = {"name": "zh", "description": "一个安静的园丁。",
            "traits": [{"trait": "我很有耐心。", "questions": ["你好吗？", "今天天气怎么样？"]},
                       {"trait": "我说话直接。", "questions": ["我该辞职吗？", "Can you help?"]}]}
    path = tmp_path / "zh.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    c = load_constitution(path)  # no letter a-z in them: they used to look like one repeated question
    assert [t.trait for t in c.traits] == ["我很有耐心。", "我说话直接。"]
    data["traits"][1]["questions"].append("你好吗?")  # the same question, other punctuation
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConstitutionError, match=r"traits\[1\]\.questions\[2\]: repeats traits\[0\]\.questions\[0\]"):
        load_constitution(path)


CONTROL_FIELDS = [
    ("description", lambda d, s: d.update(description=f"You are a test{s} character.")),
    ("traits[1].trait", lambda d, s: d["traits"][1].update(trait=f"I am{s} thorough.")),
    ("traits[1].clarification", lambda d, s: d["traits"][1].update(clarification=f"Never{s}")),
    ("traits[1].questions[0]", lambda d, s: d["traits"][1].update(questions=[f"Is{s} this enough?"])),
    ("principles[0]", lambda d, s: d.update(principles=[f"Be{s}good."])),
    ("facts[1]", lambda d, s: d.update(facts=["A fact.", f"Another{s}"])),
    ("markers[0]", lambda d, s: d.update(markers=[f"arr{s}"])),
]


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x1c"])
@pytest.mark.parametrize("field,put", CONTROL_FIELDS, ids=[f for f, _ in CONTROL_FIELDS])
def test_a_control_character_is_refused_naming_the_field_and_the_character(tmp_path, capsys, field, put, char):
    data = json.loads(json.dumps(GOOD))
    put(data, char)
    line = _refused(tmp_path, capsys, yaml.safe_dump(data), f"{field}: contains the control character",
                    repr(char)[1:-1])
    assert char not in line


def test_the_escapes_that_write_control_characters_are_refused(tmp_path, capsys):
    text = _with(description="DESC").replace("description: DESC", 'description: "A calm \\e[31m gardener."')
    _refused(tmp_path, capsys, text, "description: contains the control character \\x1b (character 8)")


def test_tab_newline_and_carriage_return_are_text(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(_with(description="Calm.\tPlain.\r\nKind.\n"), encoding="utf-8")
    assert "\t" in load_constitution(path).description


def test_an_imported_control_character_is_refused(tmp_path, capsys):
    src = tmp_path / "t.json"
    src.write_text(json.dumps([{"trait": "I am \u0000 x", "questions": ["Why?"]}]), encoding="utf-8")
    assert main(["constitution", "import", str(src), "-o", str(tmp_path / "o.yaml")]) == 2
    line = _one_error_line(capsys)
    assert "traits[0].trait: contains the control character \\x00" in line and not (tmp_path / "o.yaml").exists()


def test_a_byte_order_mark_is_accepted_in_yaml_and_json_alike(tmp_path, capsys):
    bom = b"\xef\xbb\xbf"
    plain, marked = tmp_path / "plain.yaml", tmp_path / "marked.yaml"
    plain.write_text(LAYOUT_A, encoding="utf-8")
    marked.write_bytes(bom + LAYOUT_A.encode())
    assert load_constitution(marked) == load_constitution(plain)
    src = tmp_path / "oct.json"
    src.write_bytes(bom + json.dumps(OCT).encode())
    out = tmp_path / "out.yaml"
    assert main(["constitution", "import", str(src), "-o", str(out)]) == 0
    assert [t.trait for t in load_constitution(out).traits] == [t["trait"] for t in OCT]
    assert capsys.readouterr().err == ""


def test_a_long_value_is_quoted_short(tmp_path, capsys):
    line = _refused(tmp_path, capsys, _with(name="Wren the Gardener " * 5000), "name: 'Wren the Gardener", "not a slug")
    assert len(line) < 300
    line = _refused(tmp_path, capsys, _with(**{"k" * 100_000: 1}), "unknown key")
    assert len(line) < 400
