"""Quick persona check: did the persona take, without the system prompt, on held-out prompts?

Generates with vLLM under three conditions on the held-out prompts: the base model without a
system prompt, the base model with the constitution as system prompt, and base + adapter
without a system prompt. Scores each answer with a classifier trained on the pairs stage's
teacher (persona) vs student (plain) answers: embeddings from the packaged all-MiniLM-L6-v2
plus logistic regression. A classifier alone is fooled by degenerate text (it is "not the
plain assistant" too), so coherence is reported beside it: the share of distinct word
3-grams per answer and the perplexity of the answers under the base model.

Each prompt can be answered several times (``samples_per_prompt``): on the demo, the base
model's rate over 24 answers was 0.21 for one sample per prompt and 0.04 for another, a spread
as large as the effects being measured.

Writes ``answers.jsonl`` (every answer) and ``eval.json`` (every number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data_gen.backends import Backend, Sampling
from data_gen.scoring import PersonaClassifier
from data_gen.filters import distinct_3gram_share
from data_gen.store import read_jsonl, write_json, write_jsonl

BASE, PROMPTED, ADAPTER = "base", "base+system_prompt", "adapter"


@dataclass(frozen=True)
class Condition:
    name: str
    system_prompt: str | None = None
    adapter: str | None = None

    def conversation(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [{"role": "user", "content": prompt}]


def bootstrap_interval(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def answer_perplexities(model_path: str, prompts: list[str], answers: list[str], desc: str,
                        batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each answer given its user prompt,
    under the base model without a system prompt. Batched, right-padded and in length order:
    in a causal model no real token sees the padding after it, so each row scores as it would alone."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = _base_lm(model_path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for prompt, answer in zip(prompts, answers):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        rows.append((tok(head, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted((i for i, (_, a) in enumerate(rows) if a), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    with tqdm(total=len(rows), desc=desc, unit="answer") as bar:
        bar.update(len(rows) - len(order))  # empty answers: nothing to score
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [rows[i][0] + rows[i][1] for i in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in seqs])
            with torch.no_grad():
                logits = model(ids).logits.float()
            for row, i in enumerate(chunk):
                head_ids, answer_ids = rows[i]
                scored = logits[row, len(head_ids) - 1:len(head_ids) + len(answer_ids) - 1]
                nll = torch.nn.functional.cross_entropy(scored, torch.tensor(answer_ids), reduction="sum")
                out[i] = (float(nll), len(answer_ids))
            bar.update(len(chunk))
    return out


_LM_CACHE: dict[str, object] = {}


def _base_lm(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if model_path not in _LM_CACHE:
        _LM_CACHE[model_path] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return _LM_CACHE[model_path]


def quick_check(backend: Backend, model_path: str, conditions: list[Condition], heldout: list[str],
                pairs_path: Path, out_dir: Path, *, sampling: Sampling = Sampling(temperature=0.7, max_tokens=160),
                seed: int = 0, classifier: PersonaClassifier | None = None, samples_per_prompt: int = 1) -> dict:
    """Each condition answers every held-out prompt ``samples_per_prompt`` times (sampled, so the
    answers differ); the rate's interval resamples prompts, not answers, so that several answers
    to one prompt do not pass for independent evidence."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: {samples_per_prompt}; give 1 or more")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = read_jsonl(Path(pairs_path))
    classifier = classifier or PersonaClassifier()
    classifier_info = classifier.fit([p["chosen"][-1]["content"] for p in pairs],
                                     [p["rejected"][-1]["content"] for p in pairs])
    records, results = [], {}
    k = samples_per_prompt
    asked = [p for p in heldout for _ in range(k)]
    for cond in conditions:
        completions = backend.chat([cond.conversation(p) for p in asked], sampling,
                                   adapter=cond.adapter, desc=f"eval: {cond.name}")
        texts = [c.text.strip() for c in completions]
        flags = classifier.persona_flags(texts)
        distinct = np.array([distinct_3gram_share(t) for t in texts])
        nll = answer_perplexities(model_path, asked, texts, desc=f"perplexity: {cond.name}")
        tokens = sum(n for _, n in nll)
        lo, hi = bootstrap_interval(np.asarray(flags, dtype=float).reshape(len(heldout), k).mean(axis=1), seed=seed)
        results[cond.name] = {
            "persona_rate": float(flags.mean()),
            "persona_rate_ci95": [lo, hi],
            "distinct_3grams": float(distinct.mean()),
            "perplexity": math.exp(sum(v for v, _ in nll) / tokens) if tokens else float("nan"),
            "unfinished": sum(not c.finished for c in completions),
            "empty": sum(not t for t in texts),
            "answers": len(texts),
            "mean_tokens": float(np.mean([c.num_tokens for c in completions])),
        }
        records += [{"condition": cond.name, "prompt": p, "sample": i % k, "answer": t, "persona": bool(f),
                     "finish_reason": c.finish_reason}
                    for i, (p, t, f, c) in enumerate(zip(asked, texts, flags, completions))]
    write_jsonl(out_dir / "answers.jsonl", records)
    report = {"conditions": results, "classifier": classifier_info, "heldout_prompts": len(heldout),
              "samples_per_prompt": k, "sampling": sampling.to_dict(), "seed": seed}
    if BASE in results and PROMPTED in results and ADAPTER in results:
        report["adapter_over_system_prompt"] = _ratio(results[ADAPTER]["persona_rate"], results[PROMPTED]["persona_rate"])
    write_json(out_dir / "eval.json", report)
    return report


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def format_table(report: dict) -> str:
    rows = [f"{'condition':<22} {'persona rate':>12} {'95% CI':>15} {'distinct-3':>10} {'perplexity':>10} {'unfinished':>10}"]
    for name, r in report["conditions"].items():
        lo, hi = r["persona_rate_ci95"]
        rows.append(f"{name:<22} {r['persona_rate']:>12.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} "
                    f"{r['distinct_3grams']:>10.3f} {r['perplexity']:>10.2f} {r['unfinished']:>6}/{r['answers']}")
    if report.get("adapter_over_system_prompt") is not None:
        rows.append(f"adapter persona rate / system-prompted rate: {report['adapter_over_system_prompt']:.2f}")
    if report.get("samples_per_prompt", 1) > 1:
        rows.append(f"{report['heldout_prompts']} held-out prompts x {report['samples_per_prompt']} answers each "
                    "(the interval resamples prompts)")
    info = report["classifier"]
    if info.get("cv_accuracy") is not None:
        rows.append(f"classifier: {info['train_examples']} teacher/student answers, "
                    f"{info['cv_folds']}-fold accuracy {info['cv_accuracy']:.3f}")
    return "\n".join(rows)
