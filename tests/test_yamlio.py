"""config/yamlio.py: the size, alias and character bounds say which one was hit, byte-order marks
are dropped, and what an error quotes is short (issue 23)."""
from __future__ import annotations

import pytest
import yaml

from character_training.cli import main
from character_training.config import yamlio
from character_training.errors import UserError

BOMB = "".join(f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, n in zip("abcde", "bcdef"))
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + BOMB   # f: a million x's from six short lines


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ size is not aliases

def test_a_big_file_without_aliases_is_refused_for_its_size_not_its_aliases(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    facts = "".join(f"  - fact {i}: a plain sentence about the character that takes up some room\n"
                    for i in range(yamlio.MAX_BYTES // 70 + 1))
    path.write_text("name: big\ndescription: Big.\nfacts:\n" + facts, encoding="utf-8")
    assert path.stat().st_size > yamlio.MAX_BYTES
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_line(capsys)
    assert str(path) in line and f"{path.stat().st_size:,} bytes" in line and "1 MiB limit" in line
    assert "alias" not in line.split(str(path))[1]


def test_a_long_document_without_aliases_is_not_an_alias_bomb(monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_EXPANDED", 1000)  # the document's own values are far past it
    data = yamlio.load("items:\n" + "".join(f"  - item {i}\n" for i in range(500)))
    assert len(data["items"]) == 500
    # ... and so is one whose aliases add little to it (they add 3 x 20 values and characters)
    items = "".join(f"  - item {i}\n" for i in range(500))
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: [*a, *a, *a]\nitems:\n" + items
    assert yamlio.load(text)["b"] == [["x"] * 10] * 3


def test_what_the_aliases_add_is_bounded(monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_EXPANDED", 1000)
    with pytest.raises(yaml.YAMLError, match="aliases expand it") as err:
        yamlio.load("a: &a [" + ", ".join(["xxxxxxxxx"] * 10) + "]\nb: [" + ", ".join(["*a"] * 10) + "]\n")
    assert err.value.problem_mark.line == 1  # points at the list the aliases blow up


def test_the_alias_bomb_is_refused_in_a_short_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("name: bomb\ndescription: x\n" + BOMB, encoding="utf-8")
    assert main(["constitution", "validate", str(path)]) == 2
    line = _one_line(capsys)
    assert "aliases expand it" in line and f"{path}:" in line and len(line) < 300


def test_a_string_longer_than_the_limit_is_refused_before_parsing():
    with pytest.raises(yaml.YAMLError, match="MiB limit"):
        yamlio.load("a: " + "x" * yamlio.MAX_BYTES)


# ------------------------------------------------------------------ quoting stays short

@pytest.mark.parametrize("value", ["x" * 1_000_000, [["x"] * 1000] * 1000, {"k" * 500: "v" * 500},
                                   "a\nb\x00c" * 100], ids=["long-text", "huge-list", "long-keys", "odd-chars"])
def test_shown_is_one_short_line(value):
    text = yamlio.shown(value)
    assert len(text) <= yamlio.MAX_QUOTED and "\n" not in text and "\x00" not in text
    assert text.startswith(repr(value)[:20])


def test_shown_leaves_short_values_as_their_repr():
    assert yamlio.shown("aye") == "'aye'" and yamlio.shown(3) == "3" and yamlio.shown(["a", 1]) == "['a', 1]"


def test_a_duplicate_long_key_is_quoted_short():
    key = "k" * 5000
    with pytest.raises(yaml.YAMLError) as err:
        yamlio.load(f"? {key}\n: 1\n? {key}\n: 2\n")  # explicit keys: an implicit one is at most 1024 characters
    loc, problem = yamlio.describe_error(err.value)
    assert loc == ":3:3" and "duplicate key" in problem and len(problem) < 2 * yamlio.MAX_QUOTED


def test_describe_error_caps_a_long_problem():
    _, problem = yamlio.describe_error(yaml.YAMLError("y" * 10_000))
    assert len(problem) <= 2 * yamlio.MAX_QUOTED


# ------------------------------------------------------------------ characters and encodings

@pytest.mark.parametrize("char,name", [("\x00", "\\x00"), ("\x07", "\\x07"), ("\x1b", "\\x1b")])
def test_a_raw_control_character_in_yaml_is_named_with_its_line(char, name):
    with pytest.raises(yaml.YAMLError) as err:
        yamlio.load(f"name: x\ndescription: a{char}b\n")
    loc, problem = yamlio.describe_error(err.value)
    assert loc == ":2:15" and name in problem and char not in problem


def test_a_byte_order_mark_is_dropped(tmp_path):
    plain, marked = tmp_path / "plain.yaml", tmp_path / "marked.yaml"
    plain.write_bytes(b"# comment\na: 1\n")
    marked.write_bytes(b"\xef\xbb\xbf# comment\na: 1\n")
    assert yamlio.read_text(marked, "recipe") == yamlio.read_text(plain, "recipe") == "# comment\na: 1\n"


def test_utf16_is_named_as_such(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: x\n".encode("utf-16"))
    with pytest.raises(UserError, match="UTF-16 text .*save the constitution as UTF-8"):
        yamlio.read_text(path, "constitution")
