"""Constitutions: who the character is, written as a YAML file.

A constitution has a ``name``, a prose ``description``, a list of ``traits`` (each a
first-person statement, an optional clarification, and seed user ``questions`` that draw the
trait out), optional ``principles`` (used for critique and judging) and optional ``facts``
(used for synthetic documents) and optional ``markers``: words or phrases the character uses and
a plain assistant rarely does, counted in its answers by the evaluation (config/markers.py).
``load_constitution`` validates a file and raises a
``ConstitutionError`` whose message is one line naming the file and the field. Besides types and
keys it refuses what would validate and still spoil a run: two traits (or two seed questions) that
differ only in case, spacing or punctuation (the teacher would be asked for the same trait twice),
and control characters other than tab, newline and carriage return in any text (a YAML escape
such as "\\0" or "\\e", or a JSON "\\u0000", writes one invisibly into every prompt built from it).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from character_training.config import yamlio
from character_training.config.yamlio import shown
from character_training.errors import UserError, did_you_mean
from character_training.config.prompts import render

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
TOP_KEYS = {
    "name": "a short slug such as 'captain-marlow' (lowercase letters, digits, '-' and '_')",
    "description": "prose: who the character is",
    "traits": "a list of traits, each with 'trait', 'questions' and an optional 'clarification'",
    "principles": "an optional list of principles the character would judge itself by",
    "facts": "an optional list of facts about the character (for synthetic documents)",
    "markers": "an optional list of words or phrases the character uses and a plain assistant rarely does "
               "(counted by the evaluation; a trailing '*' matches any ending)",
}
TRAIT_KEYS = ("trait", "clarification", "questions")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # control characters but tab, newline, CR


class ConstitutionError(UserError):
    """A constitution file that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class Trait:
    trait: str
    questions: tuple[str, ...]
    clarification: str | None = None


@dataclass(frozen=True)
class Constitution:
    name: str
    description: str
    traits: tuple[Trait, ...]
    principles: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data["traits"] = [
            {k: v for k, v in (("trait", t.trait), ("clarification", t.clarification),
                                ("questions", list(t.questions))) if v is not None}
            for t in self.traits
        ]
        for key in ("principles", "facts", "markers"):
            data[key] = list(data[key])
        return data

    @property
    def sha256(self) -> str:
        """Hash of the content (not the file's formatting or comments) that generation and
        training depend on: the markers are left out (only the evaluation reads them), so that
        declaring markers does not make a finished run's stages stale."""
        content = self.to_dict()
        content.pop("markers")
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def system_prompt(self) -> str:
        """The teacher's system prompt: the constitution in the character's own words."""
        return render("system_prompt.j2", c=self).strip()

    def seed_questions(self) -> dict[str, list[str]]:
        """Trait statement -> its seed questions (what data_gen's stages take)."""
        return {t.trait: list(t.questions) for t in self.traits}


def _fail(where: str, field_path: str, problem: str) -> ConstitutionError:
    return ConstitutionError(f"{where}: {field_path}: {problem}")


