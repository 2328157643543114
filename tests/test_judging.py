"""The judging module with scripted fake judges: requests rendered from templates, the three
verdict readers, and the rounds (only failures re-sent, every failure counted, a raising judge
either propagated or tolerated)."""
from __future__ import annotations

import math
from functools import partial

import pytest

from data_gen.backends import Completion, Sampling
from data_gen.errors import UserError
from data_gen.judging import (EXAMPLES_KEPT, judge_request, judge_rounds, read_choice, read_score, read_yes_no,
                              yes_no_verdict)
from tests.fakes import FakeBackend

SAMPLING = Sampling(temperature=0.0, max_tokens=8)


def stop(text: str, first_logprobs=None) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=3, first_logprobs=first_logprobs)


def requests(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"request {i}"}] for i in range(n)]


def scripted(replies: dict[str, list[str]]) -> FakeBackend:
    """Answers the k-th time it sees a request with ``replies[request][k]``."""
    seen: dict[str, int] = {}

    def respond(conversation):
        text = conversation[-1]["content"]
        seen[text] = seen.get(text, 0) + 1
        return stop(replies[text][seen[text] - 1])

    return FakeBackend(respond, "fake/judge")


def test_judge_request_is_one_stripped_user_message_from_the_template():
    (message,) = judge_request("eval_coherence_judge.j2", prompt="How do I boil an egg?", response="Boil it.")
    assert message["role"] == "user" and message["content"] == message["content"].strip()
    assert "How do I boil an egg?" in message["content"] and "Boil it." in message["content"]


def test_read_score_counts_refusals_only_when_asked():
    refusal = stop("I'm sorry, but I can't rate that. 10")
    assert read_score(stop("Score: 8/10")) == (80.0, None)
    assert read_score(stop("7/10"), scale=10) == (7.0, None)
    assert read_score(stop("no number")) == (None, "unparseable")
    assert read_score(refusal) == (10.0, None)  # the GRPO reward reads the number
    assert read_score(refusal, refusals=True) == (None, "refused")  # the eval judge counts a refusal


def test_read_choice_and_yes_no():
    assert read_choice(stop("B", {"A": math.log(0.25), "B": math.log(0.75)})) == ((pytest.approx(0.25), "logprobs"), None)
    assert read_choice(stop("(A)")) == ((1.0, "text"), None)
    assert read_choice(stop("Hmm")) == (None, "unparseable")
    assert read_choice(stop("I cannot help with that.")) == (None, "refused")
    assert read_yes_no(stop("Yes.")) == (True, None) and read_yes_no(stop("no")) == (False, None)
    assert read_yes_no(stop("maybe")) == (None, "unparseable")
    assert yes_no_verdict(stop("x", {" no": -0.1, "yes": -2.0})) is False


def test_rounds_resend_only_failures_and_count_every_failed_reply():
    judge = scripted({"request 0": ["73"], "request 1": ["junk", "I cannot help with that.", "55"],
                      "request 2": ["junk", "still junk", "nothing"]})
    rounds = judge_rounds(judge, requests(3), SAMPLING, partial(read_score, refusals=True), retries=2, desc="test")

    assert rounds.values == [73.0, 55.0, None]
    assert rounds.reasons == [None, None, "unparseable"]
    assert rounds.missing == [2]
    assert [r.text for r in rounds.replies] == ["73", "55", "nothing"]
    assert [len(c["conversations"]) for c in judge.calls] == [3, 2, 2]
    assert [c["desc"] for c in judge.calls] == ["test", "test (retry 1)", "test (retry 2)"]
    assert all(c["sampling"] is SAMPLING for c in judge.calls)
    assert rounds.counts == {"requests": 7, "retried": 4, "unparseable": 4, "refused": 1}
    assert rounds.examples == ["junk", "junk", "I cannot help with that.", "still junk", "nothing"]


def test_rounds_keep_a_few_examples_and_send_nothing_for_no_requests():
    judge = FakeBackend(lambda c: stop("hard to say"))
    rounds = judge_rounds(judge, requests(EXAMPLES_KEPT + 3), SAMPLING, read_yes_no)
    assert len(judge.calls) == 1 and len(rounds.examples) == EXAMPLES_KEPT
    assert rounds.counts == {"requests": EXAMPLES_KEPT + 3, "unparseable": EXAMPLES_KEPT + 3}

    silent = FakeBackend(lambda c: stop("yes"))
    empty = judge_rounds(silent, [], SAMPLING, read_yes_no, retries=3)
    assert silent.calls == [] and empty.values == [] and empty.counts["requests"] == 0


def test_a_raising_judge_propagates_unless_tolerated():
    state = {"calls": 0}

    class Flaky(FakeBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            state["calls"] += 1
            if state["calls"] == 1:
                raise ConnectionError("server restarting")
            return super().chat(conversations, sampling, adapter, desc)

    with pytest.raises(ConnectionError):
        judge_rounds(Flaky(lambda c: stop("50")), requests(2), SAMPLING, read_score, retries=1)

    state["calls"] = 0
    rounds = judge_rounds(Flaky(lambda c: stop("50")), requests(2), SAMPLING, read_score, retries=1,
                          tolerate_errors=True)
    assert rounds.values == [50.0, 50.0] and rounds.last_error is None
    assert [str(e) for e in rounds.errors] == ["server restarting"]
    assert rounds.counts == {"requests": 4, "retried": 2}  # the raised round counts as sent

    class Down(FakeBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            raise ConnectionError("refused")

    rounds = judge_rounds(Down(None), requests(2), SAMPLING, read_score, retries=2, tolerate_errors=True)
    assert rounds.values == [None, None] and rounds.missing == [0, 1] and rounds.replies == [None, None]
    assert len(rounds.errors) == 3 and isinstance(rounds.last_error, ConnectionError)


def test_bad_retries_and_a_short_backend_are_errors():
    with pytest.raises(UserError, match="judge retries: -1"):
        judge_rounds(FakeBackend(lambda c: stop("1")), requests(1), SAMPLING, read_score, retries=-1)

    class Short(FakeBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            return super().chat(conversations, sampling, adapter, desc)[:-1]

    with pytest.raises(RuntimeError, match="1 replies for 2 requests"):
        judge_rounds(Short(lambda c: stop("1")), requests(2), SAMPLING, read_score)
