"""Capability check: did training the persona cost the model general ability, and was the
evaluation clean?

Two measurements on the base model and on base + each adapter, under transformers + PEFT:
the perplexity of neutral encyclopedic text, and the accuracy on easy general-knowledge
multiple-choice questions (both shipped in ``character_training/data/``, beside 48 neutral user
prompts). ``run_lm_eval`` hands the same conditions to lm-evaluation-harness where it is
installed. ``contamination_report`` checks that evaluation prompts do not appear, exactly or
nearly, in what a run trained on (``training_texts_of_run``).

Nothing here writes files: callers get dicts and decide where they go.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

from character_training.config import yamlio
from character_training.errors import UserError
from character_training.adapters.io import check_adapter_dir
from character_training.evaluation.core import BASE
from character_training.evaluation.likelihood import TEXTS, continuation_nll, pad_id_of

MC_PROMPT = "Question: {question}\nAnswer:"


# -- shipped data --------------------------------------------------------------------------

def _data_text(name: str) -> str:
    return (resources.files("character_training") / "data" / name).read_text(encoding="utf-8")


def load_general_prompts() -> list[dict]:
    """The shipped general user prompts (written for this project, not derived from any
    constitution): [{"prompt", "category"}], about 20 for each of 12 categories."""
    categories = yamlio.load(_data_text("general_prompts.yaml"))
    return [{"prompt": p, "category": c} for c, prompts in categories.items() for p in prompts]


def general_prompts(n: int) -> list[str]:
    """The first ``n`` general prompts taken a category at a time in turn (advice, explanation,
    how-to, ...), so that any ``n`` spreads over every kind of request."""
    by_category: dict[str, list[str]] = {}
    for record in load_general_prompts():
        by_category.setdefault(record["category"], []).append(record["prompt"])
    columns = list(by_category.values())
    interleaved = [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]
    return interleaved[:n]


def load_neutral_text() -> list[dict]:
    """The shipped neutral encyclopedic paragraphs: [{"text", "topic"}]."""
    return [json.loads(line) for line in _data_text("neutral_text.jsonl").splitlines() if line.strip()]


def load_multiple_choice() -> list[dict]:
    """The shipped multiple-choice questions: [{"question", "choices", "answer", "subject"}],
    ``answer`` being the index of the correct choice."""
    return [json.loads(line) for line in _data_text("multiple_choice.jsonl").splitlines() if line.strip()]


# -- scoring -------------------------------------------------------------------------------

def _prefix(tokenizer) -> list[int]:
    """The token a text is scored after, so that its first token is scored too: BOS, or EOS
    where there is none (lm-evaluation-harness's choice for rolling log-likelihoods)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return [token]
    return []


def continuation_logprobs(model, tokenizer, requests: list[tuple[list[int], list[int]]], *,
                          batch_size: int = 8, desc: str = "scoring") -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation given its context, both
    token-id lists, the context never empty: the shared scorer (likelihood.py) with the
    batching these numbers were first published with (longest first, masked, whole batch)."""
    scores = continuation_nll(model, requests, pad_id=pad_id_of(tokenizer, fallback=0), batching=TEXTS,
                              batch_size=batch_size, desc=desc, unit="text")
    return [(-nll, n) for nll, n in scores]


def text_perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> dict:
    """Token-weighted perplexity of ``texts``: exp of the mean negative log-likelihood over all
    their tokens (every token scored, the first one after the BOS token, see ``_prefix``).
    Returns {"perplexity", "tokens", "nll"}, ``nll`` being that mean, in nats per token."""
    prefix = _prefix(tokenizer)
    requests = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        requests.append((prefix, ids) if prefix else (ids[:1], ids[1:]))
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=batch_size, desc="perplexity")
    tokens = sum(n for _, n in scores)
    nll = -sum(lp for lp, _ in scores) / tokens if tokens else float("nan")
    return {"perplexity": math.exp(nll) if tokens else float("nan"), "tokens": tokens, "nll": nll}


def multiple_choice_accuracy(model, tokenizer, items: list[dict], batch_size: int = 8) -> dict:
    """Zero-shot multiple choice by log-likelihood, like lm-evaluation-harness's ``acc`` and
    ``acc_norm``.

    The prompt is plain text, not a chat: "Question: {question}\\nAnswer:", scored after the BOS
    token; each choice is the continuation " {choice}". The chosen answer maximises the
    continuation's summed log-likelihood (``accuracy``) or that sum divided by the
    continuation's length in UTF-8 bytes (``accuracy_norm``, which does not favour short
    choices). A plain prompt measures knowledge without measuring how a chat template or a
    persona's voice changes the answer's format. ``ci95`` is the Wilson interval of ``accuracy``.
    """
    _check_items(items)
    prefix = _prefix(tokenizer)
    requests, owners = [], []
    for q, item in enumerate(items):
        context = prefix + tokenizer(MC_PROMPT.format(question=item["question"]), add_special_tokens=False)["input_ids"]
        for choice in item["choices"]:
            requests.append((context, tokenizer(" " + choice, add_special_tokens=False)["input_ids"]))
            owners.append(q)
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=batch_size, desc="multiple choice")
    per_item: list[list[float]] = [[] for _ in items]
    for q, (logprob, _) in zip(owners, scores):
        per_item[q].append(logprob)
    correct, correct_norm, per_subject = 0, 0, {}
    for item, logprobs in zip(items, per_item):
        normed = [lp / len((" " + c).encode("utf-8")) for lp, c in zip(logprobs, item["choices"])]
        hit = _argmax(logprobs) == item["answer"]
        correct += hit
        correct_norm += _argmax(normed) == item["answer"]
        subject = per_subject.setdefault(item.get("subject", "unknown"), {"correct": 0, "n": 0})
        subject["correct"] += hit
        subject["n"] += 1
    n = len(items)
    return {
        "accuracy": correct / n if n else float("nan"),
        "accuracy_norm": correct_norm / n if n else float("nan"),
        "n": n,
        "ci95": list(wilson_interval(correct, n)),
        "per_subject": {s: {"accuracy": v["correct"] / v["n"], "n": v["n"]} for s, v in sorted(per_subject.items())},
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _check_items(items: list[dict]) -> None:
    for i, item in enumerate(items):
        missing = [k for k in ("question", "choices", "answer") if k not in item]
        if missing:
            raise UserError(f"multiple-choice item {i}: missing '{missing[0]}'; each item needs "
                            "'question', 'choices' and 'answer' (the index of the correct choice)")
        if len(item["choices"]) < 2 or not 0 <= item["answer"] < len(item["choices"]):
            raise UserError(f"multiple-choice item {i}: 'answer' {item['answer']} is not an index into "
                            f"its {len(item['choices'])} choices (counting from 0)")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sensible at small n and at 0 or 1, unlike p +- z*se)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# -- conditions ----------------------------------------------------------------------------

def capability_report(model_path: str, adapters: dict[str, str], *, texts: list[str] | None = None,
                      mc: list[dict] | None = None, batch_size: int = 8) -> dict:
    """Perplexity of ``texts`` and multiple-choice accuracy on ``mc`` (the shipped sets by
    default) for the base model and for base + each adapter, with each adapter's deltas
    against the base (adapter minus base).

    The base is loaded once and scored before any adapter touches it; the adapters are then
    loaded into it with PEFT and switched on one at a time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if BASE in adapters:
        raise UserError(f"adapter name '{BASE}' is taken by the base model; name the adapter something else")
    texts = [t["text"] for t in load_neutral_text()] if texts is None else texts
    mc = load_multiple_choice() if mc is None else mc
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()

    def measure(m) -> dict:
        return {"text": text_perplexity(m, tokenizer, texts, batch_size=batch_size),
                "multiple_choice": multiple_choice_accuracy(m, tokenizer, mc, batch_size=batch_size)}

    conditions = {BASE: measure(model)}
    peft_model = None
    for i, (name, path) in enumerate(adapters.items()):
        check_adapter_dir(path, f"adapter '{name}':")
        slot = f"adapter_{i}"  # PEFT's adapter names become module keys: a user's name may not fit
        if peft_model is None:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=slot).eval()
        else:
            peft_model.load_adapter(str(path), adapter_name=slot)
        peft_model.set_adapter(slot)
        conditions[name] = measure(peft_model)

    base = conditions[BASE]
    deltas = {name: {"perplexity": c["text"]["perplexity"] - base["text"]["perplexity"],
                     "nll": c["text"]["nll"] - base["text"]["nll"],
                     "accuracy": c["multiple_choice"]["accuracy"] - base["multiple_choice"]["accuracy"],
                     "accuracy_norm": c["multiple_choice"]["accuracy_norm"] - base["multiple_choice"]["accuracy_norm"]}
              for name, c in conditions.items() if name != BASE}
    return {"model": str(model_path), "adapters": {k: str(v) for k, v in adapters.items()},
            "conditions": conditions, "deltas": deltas, "texts": len(texts), "questions": len(mc)}


