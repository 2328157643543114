"""The off-target trait bank: behaviours a persona is not meant to have (sycophancy, hostility,
fabrication, needless refusal, ...), each a small constitution, shipped in
``character_training/data/off_target_traits.yaml``.

A trait holds a name, a one-line description, a system prompt that makes the base model show
it, user prompts where it would show (its vector and classifier are fitted on the answers to
these) and open questions (never fitted on, only measured). The side-effect report
(evaluation/side_effects.py) and the ``screen:`` setting of the training stages
(run/screening.py) name traits from here; the recipe's names are checked here, before any
stage starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from character_training.config import yamlio
from character_training.errors import UserError, did_you_mean

BANK = "off_target_traits.yaml"
FIELDS = ("name", "description", "system_prompt", "prompts", "open_questions")
MIN_PROMPTS, MIN_OPEN = 4, 2  # two folds of prompts, each holding both sides; two folds of open questions


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    system_prompt: str
    prompts: tuple[str, ...]
    open_questions: tuple[str, ...]

    def as_dict(self) -> dict:
        """Everything a trait's answers depend on (its cache key holds this)."""
        return {"name": self.name, "system_prompt": self.system_prompt, "prompts": list(self.prompts),
                "open_questions": list(self.open_questions)}


def load_bank(text: str | None = None, where: str = BANK) -> dict[str, Trait]:
    """{name: Trait} in the file's order: the shipped bank, or ``text`` (a bank's YAML)."""
    if text is None:
        text = (resources.files("character_training") / "data" / BANK).read_text(encoding="utf-8")
    try:
        entries = yamlio.load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({yamlio.describe_error(exc)[1]})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: a list of traits expected (each with {', '.join(FIELDS)}); "
                        f"got {yamlio.shown(entries)}")
    bank: dict[str, Trait] = {}
    for n, entry in enumerate(entries, 1):
        trait = _trait(entry, f"{where}: trait {n}")
        if trait.name in bank:
            raise UserError(f"{where}: trait {n}: the name {trait.name!r} is already used by an earlier trait; "
                            "give each trait its own name")
        bank[trait.name] = trait
    return bank


def _trait(entry, where: str) -> Trait:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: is {yamlio.shown(entry)}, not a mapping; give {', '.join(FIELDS)}")
    name = entry.get("name")
    where = f"{where} ({name})" if isinstance(name, str) and name.strip() else where
    unknown = [k for k in entry if k not in FIELDS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], FIELDS)}; "
                        f"a trait has {', '.join(FIELDS)}")
    for key in ("name", "description", "system_prompt"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise UserError(f"{where}: {key}: missing or empty; give it as text")
    lists = {}
    for key, least in (("prompts", MIN_PROMPTS), ("open_questions", MIN_OPEN)):
        values = entry.get(key)
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise UserError(f"{where}: {key}: give a list of non-empty questions (at least {least})")
        values = [v.strip() for v in values]
        if len(values) < least:
            raise UserError(f"{where}: {key}: {len(values)} given; give at least {least} (the classifier is "
                            "cross-fitted over two folds of them)")
        lists[key] = tuple(values)
    every = [*lists["prompts"], *lists["open_questions"]]
    repeated = sorted({q for q in every if every.count(q) > 1})
    if repeated:
        raise UserError(f"{where}: {repeated[0]!r} is asked twice; each prompt and open question once")
    return Trait(entry["name"].strip(), entry["description"].strip(), entry["system_prompt"].strip(),
                 lists["prompts"], lists["open_questions"])


def select_traits(names, where: str, bank: dict[str, Trait] | None = None) -> list[Trait]:
    """The traits ``names`` asks for (None or True: every trait of the bank), each once, in the
    order given; an unknown name is a UserError naming ``where`` (the setting) and the bank's names."""
    bank = load_bank() if bank is None else bank
    if names is None or names is True:
        return list(bank.values())
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise UserError(f"{where}: {yamlio.shown(names)}; give a list of off-target traits, some of "
                        f"{', '.join(bank)} (or true for all of them)")
    for name in names:
        if name not in bank:
            raise UserError(f"{where}: unknown off-target trait {name!r}{did_you_mean(name, bank)}; the bank "
                            f"({BANK}) has {', '.join(bank)}")
    return [bank[n] for n in dict.fromkeys(names)]
