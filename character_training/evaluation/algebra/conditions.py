"""The persona-algebra report's conditions, and the adapters they need (``character-training algebra``).

Two personas, A and B, each with its trained adapter. Every condition answers the same prompts:

  base                   the base model, no system prompt
  A prompt, B prompt     the base model with that persona's constitution as system prompt
  A, B                   each persona's own adapter
  A+B                    the exact sum of the two deltas (adapters.algebra.compose, rank r_A + r_B)
  0.25A ... 2B           each adapter scaled (dose-response; weight 0 is base, 1 the adapter itself)
  -A                     A negated
  (A+B)-B                A+B composed with B at -1: the same delta as A, through two operations
  A⊥B, A⊥B+B             A with the part of its delta in B's output space removed; alone and plus B
  PEFT linear|cat|ties   PEFT's add_weighted_adapter of A and B at weights 1, 1 (the library's sums)
  A+B rank K             A+B re-compressed to its best rank-K approximation, per module

The adapters are written under ``OUT/adapters/`` as PEFT adapter directories vLLM loads. Each
build is recorded in ``OUT/adapters/built.json`` with the sha256 of its inputs: a rerun skips what
is built already from the same inputs, and rebuilds (only adapters this tool wrote) what is not.

``weight_check`` says, from the factors alone (no out x in matrix), how far each built delta is
from the delta its name promises: ~1e-7 for the exact operations, the truncation error for the
re-compressed ones, and PEFT's linear and ties for what they are (approximations).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from character_training.adapters.algebra import compose, concatenate, frobenius_norm, inner_product, one_thread
from character_training.adapters.algebra import orthogonalize, scale
from character_training.adapters.io import (WEIGHTS_FILE, Adapter, Factors, adapter_input, load_adapter,
                                            save_adapter)
from character_training.adapters.outputs import written_here
from character_training.card import ModelCard
from character_training.errors import UserError
from character_training.util import file_sha256

WEIGHTS = (0.25, 0.5, 1.5, 2.0)   # dose-response; 0 is the base model and 1 the adapter itself (not regenerated)
RANKS = (4, 8, 16)                # A+B re-compressed to these ranks
PEFT_METHODS = ("linear", "cat", "ties")
TIES_DENSITY = 0.5                # TIES keeps this share of each factor's entries (PEFT requires a density)
ORTHOGONAL_SIDE = "output"        # adapters.algebra.orthogonalize's default
BUILT_FILE = "built.json"
PERSONAS = ("A", "B")


@dataclass(frozen=True)
class Spec:
    """One condition. ``terms``: the conditions whose adapters it is made of, with their weights;
    ``equals``: the delta it should equal, when that is not ``terms`` (``(A+B)-B`` equals A)."""
    name: str
    kind: str                      # base | prompt | adapter | scale | compose | orthogonalize | peft
    slug: str | None = None        # its directory under OUT/adapters/ (built kinds only)
    terms: tuple[tuple[str, float], ...] = ()
    rank: int | None = None        # compose: re-compress to this rank
    method: str | None = None      # peft: combination_type
    persona: str | None = None     # prompt: whose system prompt; scale: whose adapter (dose-response)
    weight: float | None = None    # dose-response: the weight on ``persona``'s adapter
    equals: tuple[tuple[str, float], ...] | None = None

    @property
    def built(self) -> bool:
        return self.slug is not None

    @property
    def expected(self) -> tuple[tuple[str, float], ...]:
        """The delta this condition's adapter should equal (empty: no such promise)."""
        if self.equals is not None:
            return self.equals
        return () if self.kind in ("base", "prompt", "orthogonalize") else self.terms


def algebra_specs(weights=WEIGHTS, ranks=RANKS, peft_methods=PEFT_METHODS) -> list[Spec]:
    """Every condition of the report, in the order it is generated and shown."""
    both = (("A", 1.0), ("B", 1.0))
    specs = [Spec("base", "base", weight=0.0),
             *(Spec(f"{p} prompt", "prompt", persona=p) for p in PERSONAS),
             *(Spec(p, "adapter", terms=((p, 1.0),), persona=p, weight=1.0) for p in PERSONAS),
             Spec("A+B", "compose", "a_plus_b", both)]
    for p in PERSONAS:
        specs += [Spec(f"{w:g}{p}", "scale", f"{p.lower()}_x{w:g}", ((p, w),), persona=p, weight=w) for w in weights]
    specs += [Spec("-A", "scale", "minus_a", (("A", -1.0),), persona="A", weight=-1.0),
              Spec("(A+B)-B", "compose", "a_plus_b_minus_b", (("A+B", 1.0), ("B", -1.0)), equals=(("A", 1.0),)),
              Spec("A⊥B", "orthogonalize", "a_orth_b", both),
              Spec("A⊥B+B", "compose", "a_orth_b_plus_b", (("A⊥B", 1.0), ("B", 1.0)))]
    specs += [Spec(f"PEFT {m}", "peft", f"peft_{m}", both, method=m) for m in peft_methods]
    specs += [Spec(f"A+B rank {k}", "compose", f"a_plus_b_rank{k}", both, rank=k) for k in ranks]
    return specs


