"""Persona vectors: where in the model the persona lives, and whether the adapter gets there.

Per layer, the persona vector is the mean residual-stream activation over response tokens with
the constitution as system prompt minus the mean without it, on the same prompts, both read
from the base model. Projecting each condition's activations onto it answers: does the adapter,
with no system prompt, move the model's internals toward the persona, and how far relative to
the system prompt? (``projection_report``: ratio 1 = as far as the system prompt, 0 = not at all.)

The vector also drives the steering baseline: ``steered_generate`` adds it at one layer during
generation, with no system prompt and no adapter.

Layers are indexed like transformers' ``hidden_states``: 0 is the embeddings, ``l`` (1..L) is
the output of decoder layer ``l`` (``layers[l - 1]``); the last index is after the final norm,
as transformers returns it. Plain transformers + PEFT, float32, no vLLM.

``PersonaVectors.save`` writes ``persona_vectors.safetensors`` and ``persona_vectors.json``
into a directory.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from character_training.adapters.io import check_adapter_dir
from character_training.evaluation.core import PROMPTED, bootstrap_interval
from character_training.evaluation.paired import clustered_interval
from character_training.evaluation.likelihood import chat_prompt_ids, pad_batch, pad_id_of

TENSORS_FILE = "persona_vectors.safetensors"
META_FILE = "persona_vectors.json"


def load_model(model_path: str, adapter: str | Path | None = None):
    """(model in eval mode, tokenizer), float32, on CUDA when there is one;
    with the PEFT adapter applied when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)  # padding uses pad_id_of: EOS where there is no pad token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        check_adapter_dir(adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_activations(model, tokenizer, conversations: list[list[dict]], responses: list[str],
                         batch_size: int = 8, desc: str = "activations") -> torch.Tensor:
    """Mean hidden state over each response's tokens, at every layer: [L + 1, n, hidden], float32, CPU.

    Example ``i`` is ``conversations[i]`` rendered with the chat template and the generation
    prompt, followed by ``responses[i]`` tokenized on its own (so the boundary is exact).
    An empty response has no tokens to average: that is a ValueError naming the examples
    (``compute_persona_vectors`` drops and counts them before calling this).
    """
    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
    heads = [chat_prompt_ids(tokenizer, c) for c in conversations]
    answers = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    empty = [i for i, a in enumerate(answers) if not a]
    if empty:
        raise ValueError(f"{len(empty)} empty response(s) (examples {empty[:10]}) have no tokens to average; "
                         "drop them first")
    device, pad_id = _device(model), pad_id_of(tokenizer)
    out = []
    with tqdm(total=len(heads), desc=desc, unit="example") as bar:
        for start in range(0, len(heads), batch_size):
            batch = range(start, min(start + batch_size, len(heads)))
            ids, mask = pad_batch([heads[i] + answers[i] for i in batch], pad_id, side="right")
            response = torch.zeros_like(mask, dtype=torch.float32)
            for row, i in enumerate(batch):
                response[row, len(heads[i]):len(heads[i]) + len(answers[i])] = 1.0
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True, logits_to_keep=1).hidden_states
            weights = (response / response.sum(1, keepdim=True)).to(device)
            out.append(torch.stack([torch.einsum("bth,bt->bh", h.float(), weights).cpu() for h in hidden]))
            bar.update(len(batch))
    return torch.cat(out, dim=1)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _effect_size(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cohen's d of a vs b (difference of means over the pooled standard deviation)."""
    na, nb = len(a), len(b)
    if na + nb <= 2:
        return float("nan")
    pooled = ((na - 1) * a.var(unbiased=True) if na > 1 else 0.0) + ((nb - 1) * b.var(unbiased=True) if nb > 1 else 0.0)
    sd = math.sqrt(float(pooled) / (na + nb - 2))
    diff = float(a.mean() - b.mean())
    return diff / sd if sd > 0 else (float("nan") if diff == 0 else math.copysign(math.inf, diff))


@dataclass
class PersonaVectors:
    vectors: torch.Tensor        # [L + 1, hidden]: persona_mean - plain_mean
    plain_mean: torch.Tensor     # [L + 1, hidden]
    persona_mean: torch.Tensor   # [L + 1, hidden]
    separation: list[float]      # per layer: Cohen's d of persona vs plain projections
    best_layer: int              # argmax of separation over layers 1..L
    counts: dict[str, int] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.contiguous(), "plain_mean": self.plain_mean.contiguous(),
                   "persona_mean": self.persona_mean.contiguous()}, str(path / TENSORS_FILE))
        meta = {"separation": self.separation, "best_layer": self.best_layer, "counts": self.counts,
                "num_layers": self.vectors.shape[0] - 1, "hidden_size": self.vectors.shape[1],
                "vector_norms": self.vectors.norm(dim=-1).tolist()}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PersonaVectors":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / TENSORS_FILE).is_file() or not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path} has no saved persona vectors ({TENSORS_FILE} and {META_FILE}); "
                                    "compute them with compute_persona_vectors(...).save(path)")
        tensors = load_file(str(path / TENSORS_FILE))
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        return cls(tensors["vectors"], tensors["plain_mean"], tensors["persona_mean"],
                   [float(s) for s in meta["separation"]], int(meta["best_layer"]), meta.get("counts", {}))


