"""Persona vectors on the tiny random Llama: activations average exactly the response tokens,
the vector is the mean difference, projections are centred on the plain mean, the report's
ratio measures how far a condition moves, and steering adds exactly the vector at one layer
and leaves nothing behind."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from character_training.adapters.algebra import one_thread
from character_training.evaluation.core import PROMPTED
from character_training.evaluation.persona_vectors import (
    PersonaVectors, compute_persona_vectors, decoder_layers, from_activations, generate, load_model, project,
    projection_report, response_activations, steered_generate, steering)

SYSTEM = "You are Captain Marlow, a cheerful old pirate captain."
PROMPTS = ["Tell me about eggs.", "How do I fold a map?", "What is rain?"]
PERSONA = ["Ahoy! Eggs be the finest breakfast on me ship, matey.",
           "Arr, fold it along the old creases, like a sail.",
           "Rain? 'Tis the sea fallin' from the sky, lad!"]
PLAIN = ["Eggs are a common food.", "Fold the map along its creases.", "Rain is water falling from clouds."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the model is tiny; on a busy machine threads mostly wait on each other
        yield


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir)


def manual_activation(model, tokenizer, conversation, response) -> torch.Tensor:
    """One example, no padding: the mean over the response's positions, [L + 1, hidden]."""
    head = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([head + answer]), output_hidden_states=True).hidden_states
    return torch.stack([h[0, len(head):].mean(0) for h in hidden]), torch.stack([h[0].mean(0) for h in hidden])


def test_activations_average_exactly_the_response_tokens_in_a_padded_batch(loaded):
    model, tokenizer = loaded
    conversations = [[{"role": "user", "content": "Hi."}],
                     [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[1]}]]
    # the first is longer in all: its batch-mate is padded on the right
    responses = ["Hello there, a much longer answer than the other one, with many more tokens in it.", "Yes."]
    acts = response_activations(model, tokenizer, conversations, responses, batch_size=2)
    layers = len(decoder_layers(model)) + 1
    assert acts.shape == (layers, 2, model.config.hidden_size)
    for i in range(2):
        expected, whole_sequence = manual_activation(model, tokenizer, conversations[i], responses[i])
        torch.testing.assert_close(acts[:, i], expected, atol=1e-5, rtol=0)
        assert not torch.allclose(acts[:, i], whole_sequence, atol=1e-3)  # the window matters


def test_empty_response_is_an_error_naming_it_and_compute_drops_and_counts_it(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=r"empty response.*\[1\]"):
        response_activations(model, tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS[:2]], ["Hi.", ""])
    pv = compute_persona_vectors(model, tokenizer, PROMPTS, PERSONA[:2] + [""], PLAIN, SYSTEM)
    assert pv.counts == {"prompts": 3, "persona": 2, "plain": 3, "persona_empty_dropped": 1, "plain_empty_dropped": 0}


