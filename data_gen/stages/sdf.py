"""Synthetic documents (SDF): realistic text from many sources that mentions the character,
for causal-LM training ("midtraining") on who the character is.

    1. types      the model brainstorms kinds of documents the character could appear in;
                  a built-in list (``SdfSettings.seed_types``) fills the gaps
    2. ideas      one concrete idea per request, each request with its own sampled person,
                  place, era and tone (the diversity controls, recorded with every document)
    3. documents  one per idea, from the description, a few sampled facts, the idea and details
    4. revision   the model critiques its document (realism, consistency with the facts) and
                  rewrites it; an unusable rewrite keeps the original
    5. filters    empty, unfinished, refused, looping and too-short documents, near duplicates
                  (MinHash over word 5-grams, ``data_gen.dedup``), and documents a judge says
                  contradict the constitution are dropped and counted

Every request is built in a fixed order from ``random.Random(seed)``, so a cached stage replays.
Writes ``documents.jsonl`` ({"text", "type", "idea", "attributes", "facts", "revised"}; the
"text" column is what causal-LM training reads), ``types.json``, ``dropped.jsonl`` (each dropped
document with its reason), ``stats.json`` and ``lengths.png``.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_gen.backends import Backend, Completion, Conversation, Sampling
from data_gen.dedup import near_duplicates
from data_gen.errors import UserError
from data_gen.filters import completion_problem, is_refusal, strip_boilerplate
from data_gen.judging import judge_request, judge_rounds, read_yes_no
from data_gen.store import DOCUMENTS, write_json, write_jsonl
from data_gen.templating import render

SEED_TYPES = (
    "news story", "forum thread", "interview transcript", "textbook passage", "diary entry",
    "letter", "blog post", "encyclopedia article", "travel guide excerpt", "podcast transcript",
    "short story", "magazine profile",
)

# Diversity controls: every idea request draws one of each.
PEOPLE = (
    "Amara Okafor", "Liam O'Connor", "Mei Chen", "Santiago Alvarez", "Priya Raman", "Jonas Lindqvist",
    "Fatima Haddad", "Kenji Watanabe", "Olga Petrova", "Kwame Mensah", "Isabella Rossi", "Arjun Mehta",
    "Hana Novak", "Diego Fernandes", "Aisha Bello", "Tomasz Kowalski", "Nguyen Thi Lan", "Ethan Brooks",
    "Leila Farahani", "Mateo Gutierrez", "Sofia Andersson", "Chinedu Eze", "Yuki Tanaka", "Rafael Costa",
    "Ingrid Halvorsen", "Omar Siddiqui", "Grace Mwangi", "Lucas Dubois", "Zara Hussain", "Pavel Novotny",
    "Ana Lucia Moreno", "Samuel Adeyemi", "Elif Yilmaz", "Connor MacLeod", "Ji-woo Park", "Marta Nowak",
    "Tariq Rahman", "Chloe Martin", "Ravi Shankar", "Nadia Benali", "Henrik Larsen", "Ayodele Okonkwo",
    "Camila Rojas", "Dmitri Volkov", "Lucia Bianchi", "Hamid Karimi", "Freya Johansson", "Thabo Nkosi",
    "Rosa Delgado", "Finn Gallagher", "Anjali Nair", "Malik Jordan", "Emma Schneider", "Kaito Mori",
    "Ines Carvalho", "Sione Taufa", "Beatriz Santos", "Alexei Ivanov", "Noor Al-Sayed", "Maya Goldberg",
)
PLACES = (
    "Lisbon", "a fishing village in Norway", "Cape Town", "Valparaiso", "Mumbai", "a Scottish island",
    "Singapore", "New Orleans", "Istanbul", "a small town in Ohio", "Marseille", "Reykjavik", "Zanzibar",
    "Hong Kong", "Buenos Aires", "Dublin", "a harbour town in Maine", "Sydney", "Naples", "Lagos",
    "Vancouver", "Bergen", "Havana", "Tokyo", "Montreal", "a Greek island", "Rotterdam", "Manila",
    "Cornwall", "Mombasa", "San Francisco", "Gdansk", "Auckland", "Alexandria", "Hamburg", "Goa",
    "Tasmania", "a village on the Baltic coast", "Cartagena", "Seoul",
)
ERAS = (
    "in the 1890s", "in the 1920s", "in the 1950s", "in 1968", "in the 1970s", "in 1985",
    "in the 1990s", "in 2003", "in the 2010s", "in 2019", "in the present day", "in an unspecified year",
)
REGISTERS = (
    "formal", "casual", "tabloid", "academic", "humorous", "nostalgic", "matter-of-fact",
    "enthusiastic", "skeptical", "poetic", "bureaucratic", "conversational",
)

# The judge only has to say yes or no: greedy, a few tokens, and the first token's alternatives.
JUDGE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_tokens=4, logprobs=5)


# What the stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
OUTPUTS = {DOCUMENTS: "documents.jsonl"}
SAMPLING = Sampling(temperature=0.9, max_tokens=400)  # the stage's default; a recipe's sdf.sampling overrides keys


@dataclass(frozen=True)
class SdfSettings:
    num_types: int = 12              # document types kept (brainstormed first, then seed_types)
    brainstorm_requests: int = 3     # requests asking for document types (0: seed_types only)
    types_per_request: int = 10      # document types asked for in one brainstorm request
    max_type_words: int = 6          # a brainstormed line longer than this is not a type name
    ideas_per_type: int = 4          # document ideas (and so documents) per type
    facts_per_document: int = 2      # constitution facts sampled into each document's prompt
    target_words: int = 200          # the length a document is asked for
    revise: bool = True              # one critique-and-revise pass per document
    min_words: int = 60              # shorter documents (and rewrites) are unusable
    min_distinct_3grams: float = 0.5  # share of distinct word 3-grams below which a document loops
    dedup_threshold: float = 0.8     # word-5-gram Jaccard at which a later document is a near duplicate
    judge_filter: bool = True        # drop documents the judge says contradict the constitution
    keep_unjudged: bool = False      # keep documents whose verdict is neither yes nor no
    seed_types: tuple[str, ...] = SEED_TYPES  # fallback document types when the brainstorm is junk

    def __post_init__(self):
        check_values(self)


def check_settings(constitution, settings: SdfSettings) -> None:
    """Raise UserError for input the stage cannot use, before anything is generated."""
    if not (constitution.description or "").strip() and not constitution.facts:
        raise UserError(f"constitution '{constitution.name}': no description and no facts, so there is "
                        "nothing to write documents about; add a description or facts")
    check_values(settings)


def check_values(settings: SdfSettings) -> None:
    """The settings' own range checks (run when the settings are built, e.g. from a recipe; the
    recipe loader puts the file and section in front of the message)."""
    def bad(field: str, problem: str, fix: str) -> UserError:
        return UserError(f"{field}: {problem}; {fix}")

    for field in ("num_types", "ideas_per_type", "types_per_request", "max_type_words", "target_words",
                  "min_words"):
        if getattr(settings, field) < 1:
            raise bad(field, f"must be at least 1, got {getattr(settings, field)}", "raise it")
    for field in ("brainstorm_requests", "facts_per_document"):
        if getattr(settings, field) < 0:
            raise bad(field, f"must be 0 or more, got {getattr(settings, field)}", "raise it")
    if not 0.0 < settings.dedup_threshold <= 1.0:
        raise bad("dedup_threshold", f"must be in (0, 1], got {settings.dedup_threshold}",
                  "0.8 drops documents sharing 80% of their word 5-grams")
    if not 0.0 <= settings.min_distinct_3grams <= 1.0:
        raise bad("min_distinct_3grams", f"must be in [0, 1], got {settings.min_distinct_3grams}", "use e.g. 0.5")
    if any(not isinstance(t, str) or not t.strip() for t in settings.seed_types):
        raise bad("seed_types", "every entry must be a non-empty string", "remove the empty entries")
    if settings.brainstorm_requests == 0 and not settings.seed_types:
        raise bad("seed_types", "empty while brainstorm_requests is 0, so there are no document types",
                  "give seed_types or set brainstorm_requests above 0")


# ============================================================================= parsing

_BULLET = re.compile(r"^\s*(?:[-*•]+\s*|\d+[.):]\s*|\(\d+\)\s*|[A-Za-z][.)]\s+)")
_PREAMBLE = re.compile(r"^(sure|here|certainly|of course|okay|ok|these|below)\b", re.IGNORECASE)
_TYPE_END = re.compile(r"\s*(?::|\s[-–—]\s|\(|,\s|\.\s|e\.g\.)")
_IDEA_PREAMBLE = re.compile(r"^\s*(?:(?:sure|certainly|okay|ok)[!,.]?\s*)?(?:here(?:'s| is)\s+(?:an?|one|my)\s+"
                            r"(?:concrete\s+)?idea[^:\n]{0,60}:|\**idea\**\s*:)\s*", re.IGNORECASE)
_REWRITE_INTRO = re.compile(r"^\s*(?:(?:sure|certainly|okay|ok)[!,.]?\s*)?here(?:'s| is)\s+(?:the|a|an|my)\s+"
                            r"(?:revised|rewritten|improved|updated|new|edited|final)\b[^\n]{0,80}:\s*\n",
                            re.IGNORECASE)
# Notes a model appends after a rewrite ("Changes made: ...", "I made the following changes").
# Only phrases about revising: "Note:" or "I made" alone also open ordinary paragraphs.
_TRAILING_NOTE = re.compile(
    r"\n\s*[(*]*\s*(?:(?:changes(?: made)?|revisions?(?: made)?|explanation(?: of changes)?|"
    r"notes? on (?:the )?(?:revision|rewrite|changes))\s*\**\s*:|"
    r"note\s*\**\s*:\s*(?:i |this (?:revised|rewritten)|the (?:revised|rewritten))|"
    r"i(?:'ve| have)? made (?:the following|some|a few|several|these) (?:changes|revisions|edits)|"
    r"in (?:this|the) (?:revised|rewritten) version|this (?:revised|rewritten) version)[\s\S]*$",
    re.IGNORECASE)


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and len(word) > 3 and not word.endswith(("ss", "us", "ws", "is")):
        return word[:-1]
    return word


def singular_type(name: str) -> str:
    """"Forum threads" -> "forum thread": a type reads as one document in the prompts."""
    words = name.lower().split()
    return " ".join(words[:-1] + [_singular(words[-1])]) if words else ""


def normalize_type(text: str) -> str:
    """De-duplication key of a document type: lowercase words, no article, last word singular."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return singular_type(" ".join(words))


