"""Introspection: the character writes about itself and talks with itself (as in Open
Character Training's self-reflection and self-interaction stages).

Self-reflection: each prompt of a list (``templates/reflection_prompts.yaml`` or the user's own)
is answered ``samples_per_prompt`` times by the character: the constitution's system prompt on a
base model, or a trained persona adapter answering unprompted. Writes ``reflection.jsonl``.

Self-interaction: two instances, A and B, of the character talk. B's opener starts each
conversation; A and B then alternate, each seeing the conversation from its own side (its own
messages as ``assistant``, the other's as ``user``) under a system prompt that says it is talking
to another instance of itself. All conversations' turn t is one batch. An unusable turn ends its
conversation there (truncated); one with fewer than ``min_exchanges`` usable turns is dropped.
Writes ``interaction.jsonl``: each conversation from A's side (and B's).

Both write TRL's conversational SFT format, ``{"messages": [...]}``, with no system message,
starting with a user turn, alternating, and ending with the character's (assistant) turn: so
training teaches the character unprompted, and ``assistant_only_loss`` trains exactly its turns.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2
import yaml

from data_gen.backends import Backend, Completion, Sampling
from data_gen.errors import UserError
from data_gen.filters import completion_problem, strip_boilerplate
from data_gen.store import CONVERSATIONS, write_jsonl
from data_gen.templating import TEMPLATES, environment, render

REFLECTION_PROMPTS = TEMPLATES / "reflection_prompts.yaml"
INTERACTION_OPENERS = TEMPLATES / "interaction_openers.yaml"


@dataclass(frozen=True)
class ReflectionSettings:
    """The reflection stage's settings: the recipe's ``reflection`` section (with ``sampling``, ``adapter``)."""

    samples_per_prompt: int = 2        # answers generated per reflection prompt
    prompts_file: str | None = None    # YAML mapping prompt id -> text; None: the shipped list
    use_system_prompt: bool = True     # answer under the constitution's system prompt; False with a trained adapter
    min_words: int = 30                # shorter answers are dropped ("too_short")
    min_distinct_3grams: float = 0.5   # share of distinct word 3-grams below which an answer loops

    def __post_init__(self):
        _at_least("samples_per_prompt", self.samples_per_prompt, 1)
        _at_least("min_words", self.min_words, 0)
        _share("min_distinct_3grams", self.min_distinct_3grams)


@dataclass(frozen=True)
class InteractionSettings:
    """The interaction stage's settings: the recipe's ``interaction`` section (with ``sampling``, ``adapter``)."""

    conversations: int = 8             # conversations between two instances of the character
    turns: int = 6                     # generated messages per conversation (A, B, A, ...), after B's opener
    openers: tuple[str, ...] | None = None  # first lines, said by B; None: templates/interaction_openers.yaml
    use_system_prompt: bool = True     # include the constitution's system prompt; False with a trained adapter
    both_perspectives: bool = True     # also write each conversation from B's side
    min_exchanges: int = 2             # usable generated turns a conversation needs to be kept
    min_words: int = 3                 # shorter turns are unusable ("too_short")
    min_distinct_3grams: float = 0.5   # share of distinct word 3-grams below which a turn loops

    def __post_init__(self):
        _at_least("conversations", self.conversations, 1)
        _at_least("turns", self.turns, 2)
        _at_least("min_exchanges", self.min_exchanges, 2)
        _at_least("min_words", self.min_words, 0)
        _share("min_distinct_3grams", self.min_distinct_3grams)
        if self.min_exchanges > self.turns:
            raise UserError(f"min_exchanges: {self.min_exchanges} is more than turns ({self.turns}), so every "
                            "conversation would be dropped; lower it or raise turns")


# The stages' default sampling (a recipe's sampling: overrides some of its keys).
# What each stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
REFLECTION_OUTPUTS = {CONVERSATIONS: "reflection.jsonl"}
INTERACTION_OUTPUTS = {CONVERSATIONS: "interaction.jsonl"}
REFLECTION_SAMPLING = Sampling(temperature=0.8, max_tokens=300)
INTERACTION_SAMPLING = Sampling(temperature=0.8, max_tokens=160)


def _at_least(key: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{key}: {value!r}; give a whole number >= {low}")


def _share(key: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{key}: {value!r}; give a share from 0 to 1 (0 keeps looping texts)")


def display_name(constitution) -> str:
    """The character's name as text: the slug 'captain-marlow' reads 'Captain Marlow'."""
    return re.sub(r"[-_]+", " ", constitution.name).strip().title()


