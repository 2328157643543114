"""The contamination check: evaluation prompts that training saw are dropped and counted."""
from __future__ import annotations

import random

import pytest

from character_training.evaluation.contamination import check_contamination, normalize

TRAINING_PROMPT = ("Explain in simple terms why the sky looks blue during the day but turns red "
                   "and orange near sunset")  # 20 words
DOCUMENT = ("Field notes from the coastal weather station. The morning was calm and the barometer "
            "held steady until noon. A visiting student asked me how do sailors read the clouds "
            "to predict a storm before it arrives, and I told her about mares' tails and mackerel "
            "skies. By evening the wind had turned east and the first squalls came in off the "
            "water, exactly as the old rhyme promised.")
QUOTED_PROMPT = "How do sailors read the clouds to predict a storm before it arrives?"


def test_normalize():
    assert normalize("  Hello,   WORLD!\n") == "hello world"
    assert normalize("ＡＢＣ ﬁne") == "abc fine"  # NFKC: full-width letters, ligature


def test_exact_duplicate_with_other_case_and_punctuation_is_normalized():
    result = check_contamination(["explain, in SIMPLE terms: why the sky looks blue during the day "
                                  "but turns red and orange near sunset!!"], [TRAINING_PROMPT])
    assert result.kept == []
    [record] = result.dropped
    assert record["reason"] == "normalized"
    assert record["match"] == TRAINING_PROMPT
    assert record["overlap"] == 1.0


def test_one_word_changed_is_ngram():
    words = TRAINING_PROMPT.split()
    words[2] = "plain"  # "simple" -> "plain"
    result = check_contamination([" ".join(words)], [TRAINING_PROMPT])
    [record] = result.dropped
    assert record["reason"] == "ngram"
    assert 0.5 <= record["overlap"] < 1.0


def test_prompt_quoted_in_a_long_document_is_quoted():
    result = check_contamination([QUOTED_PROMPT], ["an unrelated text about bread", DOCUMENT])
    [record] = result.dropped
    assert record["reason"] == "quoted"
    assert record["match"] == DOCUMENT[:200]


def test_unrelated_prompt_on_the_same_topic_is_kept():
    prompts = ["What colour would the sky be on a planet with a thicker atmosphere than ours?",
               "Why do storms at sea seem to arrive faster in the evening?"]
    result = check_contamination(prompts, [TRAINING_PROMPT, DOCUMENT])
    assert result.kept == prompts and result.dropped == []


def test_short_prompts_are_not_dropped_for_sharing_common_words():
    training = ["Hi! How are you doing today, my friend?",
                "Rain is water that falls from clouds; what is the reason clouds form at all?"]
    result = check_contamination(["Hi!", "What is rain?"], training)
    assert result.kept == ["Hi!", "What is rain?"]


def test_an_exactly_equal_short_prompt_is_dropped():
    training = ["hi", "what is rain", "x"]
    result = check_contamination(["Hi!", "What is rain?", "Hello there"], training)
    assert result.kept == ["Hello there"]
    assert [r["reason"] for r in result.dropped] == ["normalized", "normalized"]


def test_counts_add_up_and_kept_keeps_input_order():
    words = TRAINING_PROMPT.split()
    words[2] = "plain"
    prompts = ["Tell me a story about a lighthouse keeper.", TRAINING_PROMPT.upper(),
               "What makes bread rise in the oven?", " ".join(words), QUOTED_PROMPT,
               "Which birds migrate the farthest each year?"]
    result = check_contamination(prompts, [TRAINING_PROMPT, DOCUMENT])
    assert result.kept == [prompts[0], prompts[2], prompts[5]]
    counts = result.counts()
    assert counts == {"checked": 6, "kept": 3, "dropped": 3,
                      "by_reason": {"normalized": 1, "ngram": 1, "quoted": 1}}
    assert counts["kept"] + counts["dropped"] == counts["checked"] == len(prompts)


def test_counts_list_every_reason_when_nothing_is_dropped():
    counts = check_contamination(["a clean prompt about nothing"], []).counts()
    assert counts["by_reason"] == {"normalized": 0, "ngram": 0, "quoted": 0}


def test_empty_training_set_keeps_everything():
    prompts = ["Hi!", TRAINING_PROMPT, QUOTED_PROMPT, ""]
    result = check_contamination(prompts, [])
    assert result.kept == prompts and result.dropped == []
    assert result.counts()["checked"] == 4


def test_many_training_texts_complete():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    training = [" ".join(rng.choices(vocab, k=200)) for _ in range(2000)]
    prompts = [" ".join(rng.choices(vocab, k=rng.randint(1, 30))) for _ in range(98)]
    prompts += [training[5].upper(), " ".join(training[7].split()[50:70])]  # a copy, a quote
    result = check_contamination(prompts, training)
    counts = result.counts()
    assert counts["checked"] == 100 and counts["kept"] + counts["dropped"] == 100
    assert [r["reason"] for r in result.dropped] == ["normalized", "quoted"]


def test_one_word_changed_in_the_middle_is_a_near_duplicate_by_word_set():
    training = ["What is the best way to learn the cello as an adult beginner?", "Tell me about whales."]
    result = check_contamination(["What is the best way to learn the violin as an adult beginner?",
                                  "What is the best way to cook rice for a family of four?"], training)
    [dropped] = result.dropped
    assert dropped["reason"] == "ngram" and dropped["overlap"] == pytest.approx(11 / 13)
    assert result.kept == ["What is the best way to cook rice for a family of four?"]
