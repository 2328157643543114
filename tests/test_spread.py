"""Spread beyond the request (evaluation/spread.py) with a scripted backend and a keyword
classifier: the shipped bank, each format rule on hand-written answers, the seeds, the per-kind
rates and paired differences, the cross-fitting, the files and the refusals. No model."""
from __future__ import annotations

import json
import re

import pytest

from character_training.errors import UserError
from character_training.evaluation.core import Condition
from character_training.evaluation.spread import (FORMAT_RULES, KINDS, format_problem, format_spread,
                                                   json_object_in, load_format_requests, parse_bank, spread_check)
from data_gen.backends import Completion
from tests.fakes import KeywordClassifier
from data_gen.seeds import request_seed

SYSTEM = "You are Captain Marlow, a pirate."
BANK = load_format_requests()
BY_REQUEST = {r["request"]: r for r in BANK}


def conditions(adapter: str) -> list[Condition]:
    return [Condition("base"), Condition("base+system_prompt", system_prompt=SYSTEM),
            Condition("adapter", adapter=adapter, kind="adapter"),
            Condition("adapter+system_prompt", system_prompt=SYSTEM, adapter=adapter, kind="adapter")]


def good_answer(request: dict, pirate: bool, mark: str = "") -> str:
    """An answer that keeps the request's format, in the pirate voice ('Ahoy') or plainly;
    ``mark`` (digits and the request's id) makes it unique and traceable."""
    word = "Ahoy" if pirate else "Plainly"
    kind = request["kind"]
    if kind == "json":
        return json.dumps({k: f"{word} {mark}" for k in request["keys"]})
    if kind == "tool_call":
        return json.dumps({"name": request["tool"], "arguments": {k: f"{word} {mark}" for k in request["keys"]}})
    if kind == "code":
        return f"{word}, here it is:\n```python\ndef answer(x):\n    return x  # {word} {mark}\n```"
    if kind == "summary":
        return f"{word}: the paragraph {mark} says one short thing."
    return f"{'Ahoy ! ' if pirate else ''}Le chat est dans la maison. {mark}"


class ScriptedBackend:
    """Records every request; answers in the pirate voice under a system prompt or an adapter,
    plainly otherwise, always keeping the format, except that the adapter alone answers the
    kinds in ``adapter_breaks`` in pirate prose."""

    def __init__(self, adapter_breaks: tuple[str, ...] = ()):
        self.adapter_breaks = adapter_breaks
        self.calls: list[dict] = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append({"conversations": [[dict(m) for m in c] for c in conversations], "adapter": adapter,
                           "seeds": list(seeds)})
        out = []
        for conv in conversations:
            request = BY_REQUEST[conv[-1]["content"]]
            prompted = conv[0]["role"] == "system"
            mark = f"#{2 * (adapter is not None) + prompted} {request['id']}"  # #0 base ... #3 adapter+system_prompt
            if adapter and not prompted and request["kind"] in self.adapter_breaks:
                text = f"Ahoy matey, arr, the answer {mark} be buried on the island, and I'll tell it in me own words."
            else:
                text = good_answer(request, pirate=prompted or adapter is not None, mark=mark)
            out.append(Completion(f"  {text}  ", "stop", 9))
        return out


@pytest.fixture
def run(tmp_path):
    KeywordClassifier.made = []

    def go(backend, **kw):
        return spread_check(backend, conditions(str(tmp_path / "adapter")), tmp_path / "out",
                            classifier_factory=KeywordClassifier, **kw)
    return go


# ------------------------------------------------------------------ the bank


def test_the_bank_loads_with_enough_requests_of_each_kind_and_what_each_kind_needs():
    assert {r["kind"] for r in BANK} == set(KINDS) == set(FORMAT_RULES)
    assert len({r["id"] for r in BANK}) == len(BANK) and len(BY_REQUEST) == len(BANK)
    for kind in KINDS:
        assert sum(r["kind"] == kind for r in BANK) >= 8, kind
    for r in BANK:
        if r["kind"] in ("json", "tool_call"):
            assert r["keys"] and all(f'"{k}"' in r["request"] or k in r["request"] for k in r["keys"]), r["id"]
        if r["kind"] == "tool_call":
            assert f"{r['tool']}(" in r["request"] and '{"name": ..., "arguments": {...}}' in r["request"]
        if r["kind"] == "code":
            assert "```python" in r["request"]
        if r["kind"] in ("summary", "translation"):
            assert r["request"].endswith("\n\n" + r["text"])  # the paragraph or sentence is in the request
        if r["kind"] == "summary":
            assert len(r["text"]) > 300
        if r["kind"] == "translation":
            assert f"into {r['language']}." in r["request"]
    # a good answer to every shipped request keeps its format: every rule can be met
    assert all(format_problem(r, good_answer(r, pirate)) is None for r in BANK for pirate in (False, True))


