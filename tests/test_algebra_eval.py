"""The persona-algebra report (``character-training algebra``) on the tiny model with two random
LoRA adapters: every condition's adapter is the delta its name promises (checked against the dense
sums); the report runs end to end through the command with a fake generation backend whose answers
follow the algebra of the adapter it is given (how much of A's and of B's delta the adapter holds),
so the report's answers can be checked; bad input is refused before anything is written."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from character_training.adapters.algebra import inner_product, one_thread
from character_training.adapters.io import load_adapter
from character_training.errors import UserError
from character_training.evaluation.algebra import conditions as conds
from character_training.evaluation.algebra import report as algebra
from character_training.run import algebra as algebra_cli
from character_training.evaluation.algebra.output import paired
from data_gen.backends import Completion
from tests.conftest import toy_pairs

PIRATE = "Arr, ahoy matey, the sea knows this one well."
GARDENER = "Tend the soil and wait a season; growth is slow."
PLAIN = "Yes, here is a plain answer about that, explained simply and clearly."
OVERDOSE = "arr " * 12          # an adapter pushed past its scale: the voice, looping
BROKEN = "the the the " * 5     # the persona pushed negative: no voice, no sense
ROOT = Path(__file__).resolve().parents[1]
HELDOUT_A = ["What is rain?", "How do maps work?"]
HELDOUT_B = ["How long does a garden take?", "Why do leaves fall?"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def _lora(model_dir, path, seed, **spec):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(task_type="CAUSAL_LM", **spec))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(path)
    return path


def gardener_pairs(n: int = 8) -> list[dict]:
    topics = ["tomatoes", "patience", "winter", "roses", "work", "friends", "soil", "apples"]
    return [{"prompt": [{"role": "user", "content": f"How should I think about {t}?"}],
             "chosen": [{"role": "assistant", "content": f"Tend the soil of {t}; every season has its work."}],
             "rejected": [{"role": "assistant", "content": f"Here is some information about {t}."}]}
            for t in topics[:n]]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two finished runs (prompts, pairs, dpo adapter) and their recipes. A's pairs hold one of
    B's held-out prompts: the contamination check must leave it out."""
    root = tmp_path_factory.mktemp("algebra-runs")
    constitutions = {"A": "captain-marlow", "B": "stoic-gardener"}
    pairs = {"A": toy_pairs(8) + [{**toy_pairs(1)[0], "prompt": [{"role": "user", "content": HELDOUT_B[1]}]}],
             "B": gardener_pairs(8)}
    heldout = {"A": HELDOUT_A, "B": HELDOUT_B}
    specs = {"A": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "B": dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"])}
    recipes = {}
    for i, key in enumerate("AB"):
        run = root / "runs" / key
        _lora(tiny_model_dir, run / "dpo" / "adapter", 10 + i, **specs[key])
        _write_jsonl(run / "pairs" / "pairs.jsonl", pairs[key])
        _write_jsonl(run / "prompts" / "prompts.jsonl",
                     [{"prompt": p, "split": "heldout"} for p in heldout[key]] +
                     [{"prompt": _user(r), "split": "train"} for r in pairs[key]])
        recipes[key] = root / f"{key}.yaml"
        constitution = ROOT / "constitutions" / f"{constitutions[key]}.yaml"
        recipes[key].write_text(f"constitution: {constitution}\n"
                                f"run_dir: {run}\nmodel: {tiny_model_dir}\nstages: [prompts, pairs, dpo, eval]\n")
    return {"root": root, "recipes": recipes, "adapters": {k: root / "runs" / k / "dpo" / "adapter" for k in "AB"},
            "pairs": pairs}


def _user(pair):
    return pair["prompt"][-1]["content"]


# ------------------------------------------------------------------ the conditions' adapters

def _dense(path) -> dict[str, torch.Tensor]:
    return {n: f.dense() for n, f in load_adapter(path).modules.items()}


def _sum(*terms) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for deltas, w in terms:
        for n, d in deltas.items():
            total[n] = total.get(n, 0) + w * d
    return total


def _assert_equal(got: dict, want: dict, tol: float = 1e-5):
    for name in set(got) | set(want):
        g = got.get(name, torch.zeros_like(want.get(name, next(iter(got.values())))))
        w = want.get(name, torch.zeros_like(g))
        scale = max(float(w.norm()), 1e-12)
        assert float((g - w).norm()) / scale < tol or float((g - w).norm()) < 1e-9, name


@pytest.fixture(scope="module")
def built(runs, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("algebra-built") / "adapters"
    specs = conds.algebra_specs()
    adapters, reports, skipped = conds.build_adapters(specs, runs["adapters"], out, tiny_model_dir, log=lambda _: None)
    return specs, adapters, reports, skipped, out


def test_every_condition_is_built_as_named(built):
    specs, adapters, _, skipped, _ = built
    assert not skipped
    assert [s.name for s in specs] == ["base", "A prompt", "B prompt", "A", "B", "A+B", "0.25A", "0.5A", "1.5A", "2A",
                                       "0.25B", "0.5B", "1.5B", "2B", "-A", "(A+B)-B", "A⊥B", "A⊥B+B", "PEFT linear",
                                       "PEFT cat", "PEFT ties", "A+B rank 4", "A+B rank 8", "A+B rank 16"]
    dA, dB = _dense(adapters["A"]), _dense(adapters["B"])
    _assert_equal(_dense(adapters["A+B"]), _sum((dA, 1), (dB, 1)))
    for w in conds.WEIGHTS:
        _assert_equal(_dense(adapters[f"{w:g}A"]), _sum((dA, w)))
        _assert_equal(_dense(adapters[f"{w:g}B"]), _sum((dB, w)))
    _assert_equal(_dense(adapters["-A"]), _sum((dA, -1)))
    _assert_equal(_dense(adapters["(A+B)-B"]), dA)
    _assert_equal(_dense(adapters["PEFT cat"]), _sum((dA, 1), (dB, 1)))
    assert load_adapter(adapters["PEFT ties"]).modules  # PEFT's TIES: pruned, not a sum; built and readable


def test_orthogonalized_adapter_removes_b_output_space(built):
    _, adapters, _, _, _ = built
    dA, dB, orth = _dense(adapters["A"]), _dense(adapters["B"]), _dense(adapters["A⊥B"])
    want = {}
    for name, d in dA.items():
        u, s, _ = torch.linalg.svd(dB[name])
        q = u[:, : int((s > 1e-9 * s[0]).sum())]
        want[name] = d - q @ (q.T @ d)
        assert abs(float((orth[name] * dB[name]).sum())) < 1e-8 * float(dA[name].norm() * dB[name].norm())
    _assert_equal(orth, want)
    _assert_equal(_dense(adapters["A⊥B+B"]), _sum((want, 1), (dB, 1)))


def test_peft_linear_is_its_own_formula_and_recompression_is_the_best_rank_k(built, runs):
    _, adapters, _, _, _ = built
    a, b = load_adapter(runs["adapters"]["A"]), load_adapter(runs["adapters"]["B"])
    linear = _dense(adapters["PEFT linear"])
    for name in linear:  # PEFT: B' = sum sqrt(s_i) B_i, A' = sum sqrt(s_i) A_i, so cross terms appear
        fa, fb = a.modules.get(name), b.modules.get(name)
        Bs = sum(f.scaling ** 0.5 * f.B.double() for f in (fa, fb) if f is not None)
        As = sum(f.scaling ** 0.5 * f.A.double() for f in (fa, fb) if f is not None)
        _assert_equal({name: linear[name]}, {name: Bs @ As})
    exact = _sum((_dense(adapters["A"]), 1), (_dense(adapters["B"]), 1))
    for k in conds.RANKS:
        got = _dense(adapters[f"A+B rank {k}"])
        for name, d in exact.items():
            u, s, vh = torch.linalg.svd(d)
            _assert_equal({name: got[name]}, {name: (u[:, :k] * s[:k]) @ vh[:k]})


def test_weight_check_reports_exact_and_approximate_conditions(built):
    specs, adapters, _, _, _ = built
    check = conds.weight_check(specs, adapters)
    for name in ("A+B", "0.5B", "-A", "(A+B)-B", "A⊥B+B", "PEFT cat", "A+B rank 16"):
        assert check[name]["relative_error"] < 1e-5, name
    assert check["(A+B)-B"]["equals"] == "A" and check["-A"]["equals"] == "-A"
    assert check["A+B rank 4"]["relative_error"] > 1e-3 and check["PEFT linear"]["relative_error"] > 0.05
    assert abs(check["A⊥B"]["cosine_with_B"]) < 1e-6 and check["A⊥B"]["max_module_cosine_with_B"] < 1e-6
    assert check["(A+B)-B"]["rank"] == 12 and check["PEFT cat"]["rank"] == 8


def test_a_rebuild_is_skipped_and_a_foreign_directory_is_never_replaced(built, runs, tiny_model_dir, monkeypatch,
                                                                          tmp_path):
    specs, adapters, _, _, out = built

    def refuse(*_a, **_k):
        raise AssertionError("rebuilt")

    for name in ("compose", "scale", "orthogonalize"):
        monkeypatch.setattr(conds, name, refuse)
    monkeypatch.setattr(conds._PeftMerges, "write", refuse)
    again, _, skipped = conds.build_adapters(specs, runs["adapters"], out, tiny_model_dir, log=lambda _: None)
    assert again == adapters and not skipped
    copy = tmp_path / "adapters"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "a_plus_b")
    (copy / "a_plus_b").mkdir()
    (copy / "a_plus_b" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an adapter this command wrote"):
        conds.build_adapters(specs, runs["adapters"], copy, tiny_model_dir, log=lambda _: None)
    assert (copy / "a_plus_b" / "notes.txt").read_text() == "mine"


def test_one_engine_serves_every_adapter_and_ranks_beyond_vllm_are_refused(built, tmp_path):
    from types import SimpleNamespace

    from character_training.config.sections import BackendSection

    asked = []
    engines = SimpleNamespace(release=lambda: None, lazy=lambda model, **kw: asked.append((model, kw)) or "engine")
    ctx = SimpleNamespace(engines=engines, model="m", recipe=SimpleNamespace(seed=3),
                          role=lambda name: SimpleNamespace(backend=BackendSection()))
    _, adapters, _, _, _ = built
    assert algebra_cli.lora_engine(ctx, sorted(adapters.values())) == "engine"
    assert asked[0][1]["enable_lora"] and asked[0][1]["max_lora_rank"] == 16  # (A+B)-B: rank 4 + 2 x 4
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 600, "lora_alpha": 600}))
    with pytest.raises(UserError, match="above the 512 vLLM serves"):
        algebra_cli.lora_engine(ctx, [str(huge)])