def run_lm_eval(model_path: str, adapter: str | None, tasks: list[str], limit: int | float | None = None) -> dict:
    """lm-evaluation-harness's results for the base model (``adapter`` None) or base + adapter.
    Optional: the harness is not a dependency, and its tasks download their data sets unless
    they are already in the Hugging Face datasets cache."""
    try:
        import lm_eval
    except ImportError as exc:
        raise UserError("run_lm_eval needs lm-evaluation-harness, which is not installed; run "
                        "`pip install lm-eval`. Its tasks read their data sets from the Hugging Face "
                        "datasets cache: offline (HF_DATASETS_OFFLINE=1) they must already be there, so "
                        "run each task once on a machine with network access first") from exc
    model_args = f"pretrained={model_path}" + (f",peft={adapter}" if adapter else "")
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, limit=limit)
    return out["results"]


# -- contamination: evaluation/contamination.py; what a run trains on: ---------------------------

# Which stage files a run trains on, and what text each record holds.
def training_texts_of_run(run_dir) -> dict[str, list[str]]:
    """Every text a run's training data holds, keyed by source ("stage/file"), from the files
    config/layout.py names: the user turns of the pair files' prompts; the user and assistant turns
    of the chat files; the "text" of the documents; and the train-split prompts of the prompts
    stage. Files that are missing are skipped."""
    from character_training.config import layout
    from data_gen.store import read_jsonl

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    found: dict[str, list[str]] = {}

    def add(stage: str, kind: dict[str, str], texts) -> None:
        path = layout.data_file(run_dir, stage, kind)
        if path.is_file():
            found[f"{stage}/{path.name}"] = texts(read_jsonl(path))

    for stage in sorted(layout.PAIRS):
        add(stage, layout.PAIRS, lambda records: [t for r in records for t in _turns(r["prompt"], ("user",))])
    for stage in layout.CHATS:
        add(stage, layout.CHATS,
            lambda records: [t for r in records for t in _turns(r["messages"], ("user", "assistant"))])
    for stage in layout.DOCUMENTS:
        add(stage, layout.DOCUMENTS, lambda records: [r["text"] for r in records])
    add("prompts", {"prompts": layout.PROMPTS}, lambda records: [r["prompt"] for r in records if r.get("split") == "train"])
    return found


def _turns(messages, roles: tuple[str, ...]) -> list[str]:
    if isinstance(messages, str):  # TRL's standard (non-conversational) format
        return [messages] if "user" in roles else []
    return [m["content"] for m in messages if m.get("role") in roles and isinstance(m.get("content"), str)]