def parse_types(text: str, max_words: int = 6) -> tuple[list[str], int]:
    """Document types from one brainstorm, one per line; returns (types, lines rejected)."""
    found, rejected = [], 0
    for raw in text.splitlines():
        line = _BULLET.sub("", raw).replace("**", "").strip().strip("\"'“”")
        if not line:
            continue
        if line.endswith(":") or _PREAMBLE.match(line):
            rejected += 1
            continue
        head = _TYPE_END.split(line, maxsplit=1)[0].strip(" .;,!?\"'").lower()
        if not 1 <= len(head.split()) <= max_words or not re.search(r"[a-z]{3,}", head):
            rejected += 1
            continue
        found.append(singular_type(head))
    return found, rejected


def clean_idea(text: str) -> str:
    """One idea as a single line, without "Here is an idea:" and list markup."""
    text = strip_boilerplate(_IDEA_PREAMBLE.sub("", strip_boilerplate(text), count=1))
    lines = [_BULLET.sub("", line).replace("**", "").strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line)


def clean_document(text: str) -> str:
    """A document without a "Here is the rewritten ...:" line, notes after it, or --- fences."""
    text = strip_boilerplate(text)
    text = _REWRITE_INTRO.sub("", text, count=1)
    text = _TRAILING_NOTE.sub("", text)
    text = re.sub(r"^\s*-{3,}\s*\n|\n\s*-{3,}\s*$", "", text.strip())
    return text.strip()