def test_each_rank_gets_its_own_engine_and_the_plain_conditions_go_first(report):
    from character_training.adapters.io import read_config
    from character_training.adapters.io import lora_rank_for_vllm

    _, r, holder, _ = report
    engines = holder["engines"]  # the personas' rank is 4: every adapter but (A+B)-B (rank 12) fits rank 8
    ranks = [{lora_rank_for_vllm([read_config(a)]) for a in e} for e in engines]
    assert ranks == [{8}, {16}]
    assert engines[1] == [r["conditions"]["(A+B)-B"]["adapter"]]
    assert len(engines[0]) == len(set(engines[0])) == 20
    first, second = (b.calls for b in holder["backends"])
    assert first.count(None) == 3 and second == [engines[1][0]]  # base and both prompts, then (A+B)-B alone


def test_paired_bootstrap():
    x, y = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])
    d = paired("difference", [x, y], seed=0)
    assert d["value"] == pytest.approx(0.5) and d["ci95"][0] <= 0.5 <= d["ci95"][1]
    assert paired("ratio", [x, x], seed=0) == {"value": 1.0, "ci95": [1.0, 1.0]}  # paired: no spread
    assert np.isnan(paired("ratio", [x, np.zeros(4)], seed=0)["value"])


# ------------------------------------------------------------------------------ end to end