def spec_named(specs: list[Spec], name: str) -> Spec | None:
    return next((s for s in specs if s.name == name), None)


# ------------------------------------------------------------------------------------ building

def build_adapters(specs: list[Spec], personas: dict[str, str | Path], out: Path, model_path: str,
                   log: Callable[[str], None] = print) -> tuple[dict[str, str], dict[str, dict], dict[str, str]]:
    """({condition: adapter directory}, {condition: what its operation reported}, {condition: why it
    was skipped}) for the adapter conditions. ``personas``: {"A": dir, "B": dir}. A PEFT combination
    PEFT refuses (e.g. linear of unequal ranks) is skipped with PEFT's reason, as is any condition
    built from a skipped one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {p: str(personas[p]) for p in PERSONAS}
    built_file = out / BUILT_FILE
    record = json.loads(built_file.read_text(encoding="utf-8")) if built_file.is_file() else {}
    reports, skipped = {}, {}
    merges = _PeftMerges(model_path, out)
    try:
        for spec in (s for s in specs if s.built):
            missing = [t for t, _ in spec.terms if t not in paths]
            if missing:
                skipped[spec.name] = f"built from {', '.join(missing)}, which was skipped"
                continue
            inputs = [paths[t] for t, _ in spec.terms]
            key = _key(spec.kind, spec.terms, spec.rank, spec.method,
                       [file_sha256(Path(p) / WEIGHTS_FILE) for p in inputs])
            target = out / spec.slug
            if record.get(spec.slug, {}).get("key") == key and written_here(target):
                log(f"[algebra] adapter {spec.name}: built already ({target})")
            else:
                if target.exists() and not written_here(target):
                    raise UserError(f"{target}: exists but is not an adapter this command wrote; nothing was changed; "
                                    f"move it away, or give -o a new directory")
                log(f"[algebra] adapter {spec.name} -> {target}")
                try:
                    report = _build(spec, inputs, target, merges)
                except _Refused as exc:
                    skipped[spec.name] = str(exc)
                    log(f"[algebra] skipping {spec.name}: {exc}")
                    continue
                record[spec.slug] = {"condition": spec.name, "key": key, "report": report}
                built_file.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            paths[spec.name] = str(target)
            reports[spec.name] = record[spec.slug]["report"]
    finally:
        merges.close()
    return {s.name: paths[s.name] for s in specs if s.name in paths and s.kind != "base"}, reports, skipped


class _Refused(Exception):
    """A combination the library refuses for these adapters (the report skips it and says why)."""


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(spec: Spec, inputs: list[str], target: Path, merges: "_PeftMerges") -> dict:
    overwrite = target.exists()
    if spec.kind == "scale":
        return _brief(scale(inputs[0], spec.terms[0][1], target, overwrite=overwrite))
    if spec.kind == "compose":
        return _brief(compose(list(zip(inputs, (w for _, w in spec.terms))), target, rank=spec.rank,
                              overwrite=overwrite))
    if spec.kind == "orthogonalize":
        return _brief(orthogonalize(inputs[0], inputs[1:], target, side=ORTHOGONAL_SIDE, overwrite=overwrite))
    if spec.kind == "peft":
        return merges.write(spec, inputs, target, overwrite)
    raise ValueError(f"condition {spec.name}: kind {spec.kind} is not built")


def _brief(report: dict) -> dict:
    """An operation's report without its per-module detail."""
    return {k: v for k, v in report.items() if k not in ("per_module", "per_layer")}