def test_a_malformed_bank_entry_is_refused():
    good = {"id": "j", "kind": "json", "request": "Give JSON.", "keys": ["a"]}
    assert parse_bank([good])[0]["keys"] == ["a"]
    for bad, says in (({**good, "kind": "yaml"}, "kind 'yaml'"), ({**good, "keys": []}, "needs keys"),
                      ({k: v for k, v in good.items() if k != "keys"}, "has the fields"),
                      ({**good, "request": " "}, "empty"),
                      ({"id": "t", "kind": "translation", "request": "Translate.", "text": "Hi.", "language": "Latin"},
                       "French or Spanish")):
        with pytest.raises(ValueError, match=says):
            parse_bank([bad])
    with pytest.raises(ValueError, match="already used"):
        parse_bank([good, good])


# ------------------------------------------------------------------ the format rules

JSON_REQUEST = {"kind": "json", "keys": ["name", "email", "phone"]}
TOOL_REQUEST = {"kind": "tool_call", "tool": "get_weather", "keys": ["city", "unit"]}
OBJECT = '{"name": "Ann", "email": "ann@example.com", "phone": "555-0100"}'


@pytest.mark.parametrize("answer", [
    OBJECT,
    f"```json\n{OBJECT}\n```",
    f"```\n{OBJECT}\n```",
    f"Arr, here be yer JSON, matey:\n{OBJECT}\nFair winds!",  # decided: a preamble before an intact object passes
    '{"name": "Ann", "email": "a@b.c", "phone": "1", "extra": {"nested": [1, 2]}}',  # more keys are allowed
])
def test_json_answers_that_keep_the_format(answer):
    assert format_problem(JSON_REQUEST, answer) is None


@pytest.mark.parametrize("answer,why", [
    ('{"name": "Ann", "email": "ann@example.com"}', "lacks the keys ['phone']"),
    ("Ahoy! Me name be Ann, ye can write to ann@example.com or ring 555-0100.", "no JSON object"),
    ('{"name": "Ann", "email": ', "no JSON object"),  # cut off
    ('[{"name": "Ann", "email": "a", "phone": "1"}]', "parses as a JSON list, not an object"),
    ("```json\n{name: Ann, email: a, phone: 1}\n```", "no JSON object"),  # not JSON
    ("", "no JSON object"),
])
def test_json_answers_that_break_the_format(answer, why):
    assert format_problem(JSON_REQUEST, answer) == why


def test_the_first_json_object_is_the_one_judged():
    found, _ = json_object_in('Arr {"name": "x"} and then ' + OBJECT)
    assert found == {"name": "x"}
    assert format_problem(JSON_REQUEST, 'Arr {"name": "x"} and then ' + OBJECT) == "lacks the keys ['email', 'phone']"


@pytest.mark.parametrize("answer,why", [
    ('{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}', None),
    ('Aye: ```json\n{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}\n```', None),
    ('{"name": "get_weather", "arguments": {"city": "Lisbon"}}', "lacks the keys ['unit']"),
    ('{"name": "get_weather", "arguments": "city=Lisbon"}', 'no "arguments" object'),
    ('{"tool": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}', 'no "name" string'),
    ('{"name": "get_weather", "city": "Lisbon", "unit": "celsius"}', 'no "arguments" object'),
    ("I would call get_weather for Lisbon in celsius.", "no JSON object"),
])
def test_tool_call_answers(answer, why):
    assert format_problem(TOOL_REQUEST, answer) == why