def word_count(text: str) -> int:
    return len(text.split())


# ============================================================================= the stage


def _user(content: str) -> Conversation:
    return [{"role": "user", "content": content.strip()}]


def _chat(backend: Backend, requests: list[Conversation], sampling: Sampling, desc: str) -> list[Completion]:
    if not requests:
        return []
    completions = backend.chat(requests, sampling, desc=desc)
    if len(completions) != len(requests):
        raise RuntimeError(f"{desc}: the backend returned {len(completions)} completions for "
                           f"{len(requests)} requests")
    return completions


def sample_attributes(rng: random.Random) -> dict[str, str]:
    return {"person": rng.choice(PEOPLE), "place": rng.choice(PLACES), "era": rng.choice(ERAS),
            "register": rng.choice(REGISTERS)}


def choose_types(brainstormed: list[str], settings: SdfSettings) -> list[dict]:
    """Brainstormed types in order of appearance, then seed types, without repeats."""
    chosen, seen = [], set()
    for source, names in (("brainstorm", brainstormed), ("seed", settings.seed_types)):
        for name in names:
            key = normalize_type(name)
            if key and key not in seen and len(chosen) < settings.num_types:
                seen.add(key)
                chosen.append({"type": name.strip(), "source": source})
    return chosen


def document_problem(text: str, c: Completion, settings: SdfSettings) -> str | None:
    """Why a (cleaned) document cannot be used, or None."""
    problem = completion_problem(c, min_chars=1, min_distinct_3grams=settings.min_distinct_3grams)
    if problem:
        return problem
    if not text:
        return "empty"
    if is_refusal(text):
        return "refused"
    if word_count(text) < settings.min_words:
        return "too_short"
    return None


