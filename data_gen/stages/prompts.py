"""Prompt expansion: from each trait's seed questions the model writes more varied user
messages. Lines are parsed, cleaned, de-duplicated, and a held-out split is taken per trait.
A small model's lists parse poorly and unevenly, so a trait still short of prompts after a
round of requests is asked again (``max_rounds``), each round sized by that trait's yield so far.

Writes ``prompts.jsonl``: one ``{"prompt", "trait", "split", "source"}`` record per prompt,
``split`` being ``train`` or ``heldout`` and ``source`` being ``seed`` or ``generated``.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_gen.backends import Backend, Sampling, check_sampling
from data_gen.errors import UserError
from data_gen.store import USER_PROMPTS, write_jsonl
from data_gen.templating import render

# What the stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
OUTPUTS = {USER_PROMPTS: "prompts.jsonl"}

_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.):]|\(\d+\)|[A-Za-z][.)])\s*")
# Several messages run together on one line as inline bullets: "What is X? - How do I Y? - ..."
_INLINE_BULLET = re.compile(r"(?<=[?.!])\s+-\s+")
_PREAMBLE = re.compile(r"^(sure|here|certainly|of course|okay|ok)\b", re.IGNORECASE)
# A user message is a question, or a request that opens with a verb of asking.
_REQUEST = re.compile(r"^(please\s+)?(what|how|why|when|where|who|which|can|could|should|would|is|are|do|does|"
                      r"will|tell|explain|give|write|help|describe|suggest|recommend|share|list|"
                      r"show|teach|compare|summari[sz]e|name|find|plan|create|make|i need|i want|i'm|i am|"
                      r"i have|i feel|i can't|my)\b", re.IGNORECASE)


@dataclass(frozen=True)
class ExpandSettings:
    """The prompts stage's settings: the recipe's ``prompts`` section."""

    per_trait: int = 40          # training prompts kept per trait (seeds included)
    heldout_per_trait: int = 8   # generated prompts set aside per trait for evaluation
    # The trait's own seed questions set aside for evaluation (its last ones): written by the
    # researcher, not the model, never shown as an example nor trained on; the held-out split's clean core.
    heldout_seeds: int = 0
    per_request: int = 10        # new messages asked for in one request
    examples_per_request: int = 4
    oversample: float = 3.0      # requests are sized for this many times the needed prompts
    max_rounds: int = 3          # a trait still short of prompts after a round is asked again, this many rounds at most
    min_chars: int = 12
    max_chars: int = 200
    min_words: int = 4
    temperature: float = 1.0     # sampling of the requests (top_p and the penalties: Sampling's defaults)
    max_tokens: int = 256

    def __post_init__(self):
        if self.max_rounds < 1:
            raise UserError(f"max_rounds: {self.max_rounds}; give 1 or more (rounds of requests for a trait "
                            "still short of prompts)")
        if self.per_request < 1:
            raise UserError(f"per_request: {self.per_request}; give 1 or more (new messages asked for in one request)")
        for name, low, what in (("per_trait", 1, "training prompts kept per trait"),
                                ("heldout_per_trait", 0, "generated prompts set aside per trait for evaluation"),
                                ("heldout_seeds", 0, "seed questions set aside per trait for evaluation"),
                                ("examples_per_request", 0, "seed questions shown in one request"),
                                ("min_chars", 0, "characters a prompt needs"), ("min_words", 0, "words a prompt needs")):
            if getattr(self, name) < low:
                raise UserError(f"{name}: {getattr(self, name)}; give {low} or more ({what})")
        if self.max_chars < max(1, self.min_chars):
            raise UserError(f"max_chars: {self.max_chars}; give at least 1 and at least min_chars ({self.min_chars})")
        if not self.oversample >= 1:
            raise UserError(f"oversample: {self.oversample}; give 1 or more (requests are sized for this many "
                            "times the prompts needed)")
        check_sampling(self)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, max_tokens=self.max_tokens)


def normalize(text: str) -> str:
    """Key for de-duplication: lowercase letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _unquote(line: str) -> str:
    """Remove one pair of quotes around the whole line (not quotes inside it)."""
    for left, right in (('"', '"'), ("“", "”"), ("'", "'")):
        if len(line) > 1 and line.startswith(left) and line.endswith(right):
            return line[1:-1].strip()
    return line


def parse_messages(text: str, settings: ExpandSettings) -> tuple[list[str], Counter]:
    """User messages from one generation, one per line; returns (messages, drop reasons)."""
    kept, drops = [], Counter()
    for raw in (part for line in text.splitlines() for part in _INLINE_BULLET.split(line)):
        if not raw.strip():
            continue
        line = _unquote(_BULLET.sub("", raw).replace("**", "").strip())
        if not line:
            continue
        if _PREAMBLE.match(line) or line.endswith(":"):
            drops["preamble"] += 1
        elif len(line) < settings.min_chars:
            drops["too_short"] += 1
        elif len(line) > settings.max_chars:
            drops["too_long"] += 1
        elif not re.search(r"[A-Za-z]{2,}", line):
            drops["not_text"] += 1
        elif len(line.split()) < settings.min_words:
            drops["too_few_words"] += 1
        elif not (line.endswith("?") or _REQUEST.match(line)):
            drops["not_a_request"] += 1
        else:
            kept.append(line)
    return kept, drops