def _unknown_key(where: str, prefix: str, key: Any, allowed: list[str]) -> ConstitutionError:
    plain = len(str(key)) <= 60 and str(key).isprintable()
    hint = did_you_mean(key, allowed) if plain else ""
    return _fail(where, f"{prefix}{key if plain else shown(key, 60)}",
                 f"unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _text(value: Any, where: str, field_path: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "empty text" if isinstance(value, str) else f"a {type(value).__name__}"
        raise _fail(where, field_path, f"must be non-empty text ({what}), got {got}")
    if (bad := CONTROL_RE.search(value)) is not None:
        raise _fail(where, field_path, f"contains the control character {yamlio.char_name(bad.group())} (character "
                    f"{bad.start() + 1}); remove it: only tab, newline and carriage return are allowed in text "
                    "(a YAML escape such as \"\\0\" or \"\\e\", or a JSON \"\\u0000\", writes one)")
    return value.strip()


def _same_text(text: str) -> str:
    """What two texts that say the same thing share: case, spacing and punctuation dropped (any
    script: a question in Chinese keeps its characters)."""
    key = " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())
    return key or " ".join(text.casefold().split())


def _text_list(value: Any, where: str, field_path: str, what: str, required: bool) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        got = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise _fail(where, field_path, f"must be a non-empty list of {what}, got {got}")
    return tuple(_text(v, where, f"{field_path}[{i}]", what) for i, v in enumerate(value))


def constitution_from_dict(data: Any, where: str = "<constitution>") -> Constitution:
    """Validate parsed YAML/JSON data; ``where`` (the file) prefixes every error."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise _fail(where, "<top level>", f"must be a mapping with keys {', '.join(TOP_KEYS)}; got {got}")
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown_key(where, "", key, list(TOP_KEYS))
    for key in ("name", "description", "traits"):
        if key not in data:
            raise _fail(where, key, f"missing; add {key}: {TOP_KEYS[key]}")
    name = _text(data["name"], where, "name", TOP_KEYS["name"])
    if not NAME_RE.match(name):
        raise _fail(where, "name", f"{shown(name, 60)} is not a slug; use lowercase letters, digits, '-' and '_'")
    description = _text(data["description"], where, "description", TOP_KEYS["description"])
    raw_traits = data["traits"]
    if not isinstance(raw_traits, list) or not raw_traits:
        got = "an empty list" if isinstance(raw_traits, list) else f"a {type(raw_traits).__name__}"
        raise _fail(where, "traits", f"must be a non-empty list of traits, got {got}")
    traits = []
    for i, raw in enumerate(raw_traits):
        path = f"traits[{i}]"
        if not isinstance(raw, dict):
            raise _fail(where, path, f"must be a mapping with keys {', '.join(TRAIT_KEYS)}, got a {type(raw).__name__}")
        for key in raw:
            if key not in TRAIT_KEYS:
                raise _unknown_key(where, f"{path}.", key, list(TRAIT_KEYS))
        if "trait" not in raw:
            raise _fail(where, f"{path}.trait", "missing; add the trait as a first-person statement ('I ...')")
        if "questions" not in raw:
            raise _fail(where, f"{path}.questions", "missing; add seed user questions that draw this trait out")
        clarification = raw.get("clarification")
        traits.append(Trait(
            trait=_text(raw["trait"], where, f"{path}.trait", "a first-person statement"),
            questions=_text_list(raw["questions"], where, f"{path}.questions", "user questions", required=True),
            clarification=None if clarification is None
            else _text(clarification, where, f"{path}.clarification", "a clarification of the trait"),
        ))
    seen: dict[str, int] = {}
    questions: dict[str, str] = {}
    for i, t in enumerate(traits):
        if (first := seen.get(_same_text(t.trait))) is not None:
            how = "" if t.trait == traits[first].trait else (
                f" ({shown(traits[first].trait, 60)} and {shown(t.trait, 60)} differ only in case, spacing or "
                "punctuation)")
            raise _fail(where, f"traits[{i}].trait", f"duplicates traits[{first}].trait{how}; give each trait once "
                        "(move its questions to the first)")
        seen[_same_text(t.trait)] = i
        for j, q in enumerate(t.questions):
            key = _same_text(q)
            if key in questions:
                raise _fail(where, f"traits[{i}].questions[{j}]", f"repeats {questions[key]}; each seed question once")
            questions[key] = f"traits[{i}].questions[{j}]"
    return Constitution(
        name=name,
        description=description,
        traits=tuple(traits),
        principles=_text_list(data.get("principles"), where, "principles", "principles", required=False),
        facts=_text_list(data.get("facts"), where, "facts", "facts", required=False),
        markers=_markers(data.get("markers"), where),
        path=None if where.startswith("<") else where,
    )


def _markers(value: Any, where: str) -> tuple[str, ...]:
    from character_training.config.markers import check_marker

    markers = _text_list(value, where, "markers", "marker words or phrases", required=False)
    for i, marker in enumerate(markers):
        if (problem := check_marker(marker)) is not None:
            raise _fail(where, f"markers[{i}]", f"{shown(marker, 60)} {problem}")
    if len(set(m.lower() for m in markers)) < len(markers):
        raise _fail(where, "markers", "lists a marker twice (markers match case-insensitively); list each once")
    return markers


def _read_yaml(path: Path) -> Any:
    try:
        text = yamlio.read_text(path, "constitution", "check the path (shipped constitutions are in constitutions/)")
    except UserError as exc:
        raise ConstitutionError(str(exc)) from None
    try:
        return yamlio.load(text)
    except yaml.YAMLError as exc:
        loc, problem = yamlio.describe_error(exc)
        fix = "" if ";" in problem else "; fix the syntax at that line"  # yamlio's own problems say their fix
        raise ConstitutionError(f"{path}{loc}: not valid YAML: {problem}{fix}") from None


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    data = _read_yaml(path)
    check_placeholders(data, str(path))
    return constitution_from_dict(data, where=str(path))


def _template_placeholders() -> dict[str, str]:
    """The text values ``constitution new`` writes for the user to replace, normalized -> as written."""
    data = yamlio.load(template("placeholder"))
    values: list[str] = [data["description"]]
    for t in data["traits"]:
        values += [t["trait"], t.get("clarification") or "", *t["questions"]]
    values += [*(data.get("principles") or []), *(str(f) for f in data.get("facts") or [])]
    return {" ".join(v.split()).lower(): v.strip() for v in values if v and v.strip()}


def check_placeholders(data: Any, where: str) -> None:
    """A constitution still holding the text ``constitution new`` wrote is refused: it would
    validate, and a run would train a persona on 'I ... (a first-person statement of the trait)'."""
    if not isinstance(data, dict):
        return
    placeholders = _template_placeholders()
    found: list[tuple[str, Any]] = [("description", data.get("description"))]
    traits = data.get("traits") if isinstance(data.get("traits"), list) else []
    for i, t in enumerate(traits):
        if isinstance(t, dict):
            found += [(f"traits[{i}].trait", t.get("trait")), (f"traits[{i}].clarification", t.get("clarification"))]
            questions = t.get("questions") if isinstance(t.get("questions"), list) else []
            found += [(f"traits[{i}].questions[{j}]", q) for j, q in enumerate(questions)]
    for key in ("principles", "facts"):
        values = data.get(key) if isinstance(data.get(key), list) else []
        found += [(f"{key}[{j}]", v) for j, v in enumerate(values)]
    for field_path, value in found:
        if isinstance(value, (str, int, float)) and " ".join(str(value).split()).lower() in placeholders:
            raise _fail(where, field_path, f"still the template's placeholder ({str(value).strip()[:60]!r}); "
                        "replace it with your character's own text, or remove the entry if it is optional")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def import_open_character_training(path: str | Path, name: str | None = None,
                                   description: str | None = None) -> Constitution:
    """Convert the Open Character Training JSON list (``[{"trait", "questions", "clarification"?}]``)."""
    path = Path(path)
    try:
        text = yamlio.read_text(path, "traits file", "check the path")
    except UserError as exc:
        raise ConstitutionError(str(exc)) from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ConstitutionError(f"{path}: duplicate key '{exc.args[0]}' in one object (JSON keeps only the "
                                "last); give each key once") from None
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConstitutionError(f"{path}: nested too deeply to read; the file should be a flat JSON list of "
                                "{\"trait\": ..., \"questions\": [...]} objects") from None
    if not isinstance(data, list):
        raise ConstitutionError(f"{path}: <top level>: expected a JSON list of {{\"trait\": ..., \"questions\": [...]}} objects, got a {type(data).__name__}")
    slug = name or re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_") or "imported"
    if description is None:
        description = (f"A character defined by {len(data)} traits, imported from {path.name}. "
                       "Replace this with a prose description of who the character is.")
    return constitution_from_dict(
        {"name": slug, "description": description, "traits": data}, where=str(path))


def dump_constitution(c: Constitution) -> str:
    """YAML text of a constitution (block style, readable)."""
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    data = c.to_dict()
    for key in ("principles", "facts", "markers"):
        if not data[key]:
            data.pop(key)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def template(name: str) -> str:
    """A commented constitution template to fill in (`constitution new NAME`)."""
    if not NAME_RE.match(name):
        raise UserError(f"'{name}' is not a valid constitution name; use lowercase letters, digits, '-' and '_'")
    return render("constitution_template.yaml.j2", name=name)