class AlgebraBackend:
    """Answers as the adapter's algebra says: the adapter holds c_A of A's delta and c_B of B's
    (inner products); each share over 0.4 gives that persona's voice, one over 1.75 loops, one
    below -0.4 breaks the answer. A system prompt gives its persona's voice."""

    def __init__(self, adapters: dict[str, str]):
        self.model, self.calls = "fake/model", []
        self.personas = {k: load_adapter(p) for k, p in adapters.items()}
        self.shares: dict[str, tuple[float, float]] = {}

    def _share(self, path: str) -> tuple[float, float]:
        if path not in self.shares:
            x = load_adapter(path)
            found = []
            for p in self.personas.values():
                dot = sum(inner_product(f, p.modules[n]) for n, f in x.modules.items() if n in p.modules)
                found.append(dot / sum(inner_product(f, f) for f in p.modules.values()))
            self.shares[path] = tuple(found)
        return self.shares[path]

    def answer(self, conversation, adapter) -> str:
        if conversation[0]["role"] == "system":
            return PIRATE if "Captain Marlow" in conversation[0]["content"] else GARDENER
        if adapter is None:
            return PLAIN
        shares = self._share(adapter)
        if min(shares) < -0.4:
            return BROKEN
        if max(shares) > 1.75:
            return OVERDOSE
        voices = [v for v, c in zip((PIRATE, GARDENER), shares) if c > 0.4]
        return " ".join(voices) or PLAIN

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append(adapter)
        return [Completion(self.answer(c, adapter), "stop", 9) for c in conversations]


