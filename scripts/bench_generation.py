"""Generation benchmark: what our pipeline costs over raw vLLM, and what vLLM gains over transformers.

On the same prompts and model, in one run:
  (a) a stage (reflection, through the cached backend) tokens/s over raw ``vllm.LLM.chat`` tokens/s
      on exactly the conversations the stage sends (goal: >= 0.9);
  (b) raw vLLM tokens/s over a batched transformers ``generate`` loop;
  (c) the teacher stage (constitution as system prompt) with prefix caching on over off, with a
      long constitution.
Greedy decoding everywhere, so each side generates the same tokens. Prints a table and writes JSON.

    .venv/bin/python scripts/bench_generation.py [--model DIR] [--prompts 32] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from character_training.config.constitution import load_constitution  # noqa: E402
from character_training.config.models import resolve_model  # noqa: E402
from data_gen.backends import Completion, Sampling, VLLMBackend  # noqa: E402
from data_gen.cache import CachedBackend  # noqa: E402
from data_gen.stages.introspection import REFLECTION_PROMPTS, ReflectionSettings, run_reflection  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class TokenCounter:
    """Passes requests through and counts the tokens generated."""

    def __init__(self, inner):
        self.inner, self.model, self.tokens = inner, inner.model, 0

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        out = self.inner.chat(conversations, sampling, adapter, desc="", seeds=seeds)
        self.tokens += sum(c.num_tokens for c in out)
        return out


class Recorder:
    """A stand-in backend that records what a stage would send (and answers with nothing)."""

    def __init__(self, model):
        self.model = model
        self.conversations = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.conversations += [list(c) for c in conversations]
        return [Completion("", "stop", 0) for _ in conversations]


def long_constitution(base):
    """The shipped constitution with its traits restated many times over: a system prompt of
    roughly 1,500 tokens, as a detailed real constitution would be."""
    from character_training.config.constitution import Trait

    traits = tuple(Trait(trait=f"{t.trait} (In every situation, variation {i}.)", questions=t.questions,
                         clarification=(t.clarification or "") + " " + base.description.strip())
                   for i in range(4) for t in base.traits)
    return replace(base, traits=traits)


def raw_chat(llm, conversations, sampling):
    from vllm import SamplingParams

    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def hf_generate(model_dir, conversations, max_tokens, batch_size):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(conversations), batch_size):
            texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:]:
                ids = row.tolist()
                tokens += next((j + 1 for j, t in enumerate(ids) if t == tok.eos_token_id), len(ids))
    return tokens, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--constitution", default=str(ROOT / "constitutions" / "captain-marlow.yaml"))
    parser.add_argument("--prompts", type=int, default=32, help="conversations per measurement")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--output", default="benchmarks/bench_generation.json")
    args = parser.parse_args()

    model = resolve_model(args.model)
    constitution = load_constitution(args.constitution)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    results: dict = {"model": model, "prompts": args.prompts, "max_tokens": args.max_tokens}

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    # The reflection stage on the first --prompts shipped prompts (cycled), one sample each.
    shipped = list(yaml.safe_load(REFLECTION_PROMPTS.read_text()).values())
    prompts_file = work / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump({f"p{i}": shipped[i % len(shipped)] + ("" if i < len(shipped) else f" ({i})")
                                            for i in range(args.prompts)}))
    settings = ReflectionSettings(samples_per_prompt=1, prompts_file=str(prompts_file), use_system_prompt=True,
                                  min_words=1)
    recorder = Recorder(model)  # the exact conversations the stage sends
    run_reflection(recorder, constitution, work / "recorded", settings=settings, sampling=sampling)
    conversations = recorder.conversations

    backend = VLLMBackend(model, seed=0, kv_cache_gib=2)
    llm = backend.llm
    raw_chat(llm, conversations[:4], sampling)  # warm-up

    # (a) the stage over raw vLLM on the same conversations (prefix cache emptied before each).
    llm.reset_prefix_cache()
    raw_tokens, raw_seconds = raw_chat(llm, conversations, sampling)
    llm.reset_prefix_cache()
    counting = TokenCounter(backend)
    started = time.perf_counter()
    run_reflection(CachedBackend(counting, work / "stage" / "cache.jsonl"), constitution, work / "stage",
                   settings=settings, sampling=sampling)
    stage_seconds = time.perf_counter() - started
    results["a"] = {"requests": len(conversations), "raw_tokens": raw_tokens, "raw_seconds": raw_seconds,
                    "raw_tok_s": raw_tokens / raw_seconds, "stage_tokens": counting.tokens,
                    "stage_seconds": stage_seconds, "stage_tok_s": counting.tokens / stage_seconds}
    results["a"]["ratio"] = results["a"]["stage_tok_s"] / results["a"]["raw_tok_s"]
    n_prompts = len(conversations)

    # (c) the teacher with a long constitution, prefix caching on vs off.
    long = long_constitution(constitution)
    system = long.system_prompt()
    questions = [q for t in constitution.traits for q in t.questions]
    teacher = [[{"role": "system", "content": system}, {"role": "user", "content": questions[i % len(questions)]}]
               for i in range(n_prompts)]
    system_tokens = len(llm.get_tokenizer()(system)["input_ids"])
    llm.reset_prefix_cache()
    on_tokens, on_seconds = raw_chat(llm, teacher, sampling)
    backend.close()
    del llm, backend

    off = VLLMBackend(model, seed=0, kv_cache_gib=2, prefix_caching=False)
    raw_chat(off.llm, conversations[:4], sampling)
    off_tokens, off_seconds = raw_chat(off.llm, teacher, sampling)
    off.close()
    results["c"] = {"system_prompt_tokens": system_tokens, "on_tok_s": on_tokens / on_seconds,
                    "off_tok_s": off_tokens / off_seconds, "on_seconds": on_seconds, "off_seconds": off_seconds,
                    "speedup": off_seconds / on_seconds}

    # (b) raw vLLM over a batched transformers generate loop.
    hf_tokens, hf_seconds = hf_generate(model, conversations, args.max_tokens, args.hf_batch_size)
    results["b"] = {"hf_tokens": hf_tokens, "hf_seconds": hf_seconds, "hf_tok_s": hf_tokens / hf_seconds,
                    "vllm_tok_s": results["a"]["raw_tok_s"], "ratio": results["a"]["raw_tok_s"] / (hf_tokens / hf_seconds),
                    "hf_batch_size": args.hf_batch_size}

    rows = [
        ("(a) stage / raw vLLM", f"{results['a']['stage_tok_s']:.1f} / {results['a']['raw_tok_s']:.1f} tok/s",
         f"{results['a']['ratio']:.2f}", ">= 0.90"),
        ("(b) raw vLLM / transformers", f"{results['a']['raw_tok_s']:.1f} / {results['b']['hf_tok_s']:.1f} tok/s",
         f"{results['b']['ratio']:.2f}", "(field notes: ~1.6)"),
        (f"(c) teacher prefix cache on / off ({system_tokens}-token system prompt)",
         f"{on_seconds:.1f} s / {off_seconds:.1f} s", f"{results['c']['speedup']:.2f}x", "> 1"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'values':<26} {'ratio':>7}  goal")
    for name, values, ratio, goal in rows:
        print(f"{name:<{width}}  {values:<26} {ratio:>7}  {goal}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