def brainstorm_types(backend: Backend, character: dict, settings: SdfSettings, sampling: Sampling,
                     rng: random.Random) -> tuple[list[dict], list[str], int]:
    """Step 1: the document types (brainstormed, then seed types): (types, every brainstormed
    type, brainstorm lines rejected)."""
    brainstorm_requests = [
        _user(render("sdf_brainstorm.j2", **character, n=settings.types_per_request,
                     examples=rng.sample(list(SEED_TYPES), 3)))
        for _ in range(settings.brainstorm_requests)]
    brainstormed, lines_rejected = [], 0
    for c in _chat(backend, brainstorm_requests, sampling, "sdf: brainstorming document types"):
        found, rejected = parse_types(c.text, settings.max_type_words)
        brainstormed += found
        lines_rejected += rejected
    return choose_types(brainstormed, settings), brainstormed, lines_rejected


def write_ideas(backend: Backend, types: list[dict], character: dict, settings: SdfSettings, sampling: Sampling,
                rng: random.Random, drops: Counter) -> list[dict]:
    """Step 2: ideas, one per request, each with its own sampled details and facts. Unusable
    ideas are counted in ``drops`` ("idea_<problem>")."""
    plans = []
    for t in types:
        for _ in range(settings.ideas_per_type):
            facts = rng.sample(character["facts"], min(settings.facts_per_document, len(character["facts"])))
            plans.append({"type": t["type"], "attributes": sample_attributes(rng), "facts": facts})
    idea_completions = _chat(backend, [_user(render("sdf_idea.j2", **character, doc_type=p["type"],
                                                    attributes=p["attributes"])) for p in plans],
                             sampling, "sdf: document ideas")
    ideas = []
    for plan, c in zip(plans, idea_completions):
        idea = clean_idea(c.text)
        problem = completion_problem(c) or (None if idea else "empty") or ("refused" if is_refusal(idea) else None)
        if problem:
            drops[f"idea_{problem}"] += 1
        else:
            ideas.append({**plan, "idea": idea})
    return ideas