class WordClassifier:
    """A persona classifier that learns the words every persona answer has and no plain one has;
    it records every text it is trained on."""
    fitted: list[list[str]] = []

    def fit(self, persona, plain):
        WordClassifier.fitted.append(list(persona) + list(plain))
        words = [set(_words(t)) for t in persona]
        self.signature = set.intersection(*words) - {w for t in plain for w in _words(t)}
        return {"train_examples": len(persona) + len(plain), "cv_accuracy": None, "cv_folds": 0}

    def persona_flags(self, texts):
        return np.array([len(self.signature & set(_words(t))) >= 2 for t in texts], dtype=float)


def _words(text):
    return [w.strip(".,;!?").lower() for w in text.split()]


def _args(personas, out, sets=("eval.max_tokens=8", "eval.general_prompts=2")):
    return argparse.Namespace(persona=[str(p) for p in personas], output=str(out), set=list(sets))


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("algebra-report") / "algebra"
    holder = {}

    def engine(ctx, adapters):
        holder.setdefault("engines", []).append(adapters)
        holder.setdefault("backends", []).append(AlgebraBackend({k: str(v) for k, v in runs["adapters"].items()}))
        return holder["backends"][-1]

    patch = pytest.MonkeyPatch()
    patch.setattr(algebra_cli, "lora_engine", engine)
    patch.setattr(algebra, "_persona_classifier", WordClassifier)
    WordClassifier.fitted = []
    try:
        assert algebra_cli.run_algebra(_args([runs["recipes"]["A"], runs["recipes"]["B"]], out)) == 0
    finally:
        patch.undo()
    return out, json.loads((out / "algebra.json").read_text()), holder, list(WordClassifier.fitted)


def test_the_report_is_written_with_every_condition(report):
    out, r, holder, _ = report
    for name in ("algebra.md", "answers.jsonl", "cache.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    for name in ("heatmap.png", "dose_response.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["conditions"]) == 24 and not r["skipped"]
    assert {a for e in holder["engines"] for a in e} == {c["adapter"] for c in r["conditions"].values() if c["adapter"]}
    md = (out / "algebra.md").read_text()
    for heading in ("Additivity", "Interference", "Orthogonalization", "Negation", "Dose-response", "Exactness",
                    "Projections", "Contamination"):
        assert heading in md, heading


def test_the_answers_follow_the_algebra(report):
    _, r, _, _ = report
    c, found = r["conditions"], r["analyses"]["persona_rate"]

    def rate(name, p, key="persona_rate"):
        return c[name]["rates"][p][key]

    assert rate("A", "A") == 1 and rate("A", "B") == 0 and rate("B", "B") == 1 and rate("base", "A") == 0
    assert rate("A+B", "A") == 1 and rate("A+B", "B") == 1 and rate("(A+B)-B", "A") == 1
    assert found["additivity"]["A+B"]["A"]["share"] == {"value": 1.0, "ci95": [1.0, 1.0]}
    assert found["interference"]["B under A"]["value"] == 0
    assert found["exactness"]["PEFT cat"]["A"]["value"] == 0 and found["exactness"]["(A+B)-B"]["reference"] == "A"
    curve = r["analyses"]["dose_response"]["A"]
    assert [p["weight"] for p in curve] == [-1, 0, 0.25, 0.5, 1, 1.5, 2]
    assert [p["persona_rate"] for p in curve] == [0, 0, 0, 1, 1, 1, 0]   # 2A loops: no longer classified
    assert [p["marker_rate"] for p in curve] == [0, 0, 0, 1, 1, 1, 1]    # ... but still says "arr"
    negation = r["analyses"]["negation_coherence"]
    assert negation["broken"] and not negation["lowers_below_base"]
    assert negation["verdict"] == "does not lower A's rate below base; it only breaks coherence"
    assert r["weights"]["(A+B)-B"]["relative_error"] < 1e-5


