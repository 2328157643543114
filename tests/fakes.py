"""Test doubles shared by the unit tests of our own logic."""
from __future__ import annotations


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