class _PeftMerges:
    """PEFT's ``add_weighted_adapter`` on the persona adapters, written as PEFT adapter directories in
    this package's canonical form (scaling folded into the factors, a model card); the base model is
    loaded once, when the first combination is needed."""

    def __init__(self, model_path: str, out: Path):
        self.model_path, self.tmp, self.model, self.loaded = model_path, out / ".peft-tmp", None, {}

    def _model(self, inputs: list[str]):
        if self.model is None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
            self.model = PeftModel.from_pretrained(base, inputs[0], adapter_name="in0")
            self.loaded = {inputs[0]: "in0"}
        for path in inputs:
            if path not in self.loaded:
                self.loaded[path] = f"in{len(self.loaded)}"
                self.model.load_adapter(path, adapter_name=self.loaded[path])
        return self.model

    def write(self, spec: Spec, inputs: list[str], target: Path, overwrite: bool) -> dict:
        model = self._model(inputs)
        name = f"merged_{spec.slug}"
        extra = {"density": TIES_DENSITY} if spec.method == "ties" else {}
        try:
            model.add_weighted_adapter([self.loaded[p] for p in inputs], [w for _, w in spec.terms], name,
                                       combination_type=spec.method, **extra)
        except (ValueError, TypeError) as exc:
            raise _Refused(f"PEFT's add_weighted_adapter({spec.method}) refused these adapters: {exc}") from None
        shutil.rmtree(self.tmp, ignore_errors=True)
        model.save_pretrained(self.tmp, selected_adapters=[name])
        model.delete_adapter(name)
        merged = load_adapter(self.tmp / name)
        modules = {n: Factors(B=f.B, A=f.A * f.scaling, embedding=f.embedding) for n, f in merged.modules.items()}
        sources = [load_adapter(p) for p in inputs]
        formula = " + ".join(f"{w:g} * {Path(p).name}" for p, (_, w) in zip(inputs, spec.terms))
        density = f", density={TIES_DENSITY}" if extra else ""
        card = ModelCard(kind=f"peft-{spec.method}", title=f"PEFT {spec.method} combination",
                         operation=f"peft add_weighted_adapter(combination_type={spec.method!r}{density})",
                         summary=f"PEFT's add_weighted_adapter of {formula} with combination_type '{spec.method}', "
                                 "re-saved with the scaling folded into the factors (the same delta).",
                         inputs=tuple(adapter_input(a, w) for a, (_, w) in zip(sources, spec.terms)))
        save_adapter(target, modules, like=merged, card=card, overwrite=overwrite)
        shutil.rmtree(self.tmp, ignore_errors=True)
        ranks = [f.rank for f in modules.values()]
        return {"operation": f"peft {spec.method}", "inputs": inputs, "weights": [w for _, w in spec.terms],
                "modules": len(modules), "rank": [min(ranks), max(ranks)],
                **({"density": TIES_DENSITY} if extra else {})}

    def close(self) -> None:
        self.model = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ weight check

def weight_check(specs: list[Spec], adapters: dict[str, str]) -> dict[str, dict]:
    """Per adapter condition: its rank, and how far its delta is from the one its name promises
    (relative Frobenius error over all modules, from the factors); for A⊥B, its cosine with B
    (overall and the largest per module), which orthogonalization makes 0."""
    loaded: dict[str, Adapter] = {}

    def get(name: str) -> Adapter:
        if name not in loaded:
            loaded[name] = load_adapter(adapters[name])
        return loaded[name]

    found = {}
    with one_thread():
        for spec in specs:
            if spec.name not in adapters:
                continue
            x = get(spec.name)
            cell = {"rank": max(f.rank for f in x.modules.values())}
            expected = spec.expected if spec.built else ()
            if expected and all(n in adapters for n, _ in expected):
                cell["equals"] = _formula(expected)
                cell["relative_error"] = _relative_error(x, [(get(n), w) for n, w in expected])
            if spec.kind == "orthogonalize":
                cell.update(_cosines(x, get(spec.terms[1][0])))
            found[spec.name] = cell
    return found


def _formula(terms) -> str:
    """(("A", 1.0), ("B", -0.5)) -> "A-0.5B"."""
    text = ""
    for i, (name, w) in enumerate(terms):
        sign = "-" if w < 0 else ("+" if i else "")
        text += f"{sign}{'' if abs(w) == 1 else f'{abs(w):g}'}{name}"
    return text


def _relative_error(x: Adapter, terms: list[tuple[Adapter, float]]) -> float:
    """||dW_x - sum w_i dW_i|| / ||sum w_i dW_i|| over all modules (Frobenius), from the factors."""
    names = set(x.modules) | {n for a, _ in terms for n in a.modules}
    diff = norm = 0.0
    for name in names:
        target = concatenate((a.modules[name], w) for a, w in terms if name in a.modules)
        parts = [(x.modules[name], 1.0)] if name in x.modules else []
        if target is not None:
            parts.append((target, -1.0))
            norm += frobenius_norm(target) ** 2
        d = concatenate(parts)
        diff += frobenius_norm(d) ** 2 if d is not None else 0.0
    return math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def _cosines(x: Adapter, other: Adapter) -> dict:
    """The cosine of two deltas over all modules, and the largest per module (in absolute value)."""
    dot, worst = 0.0, 0.0
    for name, f in x.modules.items():
        if name in other.modules:
            g = other.modules[name]
            ip, fn, gn = inner_product(f, g), frobenius_norm(f), frobenius_norm(g)
            dot += ip
            worst = max(worst, abs(ip) / (fn * gn) if fn > 0 and gn > 0 else 0.0)
    nx = math.sqrt(sum(frobenius_norm(f) ** 2 for f in x.modules.values()))
    no = math.sqrt(sum(frobenius_norm(g) ** 2 for g in other.modules.values()))
    return {"cosine_with_B": dot / (nx * no) if nx > 0 and no > 0 else 0.0, "max_module_cosine_with_B": worst}