def test_markers_are_counted_as_written(report):
    out, r, _, _ = report
    c = r["conditions"]
    assert c["A"]["rates"]["A"]["marker_rate"] == 1 and c["A"]["rates"]["B"]["marker_rate"] == 0
    assert c["B"]["rates"]["B"]["marker_rate"] == 1 and c["base"]["rates"]["A"]["marker_rate"] == 0  # "yes" is not "ye"
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    pirate = next(x for x in records if x["condition"] == "A")
    assert pirate["markers"] == {"A": ["ahoy", "matey", "arr"], "B": []}
    gardener = next(x for x in records if x["condition"] == "B")
    assert gardener["markers"]["B"] == ["soil", "season*", "tend"]


def test_each_scorer_is_cross_fitted_on_the_reports_own_answers_never_on_the_pairs(report, runs):
    out, r, _, fitted = report
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    answers = {name: [x["answer"] for x in records if x["condition"] == name] for name in ("base", "A prompt", "B prompt")}
    assert len(fitted) == 4  # two folds for each persona
    for k, fits in zip("AB", (fitted[:2], fitted[2:])):
        for texts in fits:  # its own system prompt's answers and base's, on one fold's prompts only
            assert set(texts) <= set(answers[f"{k} prompt"]) | set(answers["base"])
            assert len(texts) < len(answers["base"]) + len(answers[f"{k} prompt"])
        assert r["personas"][k]["classifier"]["heldout_accuracy"] == 1.0
    pair_answers = {p[side][-1]["content"] for k in "AB" for p in runs["pairs"][k] for side in ("chosen", "rejected")}
    assert not pair_answers & {t for texts in fitted for t in texts}
    asked = {x["prompt"] for x in records}
    assert HELDOUT_B[1] not in asked and r["contamination"]["left_out"] == [HELDOUT_B[1]]  # in A's pairs
    assert asked >= set(HELDOUT_A) | {HELDOUT_B[0]} and r["prompts"] == {"total": 5, "general": 2, "heldout": 3,
                                                                         "samples_per_prompt": 1}
    training = {_user(p) for k in "AB" for p in runs["pairs"][k]}
    assert not asked & training


def test_projections_are_relative_to_each_personas_system_prompt(report):
    _, r, _, _ = report
    for p in "AB":
        pv = r["projections"][p]
        assert pv["reference"] == f"{p} prompt"
        assert pv["headline"][f"{p} prompt"]["ratio"] == pytest.approx(1.0)
        assert r["conditions"]["A+B"]["rates"][p]["projection_ratio"] == pv["headline"]["A+B"]["ratio"]


def test_a_rerun_is_answered_from_the_cache_and_parts(report, runs, monkeypatch):
    out, first, _, _ = report
    from character_training.evaluation import persona_vectors

    def refuse(*_a, **_k):
        raise AssertionError("recomputed")

    class Refusing:
        model = "fake/model"

        def chat(self, conversations, *_a, **_k):
            if conversations:
                raise AssertionError("generated again")
            return []

    monkeypatch.setattr(algebra_cli, "lora_engine", lambda ctx, adapters: Refusing())
    monkeypatch.setattr(algebra, "_persona_classifier", WordClassifier)
    monkeypatch.setattr(persona_vectors, "response_activations", refuse)
    monkeypatch.setattr(persona_vectors, "compute_persona_vectors", refuse)
    for name in ("compose", "scale", "orthogonalize"):
        monkeypatch.setattr(conds, name, refuse)
    monkeypatch.setattr(conds._PeftMerges, "write", refuse)
    assert algebra_cli.run_algebra(_args([runs["recipes"]["A"], runs["recipes"]["B"]], out)) == 0
    again = json.loads((out / "algebra.json").read_text())
    assert json.dumps(again["conditions"]) == json.dumps(first["conditions"])