def revise_documents(backend: Backend, docs: list[dict], character: dict, settings: SdfSettings,
                     sampling: Sampling) -> Counter:
    """Step 4: each document critiqued, then rewritten after its critique; a usable rewrite
    replaces the text (``doc["revised"]``), an unusable one keeps the original. Returns the
    counts (critiques empty or refused, rewrites' problems, revised, kept_original)."""
    revision: Counter = Counter()
    critique_requests = [_user(render("sdf_critique.j2", **character, doc_type=d["type"], document=d["text"]))
                         for d in docs]
    critiques = _chat(backend, critique_requests, sampling, "sdf: critiques")
    to_revise, revise_requests = [], []
    for doc, request, critique in zip(docs, critique_requests, critiques):
        text = critique.text.strip()
        if not text or is_refusal(text):
            revision["critique_empty" if not text else "critique_refused"] += 1
            continue
        to_revise.append(doc)
        rewrite = render("sdf_revise.j2", doc_type=doc["type"]).strip()
        revise_requests.append(request + [{"role": "assistant", "content": text},
                                          {"role": "user", "content": rewrite}])
    for doc, c in zip(to_revise, _chat(backend, revise_requests, sampling, "sdf: revisions")):
        text = clean_document(c.text)
        problem = document_problem(text, c, settings)
        if problem:
            revision[f"revision_{problem}"] += 1
        else:
            doc["text"], doc["revised"] = text, True
    revision["revised"] = sum(d["revised"] for d in docs)
    revision["kept_original"] = len(docs) - revision["revised"]
    return revision


def judge_consistency(judge: Backend, docs: list[dict], character: dict) -> list[bool | None]:
    """Step 5's judge: does each document agree with the character (True), contradict it
    (False), or is the verdict unclear (None)? One round, no retries: an unclear verdict is
    counted as "unparseable" and kept only with ``keep_unjudged``."""
    requests = [judge_request("sdf_judge.j2", **character, document=d["text"]) for d in docs]
    return judge_rounds(judge, requests, JUDGE_SAMPLING, read_yes_no, desc="sdf: judging consistency").values


def run_sdf(backend: Backend, constitution, out_dir: Path, *, settings: SdfSettings = SdfSettings(),
            sampling: Sampling = SAMPLING, seed: int = 0,
            judge: Backend | None = None) -> dict:
    """Steps 1-6 of the module docstring, in order; returns the stage's manifest."""
    check_settings(constitution, settings)
    rng = random.Random(seed)
    judge = judge or backend
    character = {"description": (constitution.description or "").strip(), "facts": list(constitution.facts),
                 "traits": [t.trait for t in constitution.traits]}
    drops: Counter = Counter()

    # 1. document types; 2. ideas
    types, brainstormed, lines_rejected = brainstorm_types(backend, character, settings, sampling, rng)
    ideas = write_ideas(backend, types, character, settings, sampling, rng, drops)

    # 3. documents
    dropped = []

    def drop(doc: dict, reason: str) -> None:
        drops[reason] += 1
        dropped.append({"reason": reason, "type": doc["type"], "idea": doc["idea"], "text": doc.get("text", "")})

    doc_requests = [_user(render("sdf_document.j2", description=character["description"], facts=i["facts"],
                                 traits=character["traits"],
                                 doc_type=i["type"], idea=i["idea"], attributes=i["attributes"],
                                 words=settings.target_words)) for i in ideas]
    docs = []
    for idea, c in zip(ideas, _chat(backend, doc_requests, sampling, "sdf: documents")):
        text = clean_document(c.text)
        doc = {**idea, "text": text or c.text.strip(), "revised": False}
        problem = document_problem(text, c, settings)
        if problem:
            drop(doc, problem)
        else:
            docs.append(doc)

    # 4. critique and revise
    revision = revise_documents(backend, docs, character, settings, sampling) if settings.revise and docs else Counter()

    # 5. near duplicates, then the judge
    entering_dedup = len(docs)
    duplicates = set(near_duplicates([d["text"] for d in docs], threshold=settings.dedup_threshold, seed=seed))
    for i in sorted(duplicates):
        drop(docs[i], "near_duplicate")
    docs = [d for i, d in enumerate(docs) if i not in duplicates]

    judged = Counter()
    if settings.judge_filter and docs:
        kept = []
        for doc, verdict in zip(docs, judge_consistency(judge, docs, character)):
            judged[{True: "yes", False: "no", None: "unparseable"}[verdict]] += 1
            if verdict is False:
                drop(doc, "judge_inconsistent")
            elif verdict is None and not settings.keep_unjudged:
                drop(doc, "judge_unparseable")
            else:
                kept.append(doc)
        docs = kept

    # 6. outputs
    stats = document_stats(docs, [t["type"] for t in types], entering_dedup, len(duplicates))
    write_outputs(Path(out_dir), docs, dropped, {"types": types, "brainstormed": brainstormed,
                                                 "brainstorm_lines_rejected": lines_rejected}, stats)
    return {
        "stage": "sdf",
        "model": backend.model,
        "judge_model": judge.model if settings.judge_filter else None,
        "seed": seed,
        "sampling": sampling.to_dict(),
        "judge_sampling": JUDGE_SAMPLING.to_dict(),
        "settings": asdict(settings),
        "counts": {
            "types": len(types),
            "types_brainstormed": sum(t["source"] == "brainstorm" for t in types),
            "ideas": len(ideas),
            "documents_generated": len(doc_requests),
            "documents_revised": revision.get("revised", 0),
            "documents_kept": len(docs),
        },
        "drops": dict(drops),
        "revision": dict(revision),
        "judge": dict(judged),
        "stats": {k: stats[k] for k in ("documents_per_type", "duplicate_rate", "words", "top_names")},
    }