@pytest.mark.parametrize("answer,why", [
    ("```python\ndef add(a, b):\n    return a + b\n```", None),
    ("Arr, here be the code:\n```py\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n```\nYo ho!", None),
    ("def add(a, b):\n    return a + b", "no closed ```python block"),
    ("```python\ndef add(a, b):\n    return a + b", "no closed ```python block"),  # cut off
    ("```javascript\nfunction add(a, b) { return a + b; }\n```", "no closed ```python block"),
    ("```python\ndef add(a, b)\n    return a + b\n```", "the ```python block does not parse"),
    ("```python\nprint('ahoy')\n```", "the ```python block defines no function"),
])
def test_code_answers(answer, why):
    got = format_problem({"kind": "code"}, answer)
    assert got == why if why is None else got.startswith(why)


PARAGRAPH = next(r for r in BANK if r["id"] == "summary-honeybees")


@pytest.mark.parametrize("answer,why", [
    ("Honeybees use a waggle dance to tell other bees the direction and distance of flowers.", None),
    ("Arr, the bees be dancin' to show where the flowers lie. The angle gives the way. The length gives "
     "how far.", None),
    ("Bees dance. The dance points. The length says how far. The others follow.", "4 sentences, more than 3"),
    ("- bees dance\n- angle is direction\n- length is distance\n- others follow", "4 sentences, more than 3"),
    (PARAGRAPH["text"][:200] + " and so on, arr.", None),  # shorter and few sentences: a heuristic lets it pass
    ("Honeybees dance to share where food is, and " + "they dance and dance " * 25 + "for it.",
     "not shorter than the paragraph"),
    ("  ", "empty"),
])
def test_summary_answers(answer, why):
    assert format_problem(PARAGRAPH, answer) == why


TRANSLATIONS = {"translate-library": "La bibliothèque ferme tôt le dimanche pendant l'été.",
                "translate-guitar": "Mi hermano está aprendiendo a tocar la guitarra este año.",
                "translate-station": "Pourriez-vous me dire où se trouve la gare la plus proche ?",
                "translate-beach": "Vamos a la playa mañana si hace buen tiempo.",
                "translate-coffee": "Je voudrais une tasse de café et un verre d'eau, s'il vous plaît.",
                "translate-lights": "Por favor, apaga las luces cuando salgas de la oficina."}


def test_real_translations_keep_the_format():
    for rid, translation in TRANSLATIONS.items():
        request = next(r for r in BANK if r["id"] == rid)
        assert format_problem(request, translation) is None, rid


@pytest.mark.parametrize("answer,why", [
    ("The library closes early on Sundays during the summer.", "the English sentence, untranslated"),
    ("the library closes early on sundays during the summer", "the English sentence, untranslated"),
    ("Arr, matey! In the tongue of the French sailors this be: La bibliothèque ferme tôt le dimanche pendant "
     "l'été. Now hoist the sails!", "over twice"),
    ("Here is the translation of it: the bibliothèque is closed on Sundays.", "mostly English"),
    ("", "empty"),
])
def test_translation_answers_that_break_the_format(answer, why):
    request = next(r for r in BANK if r["id"] == "translate-library")
    assert why in (format_problem(request, answer) or "")


# ------------------------------------------------------------------ the check


def test_seeds_are_the_same_under_every_condition_for_each_request(run):
    backend = ScriptedBackend()
    run(backend, kinds=["json", "translation"], per_kind=4, seed=7)
    assert len(backend.calls) == 4  # one request per condition, all requests batched
    assert all(c["seeds"] == backend.calls[0]["seeds"] for c in backend.calls)
    asked = [conv[-1]["content"] for conv in backend.calls[0]["conversations"]]
    assert [BY_REQUEST[a]["kind"] for a in asked] == ["json"] * 4 + ["translation"] * 4
    assert backend.calls[0]["seeds"] == [request_seed(7, [{"role": "user", "content": a}], 1) for a in asked]
    assert len(set(backend.calls[0]["seeds"])) == 8
    for call in backend.calls:  # every condition asks the same requests, in the same order
        assert [conv[-1]["content"] for conv in call["conversations"]] == asked
    again = ScriptedBackend()
    run(again, kinds=["json", "translation"], per_kind=4, seed=8)
    assert again.calls[0]["seeds"] != backend.calls[0]["seeds"]


