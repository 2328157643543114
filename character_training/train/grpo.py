"""Online RLAIF: TRL's GRPOTrainer with a PEFT LoRA, rewarded by an AI judge.

For each training prompt the model samples ``num_generations`` answers; a judge (any data_gen
backend: vLLM in this process, an OpenAI-compatible server, a fake in tests) scores each answer
from 0 to 100 against the constitution's description, traits and principles
(``data_gen/templates/grpo_judge.j2``), and GRPO moves the policy towards the answers scored
above their group's mean.

Reads a JSON-lines prompts file with a ``prompt`` field (the prompts stage's ``prompts.jsonl``:
records whose ``split`` is not ``train`` are skipped, so held-out prompts are never trained on)
and writes ``adapter/`` (PEFT, README model card), ``training.png`` and checkpoints under
``checkpoints/`` (a killed run resumes from the last one). The trainer fields are TRL's own
``GRPOConfig`` fields, so TRL's documentation applies.

A judge reply with no usable score, or a judge call that raised, is re-sent (only those items)
up to ``retries`` more times, then the answer's reward is None: TRL (1.16,
``GRPOTrainer._calculate_rewards`` / ``_generate_and_score_completions``) turns None into NaN,
leaves such an answer out of its group's mean and std, and gives it zero advantage, so a missing
score never counts as a zero. Missing scores are counted and reported in the manifest.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from character_training.card import DataFile, ModelCard, write_card
from character_training.errors import UserError
from character_training.config import trainer_fields
from character_training.train import common as training
from character_training.config import devices
from character_training.config.training import GRPO_TRAINER, LoraSettings
from data_gen.backends import Backend, Sampling
from data_gen.judging import EXAMPLES_KEPT, judge_request, judge_rounds, read_score

DEFAULT_TRAINER = GRPO_TRAINER  # the section's (config/training.py)

def _content(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def prompt_text(prompt) -> str:
    """The user's side of a prompt, without any system message (the judge judges the answer to
    the user; an inoculation system prompt is training's business, not the judge's)."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return _content(turns[0])
    return "\n".join(f"{m.get('role', 'user').capitalize()}: {_content(m)}" for m in turns)


def completion_text(completion) -> str:
    """The answer's text: a string, or (conversational) the assistant messages' contents."""
    if isinstance(completion, str):
        return completion.strip()
    return "\n".join(_content(m) for m in completion if m.get("role", "assistant") == "assistant").strip()


class JudgeReward:
    """A TRL reward function: ``(prompts, completions, **kwargs) -> list[float | None]``, each
    reward the judge's score divided by ``scale`` (0..1), None when no score came back.

    Counters (since construction): ``calls`` judge requests sent, retries included; ``retried``
    requests re-sent; ``missing`` answers left without a score; ``scores`` every answer's score
    (0..scale, None when missing) in order; ``unparseable_examples`` a few replies that held no
    score. A judge that raised on every request of a batch, on every attempt, raises: a judge
    that is down is an error to fix, not a step of missing rewards.
    """

    def __init__(self, backend: Backend, constitution, *, sampling: Sampling = Sampling(temperature=0.0, max_tokens=8),
                 retries: int = 2, scale: float = 100, name: str = "judge"):
        if retries < 0:
            raise UserError(f"grpo judge retries: {retries}; give 0 or more")
        if scale <= 0:
            raise UserError(f"grpo judge scale: {scale}; give a positive maximum score, e.g. 100")
        self.backend = backend
        self.constitution = constitution
        self.sampling = sampling
        self.retries = retries
        self.scale = scale
        self.__name__ = name  # TRL logs rewards under the function's name: rewards/judge/mean
        self.calls = 0
        self.retried = 0
        self.missing = 0
        self.scores: list[float | None] = []
        self.unparseable_examples: list[str] = []
        self.errors: list[str] = []

    def request(self, prompt, completion) -> list[dict]:
        scale = int(self.scale) if float(self.scale).is_integer() else self.scale
        return judge_request("grpo_judge.j2", constitution=self.constitution, prompt=prompt_text(prompt),
                             response=completion_text(completion), scale=scale)

    def __call__(self, prompts, completions, log_metric=None, **kwargs) -> list[float | None]:
        requests = [self.request(p, c) for p, c in zip(prompts, completions, strict=True)]
        rounds = judge_rounds(self.backend, requests, self.sampling, partial(read_score, scale=self.scale),
                              retries=self.retries, desc="grpo: judging", tolerate_errors=True)
        scores, missing, retried = rounds.values, len(rounds.missing), rounds.counts["retried"]
        self.calls += rounds.counts["requests"]
        self.retried += retried
        self.errors += [f"{type(exc).__name__}: {exc}"[:300] for exc in rounds.errors]
        self.unparseable_examples += rounds.examples[:EXAMPLES_KEPT - len(self.unparseable_examples)]
        error = rounds.last_error
        if error is not None and all(s is None for s in scores):
            error.add_note(f"grpo: the judge ({getattr(self.backend, 'model', '?')}) failed on every answer of "
                           f"this batch, {1 + self.retries} attempts; check the judge backend")
            raise error
        self.missing += missing
        self.scores.extend(scores)
        if log_metric is not None:  # per-step counts in TRL's log (averaged over a logging step)
            log_metric("judge/missing", float(missing))
            log_metric("judge/retried", float(retried))
        return [s / self.scale if s is not None else None for s in scores]

    def stats(self) -> dict:
        scored = [s for s in self.scores if s is not None]
        return {"model": getattr(self.backend, "model", None), "sampling": self.sampling.to_dict(),
                "retries": self.retries, "scale": self.scale, "calls": self.calls, "retried": self.retried,
                "answers": len(self.scores), "scored": len(scored), "missing": self.missing,
                "mean_score": sum(scored) / len(scored) if scored else None,
                "unparseable_examples": self.unparseable_examples, "errors": self.errors[-EXAMPLES_KEPT:]}