def _new_messages(completion, settings: ExpandSettings, seen: set[str], drops: Counter) -> list[str]:
    """The messages of one generation not seen before (``seen`` and ``drops`` are updated)."""
    text = completion.text
    if completion.finish_reason != "stop" and "\n" in text.strip():
        text = text.strip().rsplit("\n", 1)[0]  # the last line of a cut-off generation is cut too
        drops["cut_off_line"] += 1
    messages, reasons = parse_messages(text, settings)
    drops.update(reasons)
    new = []
    for message in messages:
        key = normalize(message)
        if key in seen:
            drops["duplicate"] += 1
            continue
        seen.add(key)
        new.append(message)
    return new


def expand_prompts(backend: Backend, seed_questions: dict[str, list[str]], out_dir: Path, *,
                   settings: ExpandSettings = ExpandSettings(), sampling: Sampling | None = None,
                   seed: int = 0) -> dict:
    """``sampling``: None uses the settings' own (``settings.sampling``)."""
    sampling = sampling or settings.sampling
    rng = random.Random(seed)
    held_seeds = {t: qs[len(qs) - settings.heldout_seeds:] if settings.heldout_seeds else [] for t, qs in seed_questions.items()}
    short_of_seeds = [t for t, qs in seed_questions.items() if len(qs) - settings.heldout_seeds < 1]
    if short_of_seeds:
        raise UserError(f"prompts.heldout_seeds: {settings.heldout_seeds} leaves no seed question to train on for "
                        f"trait '{short_of_seeds[0]}'; give the trait more questions or lower heldout_seeds")
    all_seeds = seed_questions
    seed_questions = {t: qs[:len(qs) - len(held_seeds[t])] for t, qs in seed_questions.items()}
    # Generated prompts each trait needs: its held-out ones and the training ones its seeds leave.
    needed = {t: settings.heldout_per_trait + max(0, settings.per_trait - len(seeds))
              for t, seeds in seed_questions.items()}
    drops: Counter = Counter()
    seen = {normalize(q) for seeds in all_seeds.values() for q in seeds}
    candidates: dict[str, list[str]] = {t: [] for t in seed_questions}
    owners: list[str] = []
    completions: list = []
    asked: Counter = Counter()  # requests per trait so far
    first_round = max(1, round((settings.per_trait + settings.heldout_per_trait) * settings.oversample
                               / settings.per_request))
    rounds = 0
    for attempt in range(settings.max_rounds):
        short = {t: needed[t] - len(candidates[t]) for t in seed_questions if len(candidates[t]) < needed[t]}
        if attempt == 0:  # every trait, sized as it always was (so cached answers of earlier runs stay valid)
            n_requests = {t: first_round for t in seed_questions}
        elif not short:
            break
        else:  # sized by the yield this trait's requests had so far, at most the first round's count
            yields = {t: max(len(candidates[t]) / asked[t], 0.5) for t in short}  # usable prompts a request
            n_requests = {t: min(first_round, max(1, math.ceil(1.2 * missing / yields[t]))) for t, missing in short.items()}
        requests, round_owners = [], []
        for trait, n in n_requests.items():
            asked[trait] += n
            for _ in range(n):
                seeds = seed_questions[trait]
                examples = rng.sample(seeds, min(settings.examples_per_request, len(seeds)))
                content = render("expand_prompts.j2", examples=examples, n=settings.per_request).strip()
                requests.append([{"role": "user", "content": content}])
                round_owners.append(trait)
        desc = "expanding prompts" if attempt == 0 else f"expanding prompts (round {attempt + 1}: {len(short)} traits short)"
        round_completions = backend.chat(requests, sampling, desc=desc)
        rounds += 1
        owners += round_owners
        completions += round_completions
        for trait, completion in zip(round_owners, round_completions):
            candidates[trait] += _new_messages(completion, settings, seen, drops)

    records, per_trait_counts = [], {}
    for trait, seeds in seed_questions.items():
        pool = candidates[trait]
        rng.shuffle(pool)
        heldout = pool[:settings.heldout_per_trait]
        train_generated = pool[settings.heldout_per_trait:][:max(0, settings.per_trait - len(seeds))]
        drops["surplus"] += len(pool) - len(heldout) - len(train_generated)
        records += [{"prompt": q, "trait": trait, "split": "train", "source": "seed"} for q in seeds]
        records += [{"prompt": q, "trait": trait, "split": "train", "source": "generated"} for q in train_generated]
        records += [{"prompt": q, "trait": trait, "split": "heldout", "source": "generated"} for q in heldout]
        records += [{"prompt": q, "trait": trait, "split": "heldout", "source": "seed"} for q in held_seeds[trait]]
        per_trait_counts[trait] = {"train": len(seeds) + len(train_generated),
                                   "heldout": len(heldout) + len(held_seeds[trait])}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / OUTPUTS[USER_PROMPTS], records)
    # The raw generations, to see what the parser kept and dropped.
    write_jsonl(out_dir / "expansions.jsonl", ({"trait": t, "text": c.text, "finish_reason": c.finish_reason}
                                               for t, c in zip(owners, completions)))
    return {
        "stage": "prompts",
        "model": backend.model,
        "seed": seed,
        "sampling": sampling.to_dict(),
        "settings": asdict(settings),
        "requests": len(completions),
        "rounds": rounds,
        "short_traits": {t: {"generated": len(candidates[t]), "needed": needed[t]}
                         for t in seed_questions if len(candidates[t]) < needed[t]},
        "counts": {
            "train": sum(c["train"] for c in per_trait_counts.values()),
            "heldout": sum(c["heldout"] for c in per_trait_counts.values()),
            "per_trait": per_trait_counts,
        },
        "drops": dict(drops),
    }