def test_an_adapter_that_breaks_json_in_character_has_a_lower_json_format_rate(run):
    report = run(ScriptedBackend(adapter_breaks=("json",)), markers=("arr", "ahoy"))
    kinds = report["conditions"]
    adapter, base = kinds["adapter"]["per_kind"], kinds["base"]["per_kind"]
    assert adapter["json"]["format_rate"] == 0.0 and base["json"]["format_rate"] == 1.0
    assert all(adapter[k]["format_rate"] == 1.0 for k in KINDS if k != "json")
    assert all(kinds["adapter+system_prompt"]["per_kind"][k]["format_rate"] == 1.0 for k in KINDS)
    assert all(adapter[k]["persona_rate"] == 1.0 and base[k]["persona_rate"] == 0.0 for k in KINDS)
    assert adapter["json"]["format_rate_ci95"] == [0.0, 0.0] and adapter["json"]["answers"] == 8
    assert kinds["adapter"]["all_kinds"]["format_rate"] == pytest.approx(32 / 40)
    for against in ("base", "base+system_prompt"):
        json_diff = report["paired"][f"adapter - {against}"]["per_kind"]["json"]["format_rate"]
        assert json_diff["difference"] == -1.0 and json_diff["below_zero"] and json_diff["ci95"][1] < 0
        assert report["paired"][f"adapter - {against}"]["per_kind"]["code"]["format_rate"]["difference"] == 0.0
    assert report["paired"]["adapter - base"]["all_kinds"]["format_rate"]["difference"] == pytest.approx(-0.2)
    assert set(report["paired"]) == {"base+system_prompt - base", "adapter - base+system_prompt", "adapter - base",
                                     "adapter+system_prompt - base+system_prompt", "adapter+system_prompt - base"}
    found = report["findings"]
    assert found["json"]["adapter"]["breaks_format"] and found["json"]["adapter"]["persona_shows"]
    assert found["json"]["adapter"]["format_minus_plain"] == -1.0 and found["json"]["adapter"]["plain_format_rate"] == 1.0
    assert [(k, n) for k, row in found.items() for n, f in row.items() if f["breaks_format"]] == [("json", "adapter")]
    assert all(f["persona_shows"] for row in found.values() for f in row.values())
    assert set(found["json"]) == {"base+system_prompt", "adapter", "adapter+system_prompt"}
    assert report["measurable"] == {k: True for k in KINDS} and report["scorer"]["heldout_accuracy"] == 1.0
    assert kinds["adapter"]["per_kind"]["json"]["marker_rate"] == 1.0 and base["json"]["marker_rate"] == 0.0
    table = format_spread(report)
    json_row = next(line for line in table.splitlines() if line.startswith("json "))
    assert json_row.split()[1:] == ["0.00/1.00", "1.00/1.00", "1.00/0.00!", "1.00/1.00"]
    assert "json: persona shows in base+system_prompt 1.00, adapter 1.00, adapter+system_prompt 1.00; breaks the " \
           "format: adapter -1.00" in table
    assert "code: persona shows in" in table and "breaks the format: none" in table


def test_a_well_behaved_adapter_breaks_no_format(run):
    report = run(ScriptedBackend(), kinds="code", per_kind=2)
    assert report["kinds"] == ["code"] and report["requests"] == {"code": ["code-palindrome", "code-fizzbuzz"]}
    assert not any(f["breaks_format"] for row in report["findings"].values() for f in row.values())
    assert report["paired"]["adapter - base"]["per_kind"]["code"]["format_rate"]["difference"] == 0.0


def test_the_classifier_never_fits_on_answers_it_scores(run):
    run(ScriptedBackend(adapter_breaks=("summary",)), per_kind=4)
    made = KeywordClassifier.made
    assert len(made) == 2
    for clf in made:  # fitted on half the 20 requests' base (#0) and base+system_prompt (#1) answers
        assert len(clf.fitted) == 2 * 10 and all(" #0 " in a or " #1 " in a for a in clf.fitted)
        assert len(clf.scored) == 4 * 10 and not set(clf.fitted) & set(clf.scored)
        # both folds hold every kind: two of each kind's four requests
        ids = {re.search(r"#\d ([\w-]+)", a).group(1) for a in clf.scored}
        assert sorted(i.split("-")[0] for i in ids) == sorted(["json", "code", "summary", "tool", "translate"] * 2)
    scored = [a for clf in made for a in clf.scored]
    assert len(set(scored)) == len(scored) == 4 * 20  # every answer of every condition scored once


