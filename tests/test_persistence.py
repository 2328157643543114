"""Persistence over turns (evaluation/persistence.py) with a scripted backend and a keyword
classifier: what each condition is asked at each turn, the seeds, the per-turn rates and
paired differences, the cross-fitting and the files. No model."""
from __future__ import annotations

import json

import pytest

from character_training.errors import UserError
from character_training.evaluation.core import Condition
from character_training.evaluation.persistence import format_persistence, persistence_check, user_turns
from data_gen.backends import Completion
from tests.fakes import KeywordClassifier
from data_gen.seeds import request_seed

PROMPTS = ["What is rain?", "What is snow?", "What is hail?", "What is fog?", "What is wind?", "What is frost?"]
SYSTEM = "You are Captain Marlow, a pirate."


def conditions(adapter: str) -> list[Condition]:
    return [Condition("base"), Condition("base+system_prompt", system_prompt=SYSTEM),
            Condition("adapter", adapter=adapter, kind="adapter"),
            Condition("adapter+system_prompt", system_prompt=SYSTEM, adapter=adapter, kind="adapter")]


class ScriptedBackend:
    """Records every request; answers in the pirate voice under a system prompt or an adapter
    (the adapter alone only up to turn ``fade_after``), plainly otherwise. Each answer names its
    condition, turn and question, so an answer fed back can be traced."""

    def __init__(self, fade_after: int | None = None):
        self.fade_after = fade_after
        self.calls: list[dict] = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append({"conversations": [[dict(m) for m in c] for c in conversations], "adapter": adapter,
                           "seeds": list(seeds)})
        out = []
        for conv in conversations:
            turn = sum(m["role"] == "user" for m in conv)
            prompted = conv[0]["role"] == "system"
            tag = ("A" if adapter else "B") + ("S" if prompted else "")
            pirate = prompted or (adapter is not None and (self.fade_after is None or turn <= self.fade_after))
            voice = "Ahoy, arr" if pirate else "Plainly"
            out.append(Completion(f"  {voice} [{tag} t{turn}] on {conv[-1]['content']}  ", "stop", 9))
        return out


@pytest.fixture
def run(tmp_path):
    KeywordClassifier.made = []

    def go(backend, turns=3, **kw):
        return persistence_check(backend, conditions(str(tmp_path / "adapter")), PROMPTS, tmp_path / "out",
                                 turns=turns, classifier_factory=KeywordClassifier, **kw)
    return go


def requests(backend: ScriptedBackend, turn: int) -> list[dict]:
    """The calls of one turn, one per condition in the conditions' order."""
    return [c for c in backend.calls if sum(m["role"] == "user" for m in c["conversations"][0]) == turn]