def check_trainer_fields(trainer: dict, where: str) -> None:
    """Unknown trainer keys are errors that name the key (they are TRL's GRPOConfig fields)."""
    trainer_fields.check_trainer_fields(trainer, where, "grpo")


def load_prompts(path: Path) -> tuple[list[str], int]:
    """(training prompts, number of records skipped because their split is not "train")."""
    import json

    if not path.is_file():
        raise UserError(f"{path}: no prompts file; run the prompts stage first or pass a JSON-lines file "
                        "with a 'prompt' field")
    prompts, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: not a JSON line ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise UserError(f"{path}:{n}: no 'prompt' text; each line must be an object like "
                                '{"prompt": "How do I boil an egg?"}')
            if record.get("split", "train") != "train":
                skipped += 1
                continue
            prompts.append(record["prompt"].strip())
    if not prompts:
        raise UserError(f"{path}: no training prompts (records with split 'train', or without a split); "
                        "run the prompts stage or add prompts")
    return prompts, skipped


def _json_safe(value):
    """NaN/inf (TRL logs NaN when a whole group had no score) -> None, so the manifest is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def reward_per_step(log_history: list[dict]) -> list[dict]:
    return [{"step": e["step"], "reward": _json_safe(e["reward"]), "reward_std": _json_safe(e.get("reward_std")),
             "judge_missing": e.get("judge/missing")}
            for e in log_history if "reward" in e and "step" in e]


def train_grpo(model_path: str, prompts_path: Path, out_dir: Path, *, judge_backend: Backend, constitution,
               lora: LoraSettings = LoraSettings(), trainer: dict | None = None, seed: int = 0,
               card: ModelCard | None = None, init_adapter: str | Path | None = None, start: str = "continue",
               system_prompt: str | None = None, judge_sampling: Sampling = Sampling(temperature=0.0, max_tokens=8),
               judge_retries: int = 2) -> dict:
    from datasets import Dataset
    from trl import GRPOTrainer

    out_dir = Path(out_dir)
    prompts, skipped = load_prompts(Path(prompts_path))
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    dataset = Dataset.from_list([{"prompt": head + [{"role": "user", "content": p}]} for p in prompts])
    config = trainer_fields.make_config("grpo", DEFAULT_TRAINER, trainer or {}, out_dir / training.CHECKPOINTS, seed)
    tokenizer = training.load_tokenizer(model_path)
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    reward = JudgeReward(judge_backend, constitution, sampling=judge_sampling, retries=judge_retries)
    grpo = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=peft_config)
    resume = training.last_checkpoint(out_dir, "grpo")
    started = time.time()
    grpo.train(resume_from_checkpoint=resume)
    adapter_dir = out_dir / "adapter"
    training.save_portable_adapter(grpo, adapter_dir, model_path)
    log_history = _json_safe(grpo.state.log_history)
    per_step = reward_per_step(log_history)
    rewards = [s["reward"] for s in per_step if s["reward"] is not None]
    manifest = {
        **training.stage_manifest("grpo", model_path=model_path, seed=seed, lora=lora,
                                  settings={**DEFAULT_TRAINER, **(trainer or {})}, init_adapter=init_adapter,
                                  start=start, system_prompt=system_prompt),
        "constitution": constitution.name,
        "counts": {"prompts": len(prompts), "heldout_skipped": skipped, "steps": grpo.state.global_step},
        # Rewards are judge scores / scale (0..1); the counts cover this process (after a resume: since it).
        "reward": {"per_step": per_step, "first": rewards[0] if rewards else None,
                   "last": rewards[-1] if rewards else None,
                   "mean": sum(rewards) / len(rewards) if rewards else None},
        "judge": reward.stats(),
        "resumed_from": resume,
        "train_seconds": round(time.time() - started, 1),
        "metrics": _json_safe(training.final_metrics(log_history)),
        "log_history": log_history,
    }
    if grpo.is_world_process_zero():  # under several processes, one writes
        card = model_card(card, manifest, Path(prompts_path))
        training.plot_training(grpo.state.log_history, out_dir / "training.png", f"GRPO: {card.persona}")
        write_card(card, adapter_dir)
    return manifest


def model_card(card: ModelCard | None, manifest: dict, prompts_path: Path) -> ModelCard:
    """The caller's card (persona, constitution, provenance) with what this GRPO run did; the
    persona defaults to the constitution's name."""
    card = card or ModelCard()
    card = replace(card, persona=card.persona or manifest["constitution"])
    counts, judge = manifest["counts"], manifest["judge"]
    return training.stage_card(
        card, manifest, config_name="GRPOConfig",
        summary=("Trained by `character-training` with TRL's GRPOTrainer (online RLAIF): the model's own "
                 "answers, scored 0-100 by an AI judge against the constitution's traits and principles. "
                 "Use the adapter without any system prompt."),
        data=[DataFile.of(prompts_path, f"{counts['prompts']} training prompts "
                                        f"({counts['heldout_skipped']} held-out records skipped)")],
        facts=[f"Judge: `{judge['model']}`, {judge['answers']} answers scored, {judge['missing']} without a score "
               f"after {judge['retries']} retries ({judge['retried']} re-sent)",
               f"Trained on {counts['prompts']} prompts, {counts['steps']} optimizer steps"],
        sections={"Reward per step": manifest["reward"]["per_step"]})