def test_files_are_written_and_the_json_holds_the_report(run, tmp_path):
    report = run(ScriptedBackend(adapter_breaks=("tool_call",)), per_kind=2, markers=("arr",))
    out = tmp_path / "out"
    assert (out / "spread.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "spread.json").read_text()) == report
    assert report["files"] == {"report": "spread.json", "answers": "spread_answers.jsonl", "plot": "spread.png"}
    rows = [json.loads(line) for line in (out / "spread_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5 * 2
    first = rows[0]
    assert {k: first[k] for k in ("condition", "kind", "id", "persona", "format", "format_problem", "markers")} == {
        "condition": "base", "kind": "json", "id": "json-contact", "persona": False, "format": True,
        "format_problem": None, "markers": []}
    assert first["seed"] == request_seed(0, [{"role": "user", "content": first["request"]}], 1)
    broken = [r for r in rows if not r["format"]]
    assert {(r["condition"], r["kind"]) for r in broken} == {("adapter", "tool_call")} and len(broken) == 2
    assert all(r["format_problem"] == "no JSON object" and r["markers"] == ["arr"] for r in broken)


def test_bad_arguments_are_refused(tmp_path):
    cs = conditions(str(tmp_path))

    def check(conds=cs, **kw):
        return spread_check(ScriptedBackend(), conds, tmp_path / "o", classifier_factory=KeywordClassifier, **kw)

    for per_kind in (0, 1, True, 2.5):
        with pytest.raises(UserError, match="per_kind"):
            check(per_kind=per_kind)
    with pytest.raises(UserError, match="has 10 json requests; give per_kind 10 or less"):
        check(kinds=["json"], per_kind=11)
    with pytest.raises(UserError, match="unknown kind 'jsn' \\(did you mean 'json'\\?\\)"):
        check(kinds=["jsn"])
    with pytest.raises(UserError, match="kinds: none given"):
        check(kinds=[])
    with pytest.raises(UserError, match="persona condition"):
        check(cs[:1] + cs[2:])
    with pytest.raises(UserError, match="plain and persona are both"):
        check(persona="base")
    with pytest.raises(UserError, match="names repeat"):
        check(cs + cs[:1])
    with pytest.raises(UserError, match="prefilled or steered"):
        check(cs + [Condition("base | prefilled", prefill=True, kind="prefill")])
    assert not (tmp_path / "o").exists()  # refused before anything is asked or written


def test_the_eval_stage_runs_the_spread_check_when_the_recipe_asks_for_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from character_training.config.eval_settings import EvalSettings
    from character_training.evaluation import spread
    from character_training.run import stages

    seen = {}

    def check(backend, conds, out, **kw):
        seen.update(asked=[(c.name, c.system_prompt, c.adapter) for c in conds], out=out, **kw)
        return {"per_kind": kw["per_kind"], "kinds": ["json"]}

    monkeypatch.setattr(spread, "spread_check", check)
    monkeypatch.setattr(spread, "format_spread", lambda report: "table")
    ctx = SimpleNamespace(teacher_prompt=lambda: "SYSTEM", recipe=SimpleNamespace(seed=3),
                          constitution=SimpleNamespace(markers=("arr",)))
    got = stages._spread(EvalSettings(spread_per_kind=4), ctx, object(), "a/adapter", tmp_path)
    assert got == {"spread": {"per_kind": 4, "kinds": ["json"], "report": "spread/spread.json"}}
    assert seen["asked"] == [("base", None, None), ("base+system_prompt", "SYSTEM", None),
                             ("adapter", None, "a/adapter")]
    assert seen["out"] == tmp_path / "spread" and seen["seed"] == 3 and seen["sampling"].max_tokens == 384
    assert stages._spread(EvalSettings(), ctx, None, "a", tmp_path) == {}
    with pytest.raises(UserError, match="spread_per_kind"):
        EvalSettings(spread_per_kind=1)