def test_each_condition_is_fed_its_own_answers_with_its_system_prompt_at_the_head(run, tmp_path):
    backend = ScriptedBackend()
    run(backend, turns=3)
    assert len(backend.calls) == 4 * 3  # one request per condition per turn, all conversations batched
    base, prompted, adapter, both = requests(backend, 3)
    assert [len(c["conversations"]) for c in (base, prompted, adapter, both)] == [len(PROMPTS)] * 4
    # conversation 1 asks prompts 1, 2, 3 (conversation 5 wraps around: 5, 0, 1)
    assert adapter["conversations"][1] == [
        {"role": "user", "content": "What is snow?"},
        {"role": "assistant", "content": "Ahoy, arr [A t1] on What is snow?"},
        {"role": "user", "content": "What is hail?"},
        {"role": "assistant", "content": "Ahoy, arr [A t2] on What is hail?"},
        {"role": "user", "content": "What is fog?"}]
    assert prompted["conversations"][1] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is snow?"},
        {"role": "assistant", "content": "Ahoy, arr [BS t1] on What is snow?"},
        {"role": "user", "content": "What is hail?"},
        {"role": "assistant", "content": "Ahoy, arr [BS t2] on What is hail?"},
        {"role": "user", "content": "What is fog?"}]
    assert base["conversations"][5] == [
        {"role": "user", "content": "What is frost?"},
        {"role": "assistant", "content": "Plainly [B t1] on What is frost?"},
        {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Plainly [B t2] on What is rain?"},
        {"role": "user", "content": "What is snow?"}]
    assert both["adapter"] == adapter["adapter"] == str(tmp_path / "adapter") and base["adapter"] is None
    assert both["conversations"][1][0] == {"role": "system", "content": SYSTEM}
    assert both["conversations"][1][2]["content"] == "Ahoy, arr [AS t1] on What is snow?"
    for k, call in enumerate(backend.calls):  # condition by condition, turn by turn
        systems = [[i for i, m in enumerate(c) if m["role"] == "system"] for c in call["conversations"]]
        assert all(s == ([0] if k // 3 in (1, 3) else []) for s in systems)


def test_seeds_are_the_same_under_every_condition_and_come_from_the_user_turns(run):
    backend = ScriptedBackend()
    run(backend, turns=3, seed=7)
    for turn in (1, 2, 3):
        calls = requests(backend, turn)
        assert all(c["seeds"] == calls[0]["seeds"] for c in calls)
        user_only = [[{"role": "user", "content": p} for p in row[:turn]] for row in user_turns(PROMPTS, 3)]
        assert calls[0]["seeds"] == [request_seed(7, conv, 1) for conv in user_only]
    every = [s for turn in (1, 2, 3) for s in requests(backend, turn)[0]["seeds"]]
    assert len(set(every)) == len(every)  # every conversation and turn draws its own
    again = ScriptedBackend()
    run(again, turns=3, seed=8)
    assert again.calls[0]["seeds"] != backend.calls[0]["seeds"]


def test_a_fading_persona_gives_falling_rates_and_per_turn_paired_differences(run, tmp_path):
    report = run(ScriptedBackend(fade_after=3), turns=5, markers=("arr",))
    rates = report["series"]["persona_rate"]
    assert rates["adapter"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert rates["base+system_prompt"] == rates["adapter+system_prompt"] == [1.0] * 5
    assert rates["base"] == [0.0] * 5
    assert report["series"]["marker_rate"]["adapter"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    to_prompt = report["paired"]["adapter - base+system_prompt"]["per_turn"]
    assert [d["persona_rate"]["difference"] for d in to_prompt] == [0.0, 0.0, 0.0, -1.0, -1.0]
    assert [d["persona_rate"]["below_zero"] for d in to_prompt] == [False, False, False, True, True]
    assert report["series"]["paired_persona_rate"]["adapter - base+system_prompt"] == [0.0, 0.0, 0.0, -1.0, -1.0]
    assert report["paired"]["adapter - base+system_prompt"]["all_turns"]["persona_rate"]["difference"] == pytest.approx(-0.4)
    assert report["conditions"]["adapter"]["last_minus_first"]["persona_rate"]["difference"] == -1.0
    assert report["conditions"]["base+system_prompt"]["last_minus_first"]["persona_rate"]["difference"] == 0.0
    assert report["conditions"]["adapter"]["all_turns"]["persona_rate"] == pytest.approx(0.6)
    assert report["conditions"]["adapter"]["per_turn"][3]["persona_rate_ci95"] == [0.0, 0.0]
    assert set(report["paired"]) == {"base+system_prompt - base", "adapter - base+system_prompt", "adapter - base",
                                     "adapter+system_prompt - base+system_prompt", "adapter+system_prompt - base"}
    assert report["measurable"] == [True] * 5 and report["scorer"]["heldout_accuracy"] == 1.0
    table = format_persistence(report)
    assert table.splitlines()[2].split()[:5] == ["1", "0.00/0.00", "1.00/1.00", "1.00/1.00", "1.00/1.00"]
    assert table.splitlines()[5].split()[:4] == ["4", "0.00/0.00", "1.00/1.00", "0.00/0.00"]
    assert "-1.00*" in table


def test_the_classifier_never_fits_on_answers_it_scores(run):
    run(ScriptedBackend(fade_after=1), turns=4)
    made = KeywordClassifier.made
    assert len(made) == 2
    for clf in made:
        assert clf.fitted and clf.scored
        assert not set(clf.fitted) & set(clf.scored)
    # fitted on base and base+system_prompt answers only; every answer of every condition scored once
    assert all("[B t" in a or "[BS t" in a for clf in made for a in clf.fitted)
    scored = [a for clf in made for a in clf.scored]
    assert len(scored) == len(set(scored)) == 4 * len(PROMPTS) * 4


def test_files_are_written_and_the_json_holds_the_report(run, tmp_path):
    report = run(ScriptedBackend(fade_after=2), turns=3, markers=("arr", "ahoy"))
    out = tmp_path / "out"
    assert (out / "persistence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "persistence.json").read_text()) == report
    rows = [json.loads(line) for line in (out / "persistence_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(PROMPTS) * 3
    first = rows[0]
    assert {k: first[k] for k in ("condition", "conversation", "turn", "prompt", "persona", "markers")} == {
        "condition": "base", "conversation": 0, "turn": 1, "prompt": "What is rain?", "persona": False, "markers": []}
    faded = next(r for r in rows if r["condition"] == "adapter" and r["conversation"] == 2 and r["turn"] == 3)
    assert faded["answer"] == "Plainly [A t3] on What is wind?" and faded["persona"] is False
    pirate = next(r for r in rows if r["condition"] == "adapter" and r["turn"] == 1)
    assert pirate["persona"] is True and pirate["markers"] == ["arr", "ahoy"]


def test_bad_arguments_are_refused(tmp_path):
    cs = conditions(str(tmp_path))
    for turns in (0, -1):
        with pytest.raises(UserError, match="turns"):
            persistence_check(ScriptedBackend(), cs, PROMPTS, tmp_path / "o", turns=turns,
                              classifier_factory=KeywordClassifier)
    with pytest.raises(UserError, match="persona condition"):
        persistence_check(ScriptedBackend(), cs[:1] + cs[2:], PROMPTS, tmp_path / "o",
                          classifier_factory=KeywordClassifier)
    with pytest.raises(UserError, match="at least 2"):
        persistence_check(ScriptedBackend(), cs, PROMPTS[:1] * 3, tmp_path / "o", classifier_factory=KeywordClassifier)


def test_the_eval_stage_runs_persistence_when_the_recipe_asks_for_it(tmp_path, monkeypatch):
    """eval.persistence_turns: the stage asks base, the system prompt, the adapter and the adapter
    with the system prompt, on clean held-out prompts, and records where the report is."""
    from types import SimpleNamespace

    from character_training.config.eval_settings import EvalSettings
    from character_training.evaluation import persistence
    from character_training.run import stages
    from data_gen.backends import Sampling

    seen = {}

    def check(backend, conds, prompts, out, **kw):
        seen.update(asked=[(c.name, c.system_prompt, c.adapter) for c in conds], prompts=prompts, out=out)
        return {"turns": kw["turns"], "conversations": len(prompts)}

    monkeypatch.setattr(persistence, "persistence_check", check)
    monkeypatch.setattr(persistence, "format_persistence", lambda report: "table")
    ctx = SimpleNamespace(teacher_prompt=lambda: SYSTEM, recipe=SimpleNamespace(seed=0),
                          constitution=SimpleNamespace(markers=("arr",)))
    settings = EvalSettings(persistence_turns=3, persistence_conversations=4)
    got = stages._persistence(settings, ctx, ScriptedBackend(), "runs/x/distill/adapter", PROMPTS + [PROMPTS[0]],
                              ["What is hail?"], tmp_path, Sampling())
    assert got == {"persistence": {"turns": 3, "conversations": 4, "report": "persistence/persistence.json"}}
    adapter = "runs/x/distill/adapter"
    assert seen["asked"] == [("base", None, None), ("base+system_prompt", SYSTEM, None), ("adapter", None, adapter),
                             ("adapter+system_prompt", SYSTEM, adapter)]
    assert seen["prompts"] == [p for p in PROMPTS if p != "What is hail?"][:4]  # no repeat, no training prompt
    assert seen["out"] == tmp_path / "persistence"
    assert stages._persistence(EvalSettings(), ctx, None, "a", PROMPTS, [], tmp_path, Sampling()) == {}
    with pytest.raises(UserError, match="persistence_conversations"):
        EvalSettings(persistence_turns=3, persistence_conversations=1)