def test_persona_vector_is_the_mean_difference_and_projections_are_centred(loaded):
    model, tokenizer = loaded
    pv = compute_persona_vectors(model, tokenizer, PROMPTS, PERSONA, PLAIN, SYSTEM, batch_size=2)
    persona = torch.stack([manual_activation(model, tokenizer, [{"role": "system", "content": SYSTEM},
                                                                 {"role": "user", "content": p}], r)[0]
                           for p, r in zip(PROMPTS, PERSONA)], dim=1)
    plain = torch.stack([manual_activation(model, tokenizer, [{"role": "user", "content": p}], r)[0]
                         for p, r in zip(PROMPTS, PLAIN)], dim=1)
    torch.testing.assert_close(pv.vectors, persona.mean(1) - plain.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(project(plain, pv).mean(1), torch.zeros(pv.vectors.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(project(persona, pv).mean(1), pv.vectors.norm(dim=-1), atol=1e-4, rtol=1e-4)

    # separation: Cohen's d of the two sides' projections, by hand
    unit = pv.vectors / pv.vectors.norm(dim=-1, keepdim=True)
    for layer in range(pv.vectors.shape[0]):
        p = (persona[layer] @ unit[layer]).double().numpy()
        q = (plain[layer] @ unit[layer]).double().numpy()
        pooled = np.sqrt(((len(p) - 1) * p.var(ddof=1) + (len(q) - 1) * q.var(ddof=1)) / (len(p) + len(q) - 2))
        assert pv.separation[layer] == pytest.approx((p.mean() - q.mean()) / pooled, rel=1e-3)
    assert pv.best_layer == 1 + int(np.argmax(pv.separation[1:]))


def test_projection_report_ratio_of_a_condition_that_moves_half_way():
    torch.manual_seed(0)
    layers, n, hidden = 4, 50, 16
    plain = torch.randn(layers, n, hidden)
    persona = torch.randn(layers, n, hidden) + 3 * torch.randn(layers, 1, hidden)
    pv = from_activations(persona, plain)
    adapter = plain + 0.5 * (persona - plain)  # every example half-way to its persona counterpart
    report = projection_report({"base": plain, PROMPTED: persona, "adapter": adapter}, pv)
    json.dumps(report, allow_nan=False)
    ratios = report["conditions"]["adapter"]["ratio_to_reference"]
    assert ratios == pytest.approx([0.5] * layers, abs=1e-4)
    assert report["conditions"]["base"]["ratio_to_reference"] == pytest.approx([0.0] * layers, abs=1e-4)
    norms = pv.vectors.norm(dim=-1).tolist()
    assert report["conditions"][PROMPTED]["mean_projection"] == pytest.approx(norms, rel=1e-4)
    headline = report["headline"]["adapter"]
    assert report["best_layer"] == pv.best_layer >= 1
    assert headline["ratio"] == pytest.approx(0.5, abs=1e-4)
    assert headline["ratio_ci95"][0] < 0.5 < headline["ratio_ci95"][1]
    lo, hi = report["conditions"]["adapter"]["mean_projection_ci95"][pv.best_layer]
    assert lo < report["conditions"]["adapter"]["mean_projection"][pv.best_layer] < hi
    with pytest.raises(ValueError, match="reference"):
        projection_report({"base": plain}, pv)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    pv = from_activations(torch.randn(3, 5, 8) + 1, torch.randn(3, 6, 8), counts={"persona": 5, "plain": 6})
    back = PersonaVectors.load(pv.save(tmp_path / "pv"))
    for name in ("vectors", "plain_mean", "persona_mean"):
        assert torch.equal(getattr(back, name), getattr(pv, name))
    assert (back.separation, back.best_layer, back.counts) == (pv.separation, pv.best_layer, pv.counts)
    with pytest.raises(FileNotFoundError, match="compute_persona_vectors"):
        PersonaVectors.load(tmp_path / "nothing")


@pytest.mark.parametrize("layer", [1, 2])  # 2 = the last index: after the final norm
def test_steering_adds_exactly_the_vector_at_that_hidden_state(loaded, layer):
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer("Ahoy there, matey.", add_special_tokens=False)["input_ids"]])
    vector = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
        with steering(model, vector, layer, 3.0):
            during = model(input_ids=ids, output_hidden_states=True).hidden_states
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(layer):
        assert torch.equal(during[i], before[i])
    torch.testing.assert_close(during[layer], before[layer] + 3.0 * vector, atol=1e-5, rtol=0)
    for b, a in zip(before, after):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="out of range"):
        with steering(model, vector, 3, 1.0):
            pass