def _render_text(text: str, name: str, where: str) -> str:
    """A prompt from a list, rendered with ``{{ name }}``; a template error names where it is."""
    try:
        return environment(str(TEMPLATES)).from_string(text).render(name=name).strip()
    except jinja2.TemplateError as exc:
        raise UserError(f"{where}: cannot render the text ({exc}); the only variable is {{{{ name }}}}") from None


def _load_yaml(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found; check the path (relative paths start at the "
                        f"current directory)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{loc}: not valid YAML ({problem}); fix the file") from None


def load_reflection_prompts(path: str | Path | None, name: str) -> dict[str, str]:
    """Prompt id -> rendered prompt text, from a YAML mapping (None: the shipped list)."""
    path = Path(path) if path is not None else REFLECTION_PROMPTS
    data = _load_yaml(path, "reflection prompts")
    if not isinstance(data, dict) or not data:
        got = "an empty file" if not data else f"a {type(data).__name__}"
        raise UserError(f"{path}: must be a non-empty YAML mapping of prompt id -> prompt text "
                        f"(e.g. `diary: Write a diary entry about your day.`), got {got}")
    prompts = {}
    for key, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}: prompt '{key}': must be non-empty text, got {text!r}")
        prompts[str(key)] = _render_text(text, name, f"{path}: prompt '{key}'")
    return prompts


def load_openers(openers, name: str) -> list[str]:
    """Rendered openers from the settings' list, or the shipped file when it is None."""
    where = "interaction.openers"
    if openers is None:
        where = str(INTERACTION_OPENERS)
        openers = _load_yaml(INTERACTION_OPENERS, "openers")
    if isinstance(openers, str) or not isinstance(openers, (list, tuple)) or not openers:
        raise UserError(f"{where}: must be a non-empty list of opening lines, got {openers!r}")
    for i, text in enumerate(openers):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}[{i}]: must be non-empty text, got {text!r}")
    return [_render_text(text, name, f"{where}[{i}]") for i, text in enumerate(openers)]


def _word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _usable(c: Completion, min_words: int, min_distinct_3grams: float) -> tuple[str | None, str]:
    """(why the generation cannot be used or None, its cleaned text)."""
    problem = completion_problem(c, min_distinct_3grams=min_distinct_3grams, refusals=True)
    text = strip_boilerplate(c.text) if problem is None else ""
    if problem is None and _word_count(text) < max(1, min_words):
        problem = "too_short"
    return problem, text


def _manifest(stage: str, backend: Backend, seed: int, sampling: Sampling, settings, adapter: str | None,
              system_prompt: str | None) -> dict:
    return {"stage": stage, "model": backend.model, "seed": seed, "sampling": sampling.to_dict(),
            "settings": asdict(settings), "adapter": adapter,
            "system_prompt_used": system_prompt is not None, "system_prompt": system_prompt}


# ============================================================================= self-reflection


def run_reflection(backend: Backend, constitution, out_dir: Path, *,
                   settings: ReflectionSettings = ReflectionSettings(),
                   sampling: Sampling = REFLECTION_SAMPLING,
                   seed: int = 0, adapter: str | None = None) -> dict:
    prompts = load_reflection_prompts(settings.prompts_file, display_name(constitution))
    system_prompt = constitution.system_prompt() if settings.use_system_prompt else None
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    owners = [pid for pid in prompts for _ in range(settings.samples_per_prompt)]
    completions = backend.chat([head + [{"role": "user", "content": prompts[pid]}] for pid in owners],
                               sampling, adapter=adapter, desc="self-reflection")

    drops: Counter = Counter()
    seen: set[str] = set()
    records = []
    for pid, completion in zip(owners, completions):
        problem, text = _usable(completion, settings.min_words, settings.min_distinct_3grams)
        if problem is None and text in seen:
            problem = "duplicate"
        if problem:
            drops[problem] += 1
            continue
        seen.add(text)
        records.append({"messages": [{"role": "user", "content": prompts[pid]},
                                     {"role": "assistant", "content": text}],
                        "source": "reflection", "prompt_id": pid})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / REFLECTION_OUTPUTS[CONVERSATIONS], records)
    return {
        **_manifest("reflection", backend, seed, sampling, settings, adapter, system_prompt),
        "prompts_file": str(settings.prompts_file or REFLECTION_PROMPTS),
        "counts": {"prompts": len(prompts), "generated": len(completions), "records": len(records),
                   "dropped": len(completions) - len(records),
                   "tokens": sum(c.num_tokens for c in completions)},
        "drops": dict(drops),
    }


