"""Teacher-vs-student preference pairs.

For each training prompt the same model answers as the teacher, with the constitution as its
system prompt, and as the student, without it (no system prompt, or a plain assistant one).
The teacher's answer is ``chosen``, the student's ``rejected``; the pair is stored without any
system prompt, so training teaches the model to answer in character unprompted.

A small model in a costume is an unreliable teacher: many of its answers drift out of
character. So the teacher may answer ``teacher_samples`` times; a persona classifier trained on
all usable teacher vs student answers then keeps the most in-character sample, and a pair whose
chosen answer is not more in character than its rejected one is dropped. Unfinished (cut off),
empty, over-long and repetitive (looping) answers are dropped and counted.

With ``unfinished="trim"`` an answer cut off at ``max_tokens`` is cut back to its last complete
sentence instead of being dropped (counted as ``*_trimmed``). Dropping them keeps only the
answers that happened to be short, and for a small model in a costume those are the ones
least in character: on the demo, 90 of 180 teacher answers were cut off at 160 tokens.

Writes ``pairs.jsonl`` in TRL's conversational preference format (``prompt``, ``chosen``,
``rejected`` as message lists; loadable with ``datasets.load_dataset("json", ...)``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_gen.backends import Backend, Completion, Sampling, check_sampling
from data_gen.errors import UserError
from data_gen.filters import completion_problem, trim_to_sentence
from data_gen.store import PREFERENCES, write_jsonl


UNFINISHED = ("drop", "trim")
# What the stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
OUTPUTS = {PREFERENCES: "pairs.jsonl"}


@dataclass(frozen=True)
class PairSettings:
    """The pairs stage's settings: the recipe's ``pairs`` section (sampling keys written flat)."""

    temperature: float = 0.7
    top_p: float = Sampling.top_p
    max_tokens: int = 160
    # vLLM applies repetition_penalty to the prompt too: >1 penalizes the persona's own words.
    repetition_penalty: float = Sampling.repetition_penalty
    # Per earlier use of a token in the same answer (not the prompt): against loops.
    frequency_penalty: float = Sampling.frequency_penalty
    teacher_samples: int = 2        # teacher answers per prompt; the most in-character one (by the classifier) is kept
    min_margin: float | None = 0.0  # classifier persona-probability margin chosen - rejected; None: no check
    max_answer_chars: int = 2000
    min_answer_chars: int = 2
    min_distinct_3grams: float = 0.75  # share of distinct word 3-grams below which an answer loops (dropped)
    # Appended to both system prompts (teacher and student) by the caller, so that a pair differs
    # in character, not in length; the eval's prompted condition gets it too.
    answer_hint: str | None = "Keep your answer short: at most three sentences."
    unfinished: str = "trim"        # an answer cut off at max_tokens: "trim" it to its last full sentence, or "drop" it

    def __post_init__(self):
        if self.unfinished not in UNFINISHED:
            raise UserError(f"unfinished: '{self.unfinished}'; use 'trim' (an answer cut off at max_tokens is cut "
                            "back to its last full sentence) or 'drop' (leave it out); both are counted")
        if not -2 <= self.frequency_penalty <= 2:
            raise UserError(f"frequency_penalty: {self.frequency_penalty!r}; give a number between -2 and 2 "
                            "(vLLM's range; 0: off; the demo's 0.5 keeps the teacher out of loops)")
        if self.teacher_samples < 1:
            raise UserError(f"teacher_samples: {self.teacher_samples}; give 1 or more (teacher answers per prompt)")
        if self.min_margin is not None and not -1 <= self.min_margin <= 1:
            raise UserError(f"min_margin: {self.min_margin}; give a number from -1 to 1 (a difference of two "
                            "probabilities; 0: chosen at least as in character as rejected) or null (no check)")
        if self.min_answer_chars < 0:
            raise UserError(f"min_answer_chars: {self.min_answer_chars}; give 0 or more")
        if self.max_answer_chars < max(1, self.min_answer_chars):
            raise UserError(f"max_answer_chars: {self.max_answer_chars}; give at least 1 and at least "
                            f"min_answer_chars ({self.min_answer_chars})")
        if not 0.0 <= self.min_distinct_3grams <= 1.0:
            raise UserError(f"min_distinct_3grams: {self.min_distinct_3grams}; give a share from 0 to 1 "
                            "(0 keeps looping answers)")
        check_sampling(self)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                        repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty)


def answer_problem(c: Completion, settings: PairSettings) -> str | None:
    """Why an answer cannot be used, or None when it can."""
    return completion_problem(c, min_chars=settings.min_answer_chars, max_chars=settings.max_answer_chars,
                              min_distinct_3grams=settings.min_distinct_3grams, refusals=False)


def usable_answer(c: Completion, settings: PairSettings) -> tuple[str | None, str | None]:
    """(the answer's text, None) when it can be used, else (None, why not). With
    ``unfinished="trim"`` a cut-off answer is judged, and used, as cut back to its last full
    sentence; its reason is then "trimmed" when usable (counted, not dropped)."""
    trimmed = False
    if not c.finished and settings.unfinished == "trim" and c.text.strip():
        text = trim_to_sentence(c.text, settings.min_answer_chars)
        if text is None:
            return None, "unfinished"
        c, trimmed = Completion(text, "stop", c.num_tokens), True
    problem = answer_problem(c, settings)
    if problem:
        return None, problem
    return c.text.strip(), "trimmed" if trimmed else None


def _persona_scores(usable_teacher: list[list[str]], usable_student: list[str | None], settings: PairSettings,
                    classifier=None) -> tuple[dict, list[list[float]], list[float | None]]:
    """How in character each usable answer is: the persona classifier's probability, fitted on these
    teacher vs student answers, when it picks among several teacher samples or filters by margin;
    0.0 otherwise. Returns (the selection record, teacher scores per prompt, student score per prompt)."""
    use_classifier = settings.min_margin is not None or settings.teacher_samples > 1
    all_teacher = [t for ts in usable_teacher for t in ts]
    all_student = [s for s in usable_student if s]
    if not (use_classifier and all_teacher and all_student):
        return ({"method": "first usable sample"}, [[0.0] * len(ts) for ts in usable_teacher],
                [0.0 if s else None for s in usable_student])
    from data_gen.scoring import PersonaClassifier

    classifier = classifier or PersonaClassifier()
    selection = {"method": "persona classifier (teacher vs student answers)", **classifier.fit(all_teacher, all_student)}
    teacher_p = iter(classifier.persona_probability(all_teacher).tolist())
    teacher_scores = [[next(teacher_p) for _ in ts] for ts in usable_teacher]
    student_p = iter(classifier.persona_probability(all_student).tolist())
    return selection, teacher_scores, [next(student_p) if s else None for s in usable_student]


def generate_pairs(backend: Backend, prompts: list[str], system_prompt: str, out_dir: Path, *,
                   student_system_prompt: str | None = None,
                   sampling: Sampling | None = None,
                   settings: PairSettings = PairSettings(), seed: int = 0, classifier=None,
                   student: Backend | None = None) -> dict:
    """``backend`` is the teacher (the chosen answers, with ``system_prompt``); ``student`` answers
    the rejected ones (None: ``backend`` again). ``sampling``: None uses the settings' own."""
    sampling = sampling or settings.sampling
    teacher_backend, student_backend = backend, student or backend
    k = settings.teacher_samples
    teacher = teacher_backend.chat([[{"role": "system", "content": system_prompt}, {"role": "user", "content": p}]
                                    for p in prompts for _ in range(k)], sampling, desc="teacher answers")
    student_head = [{"role": "system", "content": student_system_prompt}] if student_system_prompt else []
    student = student_backend.chat([student_head + [{"role": "user", "content": p}] for p in prompts], sampling,
                                   desc="student answers")

    answer_drops: Counter = Counter()
    pair_drops: Counter = Counter()
    trimmed: Counter = Counter({"teacher": 0, "student": 0})

    def usable(c: Completion, role: str) -> str | None:  # the answer's text, or None; counted either way
        text, note = usable_answer(c, settings)
        if note == "trimmed":
            trimmed[role] += 1
        elif note:
            answer_drops[f"{role}_{note}"] += 1
        return text

    usable_teacher = [[t for c in teacher[i * k:(i + 1) * k] if (t := usable(c, "teacher"))]
                      for i in range(len(prompts))]
    usable_student = [usable(c, "student") for c in student]

    selection, teacher_scores, student_score = _persona_scores(usable_teacher, usable_student, settings, classifier)
    records = []
    for i, prompt in enumerate(prompts):
        if not usable_teacher[i]:
            pair_drops["no_usable_teacher_answer"] += 1
            continue
        if usable_student[i] is None:
            pair_drops["no_usable_student_answer"] += 1
            continue
        best = max(range(len(usable_teacher[i])), key=lambda j: teacher_scores[i][j])
        chosen, rejected = usable_teacher[i][best], usable_student[i]
        if chosen == rejected:
            pair_drops["identical"] += 1
            continue
        margin = teacher_scores[i][best] - student_score[i]
        if "cv_accuracy" in selection and settings.min_margin is not None and margin <= settings.min_margin:
            pair_drops["chosen_not_more_in_character"] += 1
            continue
        records.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / OUTPUTS[PREFERENCES], records)
    return {
        "stage": "pairs",
        "model": backend.model,
        "models": {"teacher": teacher_backend.model, "student": student_backend.model},  # chosen's and rejected's
        "seed": seed,
        "sampling": sampling.to_dict(),
        "settings": asdict(settings),
        "teacher_system_prompt": system_prompt,
        "student_system_prompt": student_system_prompt,
        "selection": selection,
        "counts": {"prompts": len(prompts), "pairs": len(records),
                   "dropped_pairs": len(prompts) - len(records),
                   "teacher_answers": len(teacher), "student_answers": len(student),
                   "teacher_tokens": sum(c.num_tokens for c in teacher),
                   "student_tokens": sum(c.num_tokens for c in student),
                   "teacher_trimmed": trimmed["teacher"], "student_trimmed": trimmed["student"]},
        "drops": {"answers": dict(answer_drops), "pairs": dict(pair_drops)},
    }