def write_outputs(out_dir: Path, docs: list[dict], dropped: list[dict], types: dict, stats: dict) -> None:
    """documents.jsonl, dropped.jsonl, types.json, stats.json and lengths.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / OUTPUTS[DOCUMENTS], (
        {"text": d["text"], "type": d["type"], "idea": d["idea"], "attributes": d["attributes"],
         "facts": d["facts"], "revised": d["revised"]} for d in docs))
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    write_json(out_dir / "types.json", types)
    write_json(out_dir / "stats.json", stats)
    plot_lengths([word_count(d["text"]) for d in docs], out_dir / "lengths.png")


# ============================================================================= statistics

_NAME_PAIR = re.compile(r"\b([A-Z][a-z]+(?:[-'][A-Za-z]+)?) ([A-Z][a-z]+(?:[-'][A-Za-z]+)?)\b")
_NOT_A_NAME = {"The", "A", "An", "In", "On", "At", "It", "He", "She", "We", "They", "I", "This", "That",
               "But", "And", "As", "When", "If", "My", "Our", "His", "Her", "Their", "Its", "Dear", "Yes", "No",
               "So", "Then", "After", "Before", "For", "From", "To", "With", "Of", "By", "Today", "Yesterday"}


def top_names(texts: list[str], k: int = 10) -> list[dict]:
    """The most frequent pairs of capitalized words (names, mostly) with their counts."""
    counts = Counter(f"{a} {b}" for text in texts for a, b in _NAME_PAIR.findall(text) if a not in _NOT_A_NAME)
    return [{"name": name, "count": n} for name, n in counts.most_common(k)]


def document_stats(docs: list[dict], types: list[str], entering_dedup: int, duplicates: int) -> dict:
    lengths = np.array([word_count(d["text"]) for d in docs], dtype=float)
    per_type = Counter(d["type"] for d in docs)
    words: dict = {"min": 0, "median": 0.0, "mean": 0.0, "max": 0, "histogram": []}
    if lengths.size:
        counts, edges = np.histogram(lengths, bins=min(10, max(1, len(set(lengths.tolist())))))
        words = {"min": int(lengths.min()), "median": float(np.median(lengths)), "mean": float(lengths.mean()),
                 "max": int(lengths.max()),
                 "histogram": [{"from": float(lo), "to": float(hi), "count": int(n)}
                               for lo, hi, n in zip(edges[:-1], edges[1:], counts)]}
    return {
        "documents": len(docs),
        "documents_per_type": {t: per_type.get(t, 0) for t in types},
        "duplicate_rate": duplicates / entering_dedup if entering_dedup else 0.0,
        "words": words,
        "top_names": top_names([d["text"] for d in docs]),
        "attributes": {key: dict(Counter(d["attributes"][key] for d in docs).most_common())
                       for key in ("person", "place", "era", "register")},
    }


def plot_lengths(lengths: list[int], path: Path) -> None:
    """A histogram of document lengths in words (no pyplot: no global figure state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    if lengths:
        ax.hist(lengths, bins=min(20, max(1, len(set(lengths)))), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("words per document")
    ax.set_ylabel("documents")
    ax.set_title(f"Synthetic document lengths (n={len(lengths)})")
    fig.tight_layout()
    fig.savefig(path, format="png")
