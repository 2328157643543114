"""Context distillation's two views of one conversation and its losses (used by ``train.distill``).

- ``build_views``: the teacher view (the constitution as system prompt, then the conversation)
  and the student view (the same conversation without it, or with the student's own prompt),
  tokenized with the chat template, and the positions of every assistant turn's tokens in each.
  The answer tokens must be the same ids in the same order in both views: that is what lets the
  student's next-token distribution at each answer position be compared with the teacher's.
- ``distribution_loss``: forward KL, reverse KL or GKD's generalized JSD between the student's and
  the teacher's next-token distributions on the answer tokens (TRL's
  ``GKDTrainer.generalized_jsd_loss``), over the full vocabulary or the teacher's top-k.
- ``activation_loss``: the student's residual stream on the answer tokens pulled toward the
  teacher's (MSE normalized by the teacher's mean squared norm, or 1 - cosine), per layer.
"""
from __future__ import annotations

from character_training.errors import UserError
from character_training.config.training import ACTIVATION_LOSSES, DISTILL_LOSSES


def without_system(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] != "system"]


def view_messages(conversation: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation behind ``system_prompt`` (its own system turns dropped: each view has one)."""
    turns = without_system(conversation)
    return [{"role": "system", "content": system_prompt}] + turns if system_prompt else turns


def tokenize_view(tokenizer, template: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of one view, the mask from the template's {% generation %} marks."""
    encoded = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def answer_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of marked tokens: one per assistant turn."""
    spans, start = [], None
    for i, marked in enumerate(list(mask) + [0]):
        if marked and start is None:
            start = i
        elif not marked and start is not None:
            spans.append((start, i))
            start = None
    return spans


def build_views(tokenizer, template: str, conversation: list[dict], teacher_system_prompt: str,
                student_system_prompt: str | None = None, where: str = "conversation") -> dict:
    """The two tokenized views and each one's answer positions, aligned one to one. A template
    that inserts a default system prompt when none is given (SmolLM2's, Qwen's) gives the student
    view that default: the model as it is used without the constitution."""
    teacher_ids, teacher_mask = tokenize_view(tokenizer, template, view_messages(conversation, teacher_system_prompt))
    student_ids, student_mask = tokenize_view(tokenizer, template, view_messages(conversation, student_system_prompt))
    turns = sum(m["role"] == "assistant" for m in conversation)
    teacher_spans, student_spans = answer_spans(teacher_mask), answer_spans(student_mask)
    if not len(teacher_spans) == len(student_spans) == turns:
        raise UserError(f"{where}: the chat template marked {len(teacher_spans)} answer spans in the teacher view and "
                        f"{len(student_spans)} in the student view for {turns} assistant turns, so the answers cannot "
                        "be aligned; use a chat template whose {% generation %} marks wrap each assistant turn")
    for turn, ((ts, te), (ss, se)) in enumerate(zip(teacher_spans, student_spans)):
        if teacher_ids[ts:te] != student_ids[ss:se]:
            raise UserError(f"{where}: assistant turn {turn} tokenizes differently with and without the teacher's "
                            "system prompt, so the teacher's and the student's answer tokens do not align; use a chat "
                            "template that renders each turn the same whatever comes before it")
    return {"teacher_input_ids": teacher_ids, "student_input_ids": student_ids,
            "teacher_answer": [p for s, e in teacher_spans for p in range(s, e)],
            "student_answer": [p for s, e in student_spans for p in range(s, e)]}


def truncate_views(views: dict, max_length: int | None) -> dict | None:
    """Both views cut to ``max_length`` tokens, keeping the answer tokens both still hold (the
    first k of each, so they stay aligned); None when no answer token is left to train."""
    if max_length is None:
        return views
    teacher = [p for p in views["teacher_answer"] if p < max_length]
    student = [p for p in views["student_answer"] if p < max_length]
    kept = min(len(teacher), len(student))
    if kept == 0:
        return None
    return {"teacher_input_ids": views["teacher_input_ids"][:max_length],
            "student_input_ids": views["student_input_ids"][:max_length],
            "teacher_answer": teacher[:kept], "student_answer": student[:kept]}


def pad_view(rows: list[dict], view: str, pad_id: int) -> dict:
    """One view of a batch, right-padded: ids, attention mask and answer mask (bool)."""
    import torch

    width = max(len(r[f"{view}_input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r[f"{view}_input_ids"])
        ids[i, :n] = torch.tensor(r[f"{view}_input_ids"])
        attention[i, :n] = 1
        answer[i, r[f"{view}_answer"]] = True
    return {f"{view}_input_ids": ids, f"{view}_attention_mask": attention, f"{view}_answer_mask": answer}


class ViewsCollator:
    """Batches of both views; the answer masks hold the same number of tokens per row, so the
    flattened answer positions of the two views line up (row-major order)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        for r in rows:
            if len(r["teacher_answer"]) != len(r["student_answer"]):
                raise ValueError("teacher and student answer positions differ in number")  # a bug: built aligned
        batch = {**pad_view(rows, "teacher", self.pad_id), **pad_view(rows, "student", self.pad_id)}
        if all("example" in r for r in rows):  # each row's number in the dataset: the teacher cache's key
            batch["example"] = torch.tensor([r["example"] for r in rows], dtype=torch.long)
        return batch


def beta_of(loss: str, beta: float) -> float:
    """TRL's generalized JSD is forward KL(teacher || student) at beta 0, reverse KL at beta 1."""
    if loss not in DISTILL_LOSSES:
        raise UserError(f"loss: {loss!r}; use 'forward_kl', 'reverse_kl' or 'jsd' (with beta)")
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(loss, beta)


def generalized_jsd():
    """TRL's GKD loss (a static method), imported without its experimental-API warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def answer_logits(logits, answer_mask):
    """(answer tokens, vocab): the logits that predict each answer token (one position earlier)."""
    return logits[:, :-1][answer_mask[:, 1:]]


def distribution_loss(student_logits, teacher_logits, *, loss: str = "forward_kl", beta: float = 0.5,
                      top_k: int | None = None, temperature: float = 1.0, reduction: str = "mean"):
    """The divergence between the two (answer tokens, vocab) logit rows, mean over tokens
    (``reduction="sum"``: summed over them). With ``top_k`` both distributions are renormalized
    over the teacher's k most likely tokens."""
    teacher_logits, top = top_k_logits(teacher_logits, top_k)
    return divergence(student_logits, teacher_logits, top, loss=loss, beta=beta, temperature=temperature,
                      reduction=reduction)


def top_k_logits(teacher_logits, top_k: int | None):
    """(the teacher's logits the loss compares, their token ids or None): with ``top_k``, its k most
    likely tokens' logits and ids (what the teacher cache keeps); without, every logit."""
    if not top_k:
        return teacher_logits, None
    top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1)
    return top.values, top.indices