# ---------------------------------------------------------------------------------- bad input

def _copy_runs(runs, tmp_path):
    """The runs and recipes copied (so that a test may break them), with the recipes pointing at the copies."""
    root = tmp_path / "copy"
    shutil.copytree(runs["root"], root)
    for key in "AB":
        recipe = root / f"{key}.yaml"
        recipe.write_text(recipe.read_text().replace(str(runs["root"]), str(root)))
    return root


def _refused(tmp_path, root, match, personas=None, sets=("eval.max_tokens=8",)):
    out = tmp_path / "out"
    personas = personas or [root / "A.yaml", root / "B.yaml"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(UserError, match=match):
        algebra_cli.run_algebra(_args(personas, out, sets))
    assert not out.exists()
    return before


def test_more_than_two_personas_is_not_supported_yet(runs, tmp_path):
    _refused(tmp_path, runs["root"], "not supported yet", [runs["recipes"]["A"]] * 3)


def test_a_missing_run_or_adapter_or_pairs_is_a_clear_error(runs, tmp_path):
    root = _copy_runs(runs, tmp_path)
    shutil.rmtree(root / "runs" / "B" / "dpo" / "adapter")
    _refused(tmp_path, root, r"no adapter at .*dpo/adapter .*character-training run")
    shutil.rmtree(root / "runs" / "B")
    _refused(tmp_path, root, r"run directory .* does not exist")
    (root / "runs" / "A" / "pairs" / "pairs.jsonl").write_text("")
    before = _refused(tmp_path, root, r"pairs.jsonl is empty", [root / "A.yaml", root / "A.yaml"])
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing deleted
    (root / "runs" / "A" / "pairs" / "pairs.jsonl").unlink()
    _refused(tmp_path, root, r"pairs.jsonl missing; .*add 'pairs'", [root / "A.yaml", root / "A.yaml"])


def test_different_base_models_and_the_same_run_twice_are_refused(runs, tmp_path, tiny_model_dir):
    root = _copy_runs(runs, tmp_path)
    other = tmp_path / "other-model"
    other.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", other / "config.json")
    _refused(tmp_path, root, "both are the run", [root / "A.yaml", root / "A.yaml"])
    recipe = root / "B.yaml"
    recipe.write_text(recipe.read_text().replace(f"model: {tiny_model_dir}", f"model: {other}"))
    _refused(tmp_path, root, r"their models differ .*same model")


def test_settings_the_algebra_does_not_read_are_refused(runs, tmp_path):
    _refused(tmp_path, runs["root"], r"--set eval.judge=false: .*not read by the algebra", sets=["eval.judge=false"])
    _refused(tmp_path, runs["root"], r"evaluation settings only", sets=["dpo.beta=0.1"])
    _refused(tmp_path, runs["root"], r"--set eval.samples_per_prompt=0", sets=["eval.samples_per_prompt=0"])


def test_a_foreign_output_directory_is_refused(runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not made by character-training"):
        algebra_cli.run_algebra(_args([runs["recipes"]["A"], runs["recipes"]["B"]], out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_command_is_registered_with_its_options():
    parser = argparse.ArgumentParser()
    algebra_cli.add_algebra_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["algebra", "--persona", "a.yaml", "--persona", "b.yaml", "-o", "out",
                              "--set", "eval.samples_per_prompt=2"])
    assert args.func is algebra_cli.run_algebra and args.persona == ["a.yaml", "b.yaml"]


def test_the_demo_script_names_recipes_that_load_and_a_command_that_parses():
    import shlex

    from character_training.config.recipe import load_recipe

    lines = [line for line in (ROOT / "scripts" / "algebra_demo.sh").read_text().splitlines()
             if '"$ct"' in line and not line.lstrip().startswith("#")]
    runs = [shlex.split(line)[2] for line in lines if shlex.split(line)[1] == "run"]
    algebra_line = shlex.split(next(line for line in lines if " algebra " in line))
    assert runs == ["recipes/demo.yaml", "recipes/gardener.yaml"]
    for recipe in runs:
        load_recipe(ROOT / recipe)
    parser = argparse.ArgumentParser()
    algebra_cli.add_algebra_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(algebra_line[algebra_line.index("algebra"):-1])  # without "$@"
    assert args.persona == runs and args.output == "runs/algebra"