def from_activations(persona: torch.Tensor, plain: torch.Tensor,
                     counts: dict[str, int] | None = None) -> PersonaVectors:
    """Persona vectors from the two conditions' activations, each [L + 1, n, hidden]."""
    persona_mean, plain_mean = persona.mean(1), plain.mean(1)
    vectors = persona_mean - plain_mean
    unit = _unit(vectors)
    p_proj = torch.einsum("lnh,lh->ln", persona, unit)
    q_proj = torch.einsum("lnh,lh->ln", plain, unit)
    separation = [_effect_size(p_proj[layer], q_proj[layer]) for layer in range(vectors.shape[0])]
    ranked = [(-math.inf if math.isnan(s) else s) for s in separation[1:]]
    best_layer = 1 + int(np.argmax(ranked))
    return PersonaVectors(vectors, plain_mean, persona_mean, separation, best_layer, dict(counts or {}))


def compute_persona_vectors(model, tokenizer, prompts: list[str], persona_responses: list[str],
                            plain_responses: list[str], system_prompt: str, batch_size: int = 8) -> PersonaVectors:
    """Persona vectors from the base model: the persona side is [system: system_prompt, user:
    prompt] + persona_responses[i], the plain side [user: prompt] + plain_responses[i].

    Empty responses are dropped on their own side and counted in ``counts`` (the vector is a
    difference of two means, so the sides need not stay paired)."""
    if not len(prompts) == len(persona_responses) == len(plain_responses):
        raise ValueError(f"{len(prompts)} prompts, {len(persona_responses)} persona responses and "
                         f"{len(plain_responses)} plain responses: they must be the same prompts, in order")

    def side(responses, head, desc):
        kept = [(p, r) for p, r in zip(prompts, responses) if tokenizer(r, add_special_tokens=False)["input_ids"]]
        acts = response_activations(model, tokenizer, [head + [{"role": "user", "content": p}] for p, _ in kept],
                                    [r for _, r in kept], batch_size=batch_size, desc=desc)
        return acts, len(responses) - len(kept)

    persona, persona_empty = side(persona_responses, [{"role": "system", "content": system_prompt}],
                                  "activations: persona")
    plain, plain_empty = side(plain_responses, [], "activations: plain")
    counts = {"prompts": len(prompts), "persona": persona.shape[1], "plain": plain.shape[1],
              "persona_empty_dropped": persona_empty, "plain_empty_dropped": plain_empty}
    return from_activations(persona, plain, counts)


def project(activations: torch.Tensor, pv: PersonaVectors) -> torch.Tensor:
    """[L + 1, n]: each example's activation minus the plain mean, onto the unit persona vector,
    per layer. The plain condition averages 0 and the persona condition the vector's norm."""
    centred = activations.float() - pv.plain_mean[:, None, :]
    return torch.einsum("lnh,lh->ln", centred, _unit(pv.vectors))