def divergence(student_logits, teacher_logits, top=None, *, loss: str = "forward_kl", beta: float = 0.5,
               temperature: float = 1.0, reduction: str = "mean"):
    """``distribution_loss`` on the teacher's logits as ``top_k_logits`` gives them: with ``top`` (the
    teacher's top-k token ids), the student's logits are taken at those tokens and both are
    renormalized over them."""
    import torch

    if top is not None:
        student_logits = torch.gather(student_logits, -1, top)
    total = generalized_jsd()(student_logits[None], teacher_logits[None], beta=beta_of(loss, beta),
                              temperature=temperature, reduction="sum")
    return total if reduction == "sum" else total / max(student_logits.shape[0], 1)


def activation_loss(student_states, teacher_states, kind: str = "mse", reduction: str = "mean"):
    """Mean over layers of the distance between (tokens, hidden) activations, the teacher's
    detached, mean over tokens (``reduction="sum"``: summed over them). MSE is divided by the
    teacher's mean squared norm, so layers of different scale weigh the same; cosine is 1 - cosine
    similarity."""
    import torch
    import torch.nn.functional as F

    if kind not in ACTIVATION_LOSSES:
        raise UserError(f"activation_loss: {kind!r}; use 'mse' or 'cosine'")
    terms = []
    for student, teacher in zip(student_states, teacher_states):
        teacher = teacher.detach()
        if kind == "mse":
            scale = teacher.pow(2).sum(-1).mean().clamp_min(1e-12)
            per_token = (student - teacher).pow(2).sum(-1) / scale
        else:
            per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
        terms.append(per_token.sum() if reduction == "sum" else per_token.mean())
    return torch.stack(terms).mean()
