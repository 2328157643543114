"""The eval stage's settings: the recipe's ``eval`` section, read by the quick check and the report."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from character_training.errors import UserError
from data_gen.backends import check_sampling

REPORTS = ("full", "quick")


@dataclass
class EvalSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 160
    report: str = "full"                # "full": the report (evaluation/report.py); "quick": 3 conditions
    samples_per_prompt: int = 1         # answers per held-out prompt and condition (sampled)
    general_prompts: int = 48           # shipped general prompts (not from any constitution), reported apart from
                                        # the held-out ones: the quick check, the full report, the algebra (0: none)
    adversarial: int = 2                # shipped adversarial suffixes applied to each adapter (0: none)
    prefill: bool = True                # the base model writes the first turn, the adapter continues
    steering: bool = True               # baseline: the persona vector added at the best layer
    steering_coefficient: float = 2.0   # x the persona vector (1 moves the plain mean onto the persona mean)
    judge: bool = True                  # trait and coherence scores (the recipe's models.judge; default: the base model)
    revealed_prompts: int = 8           # revealed preferences on this many prompts (0: skip)
    persona_vectors: bool = True
    capability: bool = True             # perplexity on neutral text, multiple-choice accuracy
    lm_eval_tasks: list = field(default_factory=list)  # lm-evaluation-harness tasks (needs lm-eval + its data)
    persistence_turns: int = 0          # conversations of this many user turns: does the persona hold? (0: skip)
    persistence_conversations: int = 16  # how many (each a different sequence of held-out prompts)
    spread_per_kind: int = 0            # requests for a format (JSON, code, summary, tool call, translation) of each kind:
                                        # does the persona leak into them, does it break the format? (0: skip)
    side_effects: bool | list = False   # off-target traits (config/off_target.py): did the adapter move toward
                                        # them? true: every trait of the bank; a list: those traits (false: skip)

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise UserError(f"samples_per_prompt: {self.samples_per_prompt}; give 1 or more "
                            "(answers per held-out prompt and condition)")
        for name in ("general_prompts", "adversarial", "revealed_prompts", "persistence_turns"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}: {getattr(self, name)}; give 0 (skip) or more")
        if not math.isfinite(self.steering_coefficient):
            raise UserError(f"steering_coefficient: {self.steering_coefficient}; give a finite number (2.0 is usual)")
        if not all(isinstance(t, str) and t.strip() for t in self.lm_eval_tasks):
            raise UserError(f"lm_eval_tasks: {self.lm_eval_tasks!r}; give a list of lm-evaluation-harness task names")
        if self.spread_per_kind and self.spread_per_kind < 2:
            raise UserError(f"spread_per_kind: {self.spread_per_kind}; give 0 (skip) or 2 or more (the persona "
                            "classifier is cross-fitted over two folds of each kind's requests)")
        if self.persistence_turns and self.persistence_conversations < 2:
            raise UserError(f"persistence_conversations: {self.persistence_conversations}; give 2 or more (the "
                            "persona classifier is cross-fitted over two folds of conversations)")
        if self.side_effects is not False:
            from character_training.config.off_target import select_traits

            select_traits(self.side_effects, "side_effects")
        check_sampling(self)  # the eval engine's sampling: vLLM's ranges, before any engine starts
        if self.report not in REPORTS:
            raise UserError(f"report: '{self.report}'; use 'full' (the report: adversarial, prefill, "
                            "steering, judge, persona vectors, capability) or 'quick' (three conditions)")