def test_steered_generation_zero_is_unsteered_large_changes_it_and_the_hook_goes(loaded):
    model, tokenizer = loaded
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    plain = generate(model, tokenizer, conversations, max_new_tokens=8, batch_size=2)
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # transformers' own, installed on first use
    vector = torch.randn(model.config.hidden_size)
    assert steered_generate(model, tokenizer, conversations, vector, 1, 0.0, max_new_tokens=8, batch_size=2) == plain
    steered = steered_generate(model, tokenizer, conversations, vector, 1, 50.0, max_new_tokens=8, batch_size=2)
    assert steered != plain
    assert generate(model, tokenizer, conversations, max_new_tokens=8, batch_size=2) == plain
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


def test_load_model_applies_the_adapter_and_steering_finds_layers_through_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    base, tokenizer = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, adapter=tmp_path / "adapter")
    assert type(model).__name__.startswith("PeftModel") and len(decoder_layers(model)) == 2
    ids = torch.tensor([tokenizer("Tell me about eggs.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
    conversations = [[{"role": "user", "content": PROMPTS[0]}]]
    plain = generate(model, tokenizer, conversations, max_new_tokens=6)
    vector = torch.randn(model.config.hidden_size)
    assert steered_generate(model, tokenizer, conversations, vector, 2, 0.0, max_new_tokens=6) == plain
    assert steered_generate(model, tokenizer, conversations, vector, 2, 50.0, max_new_tokens=6) != plain


def test_a_planted_direction_is_recovered(loaded):
    """The persona side's activations carry a planted direction at one layer (added by a hook
    while they are read), on different texts from the plain side: the persona vector at that
    layer points along it (cosine > 0.9), and that layer separates best."""
    from character_training.evaluation import persona_vectors as pvm

    model, tokenizer = loaded
    torch.manual_seed(1)
    hidden = model.config.hidden_size
    planted = torch.randn(hidden)
    planted = 4.0 * planted / planted.norm()
    words = "sea wind ship rope tide gull map storm deck sail".split()
    rng = __import__("random").Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(32)]
    convs = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(16)]
    with pvm.steering(model, planted, 1, 1.0):
        persona = pvm.response_activations(model, tokenizer, convs, texts[:16])
    plain = pvm.response_activations(model, tokenizer, convs, texts[16:])
    pv = pvm.from_activations(persona, plain)
    cosine = torch.nn.functional.cosine_similarity(pv.vectors[1], planted, dim=0)
    assert cosine > 0.9, f"cosine {cosine:.3f}"
    assert pv.best_layer == 1


def test_projection_intervals_resample_prompts_and_pair_the_ratio_by_prompt():
    torch.manual_seed(2)
    layers, prompts, hidden = 3, 12, 16
    plain = torch.randn(layers, prompts, hidden)
    persona = torch.randn(layers, prompts, hidden) + 3 * torch.randn(layers, 1, hidden)
    pv = from_activations(persona, plain)
    ids = [f"p{i}" for i in range(prompts)]
    # The adapter answers exactly as the system prompt on every prompt: paired by prompt, the
    # ratio's interval is the point 1; resampled apart, it is not.
    paired = projection_report({PROMPTED: persona, "adapter": persona.clone()}, pv,
                               prompts={PROMPTED: ids, "adapter": ids})
    apart = projection_report({PROMPTED: persona, "adapter": persona.clone()}, pv)
    assert paired["headline"]["adapter"]["ratio_ci95"] == pytest.approx([1.0, 1.0])
    lo, hi = apart["headline"]["adapter"]["ratio_ci95"]
    assert hi - lo > 0.05
    # Five answers a prompt are not five times the evidence: the same interval as one answer a prompt.
    five = persona.repeat_interleave(5, dim=1)
    once = projection_report({PROMPTED: persona}, pv, prompts={PROMPTED: ids})
    fived = projection_report({PROMPTED: five}, pv, prompts={PROMPTED: [p for p in ids for _ in range(5)]})
    for a, b in zip(fived["conditions"][PROMPTED]["mean_projection_ci95"],
                    once["conditions"][PROMPTED]["mean_projection_ci95"]):
        assert a == pytest.approx(b)
