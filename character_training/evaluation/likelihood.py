"""The batched log-likelihood scorer, shared by the answer perplexities (quick check and
report), the capability check (neutral-text perplexity, multiple choice) and the persona
vectors (which pad the same way to read activations).

A request is (context ids, continuation ids); its score is the summed negative log-likelihood
of the continuation given the context, and the continuation's token count. Batches are
right-padded: under causal attention no real token sees the padding after it, so a request
scores as it would alone (to float precision). Each caller keeps the batching its numbers were
first published with (``Batching``): fp32 results move in the last bits when the batch order,
the attention path or the order of the summation changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Request = tuple[list[int], list[int]]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the right for scoring and reading activations
    (positions of the real tokens stay 0..n-1) or on the left for generation (every prompt
    ends at the edge)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_id_of(tokenizer, fallback: int | None = None) -> int:
    """The tokenizer's pad id; else ``fallback`` (None: its EOS id). Right padding is never
    attended by a real token, so the choice does not change a score."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if fallback is None else fallback


def chat_prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """The conversation rendered with the chat template and the generation prompt, tokenized
    without special tokens, as vLLM does: the template holds them."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Batching:
    """How a caller's requests are batched and summed. Each caller keeps the way its numbers
    were first published: in fp32 the last bits move when these change."""
    longest_first: bool    # True: a batch holds texts of similar length and the first shows memory trouble
    attention_mask: bool   # False: no mask; right padding is behind every real token anyway
    whole_batch: bool      # True: one cross-entropy over the batch, masked; False: one per row


ANSWERS = Batching(longest_first=False, attention_mask=False, whole_batch=False)  # answer perplexities
TEXTS = Batching(longest_first=True, attention_mask=True, whole_batch=True)       # capability check


def continuation_nll(model, requests: list[Request], *, pad_id: int, batching: Batching = TEXTS,
                     batch_size: int = 8, desc: str = "scoring", unit: str = "text") -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each request's continuation given its
    context; (0.0, 0) for an empty continuation, which is not scored. Requests are scored in
    batches of ``batch_size`` in length order. Nothing is truncated: a sequence must fit the
    model's context window."""
    if any(not context for context, _ in requests):
        raise ValueError("every request needs a non-empty context: the first token has nothing to be predicted from")
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    todo = [i for i, (_, continuation) in enumerate(requests) if continuation]
    order = sorted(todo, key=lambda i: len(requests[i][0]) + len(requests[i][1]), reverse=batching.longest_first)
    device = next(model.parameters()).device
    with tqdm(total=len(requests), desc=desc, unit=unit) as bar:
        bar.update(len(requests) - len(order))  # empty continuations: nothing to score
        for start in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[start:start + batch_size]]
            ids, mask = pad_batch([context + continuation for context, continuation in batch], pad_id)
            masks = {"attention_mask": mask.to(device)} if batching.attention_mask else {}
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), **masks).logits
            sums = (_masked_sums if batching.whole_batch else _row_sums)(logits, ids.to(device), batch)
            for i, value, (_, continuation) in zip(order[start:start + batch_size], sums, batch):
                scores[i] = (value, len(continuation))
            bar.update(len(batch))
    return scores


def _row_sums(logits: torch.Tensor, ids: torch.Tensor, batch: list[Request]) -> list[float]:
    """Each row's continuation scored on its own slice of the logits."""
    logits = logits.float()
    out = []
    for row, (context, continuation) in enumerate(batch):
        scored = logits[row, len(context) - 1:len(context) + len(continuation) - 1]
        target = torch.tensor(continuation, device=scored.device)
        out.append(float(torch.nn.functional.cross_entropy(scored, target, reduction="sum")))
    return out


def _masked_sums(logits: torch.Tensor, ids: torch.Tensor, batch: list[Request]) -> list[float]:
    """One cross-entropy over the whole batch's shifted targets, summed over each row's
    continuation positions."""
    scored = torch.zeros((len(batch), ids.shape[1] - 1), dtype=torch.bool, device=ids.device)
    for row, (context, continuation) in enumerate(batch):
        scored[row, len(context) - 1:len(context) + len(continuation) - 1] = True
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return [float(v) for v in (nll * scored).sum(dim=1)]


_LM_CACHE: dict[str, object] = {}


def base_lm(model_path: str):
    """The base model, float32 on the CPU, loaded once per process (the quick check scores
    every condition's answers with it)."""
    from transformers import AutoModelForCausalLM

    if model_path not in _LM_CACHE:
        _LM_CACHE[model_path] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return _LM_CACHE[model_path]


def answer_perplexities(model_path: str, prompts: list[str], answers: list[str], desc: str,
                        batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each answer given its user prompt,
    under the base model without a system prompt; (0.0, 0) for an empty answer. Shortest
    first and without an attention mask: the published perplexities were computed so."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    requests = [(chat_prompt_ids(tok, [{"role": "user", "content": prompt}]),
                 tok(answer, add_special_tokens=False)["input_ids"]) for prompt, answer in zip(prompts, answers)]
    return continuation_nll(base_lm(model_path), requests, pad_id=pad_id_of(tok, fallback=0), batching=ANSWERS,
                            batch_size=batch_size, desc=desc, unit="answer")