# ============================================================================= self-interaction


def perspective(opener: str, turns: list[str], speaker: str) -> list[dict]:
    """The conversation as ``speaker`` ("A" or "B") sees it: its own turns as assistant, the
    other's as user. A answers B's opener, so A's side starts with it; B's side starts with A's
    first turn (the opener is B's, but not generated)."""
    messages = [{"role": "user", "content": opener}] if speaker == "A" else []
    mine = 0 if speaker == "A" else 1  # A says turns 0, 2, 4, ...; B says 1, 3, 5, ...
    messages += [{"role": "assistant" if i % 2 == mine else "user", "content": text}
                 for i, text in enumerate(turns)]
    return messages


def training_record(messages: list[dict]) -> list[dict]:
    """The messages without a trailing user turn: training ends on the character's turn."""
    return messages[:-1] if messages and messages[-1]["role"] == "user" else messages


def run_self_interaction(backend: Backend, constitution, out_dir: Path, *,
                         settings: InteractionSettings = InteractionSettings(),
                         sampling: Sampling = INTERACTION_SAMPLING,
                         seed: int = 0, adapter: str | None = None) -> dict:
    openers = load_openers(settings.openers, display_name(constitution))
    persona = constitution.system_prompt() if settings.use_system_prompt else None
    rng = random.Random(seed)
    order = rng.sample(openers, len(openers))
    conv_openers = [order[i % len(order)] for i in range(settings.conversations)]
    system_a = render("introspection_interaction_system.j2", persona=persona, opener=None).strip()
    systems_b = [render("introspection_interaction_system.j2", persona=persona, opener=o).strip()
                 for o in conv_openers]

    turns: list[list[str]] = [[] for _ in conv_openers]
    open_ = set(range(len(conv_openers)))  # conversations still going
    turn_drops: Counter = Counter()
    tokens = 0
    for t in range(settings.turns):
        speaker = "A" if t % 2 == 0 else "B"
        live = sorted(open_)
        requests = [[{"role": "system", "content": system_a if speaker == "A" else systems_b[i]}]
                    + perspective(conv_openers[i], turns[i], speaker) for i in live]
        completions = backend.chat(requests, sampling, adapter=adapter,
                                   desc=f"self-interaction turn {t + 1}/{settings.turns}")
        for i, completion in zip(live, completions):
            tokens += completion.num_tokens
            problem, text = _usable(completion, settings.min_words, settings.min_distinct_3grams)
            if problem is None and text.lower() in {s.lower() for s in [conv_openers[i], *turns[i]]}:
                problem = "repeats_earlier_turn"  # small models echo each other into a loop
            if problem:
                turn_drops[problem] += 1
                open_.discard(i)
            else:
                turns[i].append(text)

    records, conversation_drops, truncated = [], Counter(), 0
    for i, (opener, said) in enumerate(zip(conv_openers, turns)):
        truncated += len(said) < settings.turns
        if len(said) < settings.min_exchanges:
            conversation_drops["too_few_exchanges"] += 1
            continue
        for speaker in ("A", "B") if settings.both_perspectives else ("A",):
            records.append({"messages": training_record(perspective(opener, said, speaker)),
                            "source": "interaction", "conversation": i, "perspective": speaker})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / INTERACTION_OUTPUTS[CONVERSATIONS], records)
    kept = [said for said in turns if len(said) >= settings.min_exchanges]
    return {
        **_manifest("interaction", backend, seed, sampling, settings, adapter, persona),
        "instance_system_prompts": {"A": system_a, "B (first conversation)": systems_b[0]},
        "counts": {"conversations": len(conv_openers), "kept": len(kept), "truncated": truncated,
                   "dropped": len(conv_openers) - len(kept), "records": len(records),
                   "generated_turns": sum(len(s) for s in turns) + sum(turn_drops.values()),
                   "mean_kept_turns": round(sum(map(len, kept)) / len(kept), 2) if kept else 0.0,
                   "tokens": tokens},
        "drops": {"turns": dict(turn_drops), "conversations": dict(conversation_drops)},
    }