def _ratio_interval(values: np.ndarray, reference: np.ndarray, seed: int, clusters: np.ndarray | None = None,
                    reference_clusters: np.ndarray | None = None, resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of mean(values) / mean(reference). With ``clusters`` (each value's
    prompt), one draw of prompts serves both arms and brings each drawn prompt's values; without,
    each arm's values are resampled on their own."""
    if len(values) == 0 or len(reference) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    if clusters is None or reference_clusters is None:
        num = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
        den = reference[rng.integers(0, len(reference), size=(resamples, len(reference)))].mean(axis=1)
    else:
        labels, inverse = np.unique(np.concatenate([clusters, reference_clusters]), return_inverse=True)
        mine, theirs = inverse[:len(values)], inverse[len(values):]
        draws = rng.integers(0, len(labels), size=(resamples, len(labels)))

        def means(v, c):
            sums, counts = np.bincount(c, weights=v, minlength=len(labels)), np.bincount(c, minlength=len(labels))
            with np.errstate(divide="ignore", invalid="ignore"):
                return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)

        num, den = means(values, mine), means(reference, theirs)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num / den
    return [float(np.nanpercentile(ratios, 2.5)), float(np.nanpercentile(ratios, 97.5))]


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def projection_report(conditions: dict[str, torch.Tensor], pv: PersonaVectors, reference: str = PROMPTED,
                      seed: int = 0, prompts: dict[str, list[str]] | None = None) -> dict:
    """Per condition and layer: the mean projection onto the persona vector with its 95%
    bootstrap interval, and its ratio to the reference condition's (by default the base model
    with the constitution as system prompt). ``headline``: the ratios at ``pv.best_layer``,
    with bootstrap intervals. NaN where the reference's mean projection is 0. ``prompts``: each
    condition's prompt per answer; then the intervals resample prompts (clustered), and the
    ratio's draw of prompts is shared by both arms."""
    if reference not in conditions:
        raise ValueError(f"reference condition '{reference}' is not among the conditions {sorted(conditions)}")
    projections = {name: project(acts, pv).numpy().astype(np.float64) for name, acts in conditions.items()}
    ref_means = projections[reference].mean(axis=1)
    report = {}
    for name, proj in projections.items():
        means = proj.mean(axis=1)
        report[name] = {
            "n": int(proj.shape[1]),
            "mean_projection": [float(m) for m in means],
            "mean_projection_ci95": [list(clustered_interval(row, prompts[name], seed=seed) if prompts else
                                          bootstrap_interval(row, seed=seed)) for row in proj],
            "ratio_to_reference": [_ratio(float(m), float(r)) for m, r in zip(means, ref_means)],
        }
    layer = pv.best_layer
    headline = {name: {"ratio": report[name]["ratio_to_reference"][layer],
                       "ratio_ci95": _ratio_interval(proj[layer], projections[reference][layer], seed,
                                                     *((np.asarray(prompts[name]), np.asarray(prompts[reference]))
                                                       if prompts else ()))}
                for name, proj in projections.items()}
    return {"reference": reference, "best_layer": layer, "separation": [float(s) for s in pv.separation],
            "vector_norms": pv.vectors.norm(dim=-1).tolist(), "conditions": report, "headline": headline}


def decoder_layers(model):
    """The list of decoder layers, through a PeftModel wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for find in (lambda m: m.get_decoder().layers, lambda m: m.model.layers):
        try:
            return find(base)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} "
                     "(looked for .get_decoder().layers and .model.layers)")


def _hidden_state_module(model, layer: int):
    """The module whose output is ``hidden_states[layer]``: decoder layer ``layer - 1``, or the
    final norm for the last index (transformers returns that one after the norm)."""
    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(f"steering layer {layer} is out of range: use 1..{len(layers)} "
                         "(hidden-state indices; 0 is the embeddings)")
    if layer < len(layers):
        return layers[layer - 1]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm = getattr(base.get_decoder(), "norm", None)
    if norm is None:
        raise ValueError(f"cannot steer at the last index {layer}: {type(base).__name__} has no final .norm; "
                         f"use a layer in 1..{len(layers) - 1}")
    return norm


@contextmanager
def steering(model, vector: torch.Tensor, layer: int, coefficient: float):
    """Within the block, ``coefficient * vector`` is added to ``hidden_states[layer]`` at every
    position. The hook runs before transformers' own output capture, so the returned
    hidden states show the shift too."""
    module = _hidden_state_module(model, layer)
    param = next(model.parameters())
    shift = (coefficient * vector.detach().float()).to(device=param.device, dtype=param.dtype)

    def add(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + shift,) + tuple(output[1:])
        return output + shift

    handle = module.register_forward_hook(add, prepend=True)
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 8, desc: str = "generating") -> list[str]:
    """Answers to chat conversations (left-padded batches; greedy when temperature is 0),
    decoded without special tokens."""
    device, pad_id = _device(model), pad_id_of(tokenizer)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    texts = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        ids, mask = pad_batch([chat_prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]],
                         pad_id, side="left")
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, **sampling)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def steered_generate(model, tokenizer, conversations: list[list[dict]], vector: torch.Tensor, layer: int,
                     coefficient: float, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                     batch_size: int = 8) -> list[str]:
    """The steering baseline: generate with ``coefficient * vector`` added to
    ``hidden_states[layer]`` at every position. The scale is the vector's own: with the
    persona vector, coefficient 1 moves the plain mean exactly onto the persona mean at that
    layer, and 0 leaves the model untouched."""
    with steering(model, vector, layer, coefficient):
        return generate(model, tokenizer, conversations, max_new_tokens, temperature=temperature, seed=seed,
                        batch_size=batch_size, desc=f"steered generation (layer {layer}, x{coefficient:g})")
