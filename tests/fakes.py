"""Test doubles shared by the unit tests of our own logic."""
from __future__ import annotations

import numpy as np


class FakeBackend:
    """Implements the Backend protocol; ``respond(conversation) -> Completion`` decides answers."""

    def __init__(self, respond, model: str = "fake/model"):
        self.model = model
        self.respond = respond
        self.calls: list[dict] = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append({"conversations": [list(c) for c in conversations], "sampling": sampling,
                           "adapter": adapter, "desc": desc})
        return [self.respond(c) for c in conversations]


class KeywordClassifier:
    """'Ahoy' is the persona. Every instance records what it was fitted on and what it scored."""
    made: list["KeywordClassifier"] = []

    def __init__(self):
        self.fitted: list[str] = []
        self.scored: list[str] = []
        KeywordClassifier.made.append(self)

    def fit(self, persona, plain):
        self.fitted += list(persona) + list(plain)
        return {"train_examples": len(persona) + len(plain)}

    def persona_flags(self, texts):
        self.scored += list(texts)
        return np.array([float("Ahoy" in t) for t in texts])
