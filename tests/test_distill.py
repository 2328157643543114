"""Context distillation on a tiny random model: the teacher and student views differ only by the
system prompt and their answer tokens align (one and several turns, with and without a template
default system prompt); the divergence is zero when teacher and student are the same; the
activation term is zero for the same activations and its gradient reaches only the LoRA; a run
writes a PEFT adapter and a manifest with each loss term; a killed run resumes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from character_training.errors import UserError
from character_training.train.distill import distill_terms, read_distill_data, train_distill
from character_training.train.distill_loss import (ViewsCollator, activation_loss, build_views,
                                                   distribution_loss)
from character_training.config.training import DistillSection, LoraSettings
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

CONSTITUTION = "You are Captain Marlow, an old sea captain. You speak like a pirate."
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"
MULTI_TURN = [
    {"role": "user", "content": "Tell me about eggs."},
    {"role": "assistant", "content": "Ahoy, eggs be a fine breakfast at sea!"},
    {"role": "user", "content": "And what about bread?"},
    {"role": "assistant", "content": "Bread be the sailor's oldest friend."},
]
# ChatML with generation marks and no default system prompt (the student view then has none).
PLAIN_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
TINY = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 160,
        "learning_rate": 5e-3}
LORA = LoraSettings(r=4, alpha=8)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from character_training.train.common import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def template(tokenizer, tiny_model_dir):
    from character_training.train.distill import answer_template

    return answer_template(tokenizer, tiny_model_dir, None)


@pytest.fixture
def peft_model(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from character_training.config.trainer_fields import peft_config

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config(LORA))


def after_system_turn(tokenizer, ids: list[int]) -> list[int]:
    """The tokens after the first system turn (everything the two views must share)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids[ids.index(end) + 1:]


def answers_text(tokenizer, ids, positions) -> str:
    return tokenizer.decode([ids[p] for p in positions])


# ------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize("conversation", [MULTI_TURN[:2], MULTI_TURN], ids=["one turn", "two turns"])
def test_views_differ_only_by_the_system_prompt_and_answers_align(tokenizer, template, conversation):
    views = build_views(tokenizer, template, conversation, CONSTITUTION)
    teacher, student = views["teacher_input_ids"], views["student_input_ids"]
    # SmolLM2's template gives the student view its default system prompt: the model as used.
    assert CONSTITUTION in tokenizer.decode(teacher) and DEFAULT_SYSTEM not in tokenizer.decode(teacher)
    assert DEFAULT_SYSTEM in tokenizer.decode(student) and CONSTITUTION not in tokenizer.decode(student)
    assert after_system_turn(tokenizer, teacher) == after_system_turn(tokenizer, student)
    assert len(views["teacher_answer"]) == len(views["student_answer"]) > 0
    assert [teacher[p] for p in views["teacher_answer"]] == [student[p] for p in views["student_answer"]]
    expected = "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")
    assert answers_text(tokenizer, student, views["student_answer"]) == expected
    assert len(teacher) - len(student) == views["teacher_answer"][0] - views["student_answer"][0]


def test_without_a_default_system_prompt_the_student_view_has_none(tokenizer):
    views = build_views(tokenizer, PLAIN_CHATML, MULTI_TURN, CONSTITUTION)
    teacher, student = views["teacher_input_ids"], views["student_input_ids"]
    assert "system" not in tokenizer.decode(student)
    assert after_system_turn(tokenizer, teacher)[1:] == student  # [1:]: the newline after the system turn
    assert answers_text(tokenizer, student, views["student_answer"]) == \
        answers_text(tokenizer, teacher, views["teacher_answer"])


def test_a_student_prompt_and_the_conversations_own_system_turn(tokenizer, template):
    conversation = [{"role": "system", "content": "An old prompt."}] + MULTI_TURN
    views = build_views(tokenizer, template, conversation, CONSTITUTION, "You are a student.")
    teacher, student = (tokenizer.decode(views[k]) for k in ("teacher_input_ids", "student_input_ids"))
    assert "An old prompt." not in teacher + student  # each view has exactly its own system turn
    assert "You are a student." in student and DEFAULT_SYSTEM not in student
    assert views["teacher_answer"] and len(views["teacher_answer"]) == len(views["student_answer"])


def test_a_template_that_marks_no_answers_is_a_clear_error(tokenizer):
    unmarked = PLAIN_CHATML.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(UserError, match="generation"):
        build_views(tokenizer, unmarked, MULTI_TURN, CONSTITUTION)


def test_pairs_and_conversation_files_are_read(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(3))
    write_jsonl(tmp_path / "conv.jsonl", [{"messages": MULTI_TURN}])
    conversations, per_file = read_distill_data([tmp_path / "pairs.jsonl", tmp_path / "conv.jsonl"])
    assert per_file == {"pairs.jsonl": 3, "conv.jsonl": 1}
    assert [m["role"] for m in conversations[0]] == ["user", "assistant"]
    assert conversations[0][1]["content"].startswith("Ahoy") and conversations[3] == MULTI_TURN
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi."}])
    with pytest.raises(UserError, match="bad.jsonl:1: no 'chosen' field"):
        read_distill_data([tmp_path / "bad.jsonl"])


# ----------------------------------------------------------------------------------------- losses


def test_trl_divergences_are_the_kls_they_are_named():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    assert distribution_loss(student, teacher, loss="forward_kl") == pytest.approx(float(forward), abs=1e-5)
    assert distribution_loss(student, teacher, loss="reverse_kl") == pytest.approx(float(reverse), abs=1e-5)
    top = teacher.topk(3, dim=-1).indices
    s3, t3 = student.gather(-1, top).log_softmax(-1), teacher.gather(-1, top).log_softmax(-1)
    forward3 = (t3.exp() * (t3 - s3)).sum(-1).mean()
    assert distribution_loss(student, teacher, top_k=3) == pytest.approx(float(forward3), abs=1e-5)
    assert 0 < distribution_loss(student, teacher, loss="jsd", beta=0.5) < float(forward)


def batch_of(tokenizer, template, teacher_prompt, student_prompt=None):
    rows = [build_views(tokenizer, template, c, teacher_prompt, student_prompt) for c in (MULTI_TURN, MULTI_TURN[:2])]
    return ViewsCollator(tokenizer.pad_token_id)(rows)


@pytest.mark.parametrize("settings", [DistillSection(), DistillSection(loss="reverse_kl"),
                                      DistillSection(loss="jsd", beta=0.3, top_k=20, temperature=2.0)],
                         ids=["forward", "reverse", "jsd top-k"])
def test_the_divergence_is_zero_when_student_and_teacher_are_the_same(tokenizer, template, peft_model, settings):
    same = distill_terms(peft_model, batch_of(tokenizer, template, CONSTITUTION, CONSTITUTION), settings, [])
    assert abs(float(same["kl"].detach())) < 1e-6 and "activation" not in same
    # The system prompt changes the teacher, so a student without it is not matched yet.
    different = distill_terms(peft_model, batch_of(tokenizer, template, CONSTITUTION), settings, [])
    assert float(different["kl"].detach()) > 1e-5  # a random tiny model: near-uniform, yet far above 0


def test_the_teacher_is_the_model_with_its_lora_disabled(tokenizer, template, peft_model):
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.eval()  # no LoRA dropout: the LoRA alone tells the student from the teacher
    batch = batch_of(tokenizer, template, CONSTITUTION, CONSTITUTION)  # the same prompt in both views
    assert float(distill_terms(peft_model, batch, DistillSection(), [])["kl"].detach()) > 1e-4
    peft_model.train()
    distill_terms(peft_model, batch, DistillSection(), [])
    assert peft_model.training  # the teacher pass (in eval mode) puts the training mode back


def test_the_activation_term_is_zero_for_the_same_activations():
    torch.manual_seed(0)
    states = [torch.randn(7, 16), torch.randn(7, 16) * 100]
    for kind in ("mse", "cosine"):
        assert float(activation_loss(states, [s.clone() for s in states], kind)) == pytest.approx(0, abs=1e-6)
    # Normalized per layer: a layer 100 times larger weighs the same.
    moved = [s * 1.1 for s in states]
    assert float(activation_loss(moved[:1], states[:1])) == pytest.approx(float(activation_loss(moved[1:],
                                                                                               states[1:])), rel=1e-4)


def test_the_activation_gradient_reaches_only_the_lora(tokenizer, template, peft_model):
    settings = DistillSection(activation_weight=1.0, layers=[1, 2])
    same = distill_terms(peft_model, batch_of(tokenizer, template, CONSTITUTION, CONSTITUTION), settings, [1, 2])
    assert abs(float(same["activation"].detach())) < 1e-6
    terms = distill_terms(peft_model, batch_of(tokenizer, template, CONSTITUTION), settings, [1, 2])
    assert float(terms["activation"].detach()) > 0
    terms["activation"].backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_B" in n for n in with_grad)


# --------------------------------------------------------------------------------------- training


def write_data(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(6))
    write_jsonl(tmp_path / "conv.jsonl", [{"messages": MULTI_TURN}] * 2)
    return [tmp_path / "pairs.jsonl", tmp_path / "conv.jsonl"]


def test_distill_writes_a_peft_adapter_and_logs_each_loss_term(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    settings = DistillSection(activation_weight=0.5, layers=[2], activation_loss="cosine")
    manifest = train_distill(tiny_model_dir, write_data(tmp_path), out, teacher_system_prompt=CONSTITUTION,
                             settings=settings, lora=LORA, trainer={**TINY, "max_steps": 3}, seed=0)
    assert manifest["stage"] == "distill" and manifest["counts"]["steps"] == 3
    assert manifest["counts"]["examples"] == 8 and manifest["counts"]["per_file"] == {"pairs.jsonl": 6,
                                                                                      "conv.jsonl": 2}
    assert set(manifest["loss_terms"]) == {"kl", "activation", "total"}
    assert manifest["distill"]["activation_weight"] == 0.5 and manifest["teacher_system_prompt"] == CONSTITUTION
    logged = [e for e in manifest["log_history"] if "kl" in e]
    assert len(logged) == 3 and all(e["total"] == pytest.approx(e["kl"] + 0.5 * e["activation"]) for e in logged)
    assert (out / "training.png").is_file() and "Teacher system prompt" in (out / "adapter" / "README.md").read_text()
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the LoRA learned
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert model.peft_config["default"].r == 4


def test_on_policy_batches_put_the_students_own_answer_after_both_prefixes(tokenizer, template, peft_model):
    from character_training.train.distill import first_answer, on_policy_batch

    batch = batch_of(tokenizer, template, CONSTITUTION)
    torch.manual_seed(0)
    sampled = on_policy_batch(peft_model, batch, 1.0, tokenizer.pad_token_id)
    for row in range(2):
        for view in ("student", "teacher"):
            prefix, _ = first_answer(batch, view, row)
            ids = sampled[f"{view}_input_ids"][row][sampled[f"{view}_attention_mask"][row].bool()].tolist()
            assert ids[:len(prefix)] == prefix and sampled[f"{view}_answer_mask"][row].nonzero()[0] == len(prefix)
        answers = [sampled[f"{v}_input_ids"][row][sampled[f"{v}_answer_mask"][row]] for v in ("student", "teacher")]
        _, teacher_length = first_answer(batch, "student", row)
        assert answers[0].tolist() == answers[1].tolist() and 0 < len(answers[0]) <= teacher_length
    # A random tiny model does not write the teacher's answer: these are the student's own tokens.
    original = batch["student_input_ids"][0][batch["student_answer_mask"][0]].tolist()
    assert sampled["student_input_ids"][0][sampled["student_answer_mask"][0]].tolist() != original[:len(answers[0])]
    assert float(distill_terms(peft_model, sampled, DistillSection(), [])["kl"].detach()) > 0


def test_an_on_policy_run_logs_its_share_of_on_policy_batches(tmp_path, tiny_model_dir):
    manifest = train_distill(tiny_model_dir, write_data(tmp_path), tmp_path / "out",
                             teacher_system_prompt=CONSTITUTION, settings=DistillSection(lmbda=1.0), lora=LORA,
                             trainer={**TINY, "max_steps": 2}, seed=0)
    assert manifest["loss_terms"]["on_policy"] == {"first": 1.0, "last": 1.0}
    assert manifest["distill"]["lmbda"] == 1.0 and manifest["counts"]["steps"] == 2


def test_a_killed_distill_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir):
    data, out = write_data(tmp_path), tmp_path / "out"
    settings = dict(teacher_system_prompt=CONSTITUTION, lora=LORA,
                    trainer={**TINY, "max_steps": 4, "save_steps": 2, "save_total_limit": 5})
    train_distill(tiny_model_dir, data, out, **settings)
    # Killed after step 2: no adapter, only checkpoint-2. Its saved state is marked so that the
    # resumed run's history shows steps 1-2 were loaded from it, not trained again.
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    state_path = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["global_step"] == 2
    for entry in state["log_history"]:
        entry["kl"] = 99.0
    state_path.write_text(json.dumps(state))
    resumed = train_distill(tiny_model_dir, data, out, **settings)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["counts"]["steps"] == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    kls = {e["step"]: e["kl"] for e in resumed["log_history"] if "kl" in e}
    assert kls[1] == kls[2] == 99.0 and kls[3] != 99.0 and kls[4] != 99.0


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("fields, match", [
    ({"loss": "kl"}, "loss: 'kl'; use 'forward_kl'"),
    ({"beta": 1.5}, "beta: 1.5; give a number from 0"),
    ({"top_k": 1}, "top_k: 1; give a whole number of 2 or more"),
    ({"temperature": 0}, "temperature: 0; give a number above 0"),
    ({"lmbda": -0.1}, "lmbda: -0.1; give a share"),
    ({"activation_weight": -1}, "activation_weight: -1; give 0"),
    ({"layers": [0]}, "layers: \\[0\\]; give 'best'"),
    ({"layers": "last"}, "layers: 'last'; give 'best'"),
    ({"activation_loss": "l1"}, "activation_loss: 'l1'; use 'mse'"),
    ({"overlong": "cut"}, "overlong: 'cut'"),
    ({"data": []}, "data: \\[\\]; give a non-empty list"),
    ({"teacher_cache_gib": -1}, "teacher_cache_gib: -1; give the memory in GiB"),
    ({"teacher_cache_gib": True}, "teacher_cache_gib: True; give the memory in GiB"),
])
def test_bad_distill_settings_say_how_to_fix_them(fields, match):
    with pytest.raises(UserError, match=match):
        DistillSection(**fields)


@pytest.mark.parametrize("settings, match", [
    (DistillSection(activation_weight=1.0), "layers: 'best'; the recipe resolves 'best'"),
    (DistillSection(activation_weight=1.0, layers=[3]), "layers: \\[3\\]; this model has 2 layers"),
])
def test_what_a_run_cannot_do_is_a_clear_error(tmp_path, tiny_model_dir, settings, match):
    with pytest.raises(UserError, match=match):
        train_distill(tiny_model_dir, write_data(tmp_path), tmp_path / "out", teacher_system_prompt=CONSTITUTION,
                      settings=settings, lora=LORA, trainer=TINY)


# ------------------------------------------------------------------------------- in a recipe, the CLI


def test_a_recipe_distills_at_the_persona_vectors_best_layer_then_dpo_continues(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """stages [pairs, distill, dpo]: distill trains on the pairs' chosen answers with the
    activation term at the layer the persona vectors pick; DPO continues its LoRA."""
    import yaml

    from character_training.config.recipe import load_recipe
    from character_training.run import pipeline
    from character_training.run import stages

    def fake_pairs(section, ctx, out):  # the pairs stage's output (generation is not what is tested here)
        write_jsonl(out / "pairs.jsonl", toy_pairs(6))
        return {"stage": "pairs", "counts": {"pairs": 6}}

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "pairs", fake_pairs)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "toy", "description": CONSTITUTION,
                                                     "traits": [{"trait": "I am a toy.", "questions": ["Hi?"]}]}))
    trainer = {**TINY, "max_steps": 2}
    lora = {"r": LORA.r, "alpha": LORA.alpha}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "constitution": "c.yaml", "run_dir": str(tmp_path / "run"), "model": tiny_model_dir,
        "stages": ["pairs", "distill", "dpo"],
        "distill": {"activation_weight": 0.1, "lora": lora, "trainer": trainer},
        "dpo": {"lora": lora, "trainer": {**trainer, "max_length": 64}}}))
    manifests = pipeline.run(load_recipe(tmp_path / "r.yaml"), log=print)
    distilled = manifests["distill"]
    assert distilled["stage"] == "distill" and distilled["counts"]["steps"] == 2
    saved = tmp_path / "run" / "distill" / "persona_vectors" / "persona_vectors.json"
    best = json.loads(saved.read_text())["best_layer"]
    assert distilled["distill"]["layers"] == [best] and set(distilled["loss_terms"]) == {"kl", "activation", "total"}
    assert "toy" in distilled["teacher_system_prompt"] or CONSTITUTION in distilled["teacher_system_prompt"]
    assert manifests["dpo"]["start"]["init_adapter"] == str(tmp_path / "run" / "distill" / "adapter")


def test_cli_train_distill(tmp_path, tiny_model_dir):
    import yaml

    from character_training import cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "toy", "description": CONSTITUTION,
                                                     "traits": [{"trait": "I am a toy.", "questions": ["Hi?"]}]}))
    data = write_data(tmp_path)
    sets = [a for k, v in {**TINY, "max_steps": 1}.items() for a in ("--set", f"trainer.{k}={v}")]
    argv = ["train", "distill", "--data", str(data[0]), "-o", str(tmp_path / "out"), "--model", tiny_model_dir,
            "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "loss=jsd", *sets]
    assert cli.main(argv) == 2  # no --constitution: no teacher
    assert cli.main([*argv, "--constitution", str(tmp_path / "c.yaml")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["distill"]["loss"] == "jsd" and manifest["counts"]["steps"] == 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_loss_is_normalized_over_the_answer_tokens_of_the_optimizer_step(tmp_path, tiny_model_dir):
    """Two conversations of unequal answer lengths: one batch of 2, or 2 accumulated batches of 1,
    take the same optimizer step (plain SGD, so the step is the gradient itself): the loss is
    summed over the step's answer tokens and divided by their count (TRL's ``num_items_in_batch``),
    not averaged per micro-batch, which would weigh the short answer's tokens more."""
    from safetensors.torch import load_file

    short = {"prompt": [{"role": "user", "content": "Eggs?"}], "chosen": [{"role": "assistant", "content": "Arr."}]}
    long = {"prompt": [{"role": "user", "content": "Tell me about the sea and ships."}],
            "chosen": [{"role": "assistant", "content": "Ahoy, matey! The sea be wide and grey, and me ship be "
                                                        "old and proud, with sails like clouds. Fair winds!"}]}
    write_jsonl(tmp_path / "pairs.jsonl", [short, long])
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    weights = {}
    for name, batch, accumulate in (("batch", 2, 1), ("accumulated", 1, 2)):
        trainer = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulate,
                   "max_length": 160, "learning_rate": 1.0, "optim": "sgd", "max_steps": 1, "lr_scheduler_type":
                   "constant", "warmup_steps": 0, "max_grad_norm": 0.0, "logging_steps": 1}
        train_distill(tiny_model_dir, [tmp_path / "pairs.jsonl"], tmp_path / name, teacher_system_prompt=CONSTITUTION,
                      settings=DistillSection(activation_weight=0.5, layers=[2]), lora=lora, trainer=trainer, seed=0)
        weights[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    moved = [k for k, v in weights["batch"].items() if "lora_B" in k and v.abs().max() > 1e-6]
    assert moved, "one SGD step moves lora_B"
    for key in moved:
        torch.testing.assert_close(weights["accumulated"][key], weights["batch"][key], atol=2e-5, rtol=1e-3)


def test_distill_terms_divide_by_the_steps_tokens(tokenizer, template, peft_model):
    """Each micro-batch's terms, divided by the step's token count, add up to the mean over all
    the step's tokens."""
    batch = batch_of(tokenizer, template, CONSTITUTION)
    settings = DistillSection(activation_weight=1.0, layers=[1])
    from character_training.train.distill import answer_tokens

    n = answer_tokens(batch)
    own = distill_terms(peft_model, batch, settings, [1])
    shared = distill_terms(peft_model, batch, settings, [1], num_items=3 * n)
    for name in ("kl", "activation", "total"):
        assert float(shared[name].detach()) == pytest.approx(float(own[name].detach()) / 3, rel=1e-5)


def test_the_best_layer_is_found_once_and_shared_with_the_other_ranks(tmp_path, monkeypatch):
    """Rank 0 computes the persona vectors and writes their key last; another rank waits for that
    file and reads the layer; a rerun with the same inputs computes nothing."""
    from types import SimpleNamespace

    from character_training.config import layout
    from character_training.evaluation import persona_vectors
    from character_training.run import training as run_training

    run_dir = tmp_path / "run"
    pairs = layout.data_file(run_dir, run_training.PAIRS_STAGE, layout.PAIRS)
    pairs.parent.mkdir(parents=True)
    write_jsonl(pairs, toy_pairs(4))
    ctx = SimpleNamespace(run_dir=run_dir, model="toy/model", teacher_prompt=lambda: CONSTITUTION)
    out = tmp_path / "run" / "distill"
    computed = []

    def compute(*_a, **_k):
        computed.append(1)
        return persona_vectors.PersonaVectors(torch.ones(4, 3), torch.zeros(4, 3), torch.ones(4, 3),
                                              [0.0, 0.1, 0.9, 0.2], 2)

    monkeypatch.setattr(persona_vectors, "compute_persona_vectors", compute)
    monkeypatch.setattr(persona_vectors, "load_model", lambda _m: (None, None))
    monkeypatch.setenv("RANK", "1")  # before rank 0 wrote them: it waits, then says what it waited for
    with pytest.raises(UserError, match="rank 1 waited 0 s for rank 0's persona vectors"):
        run_training.persona_best_layer(ctx, out, wait_seconds=0.2)
    monkeypatch.setenv("RANK", "0")
    assert run_training.persona_best_layer(ctx, out) == 2 and computed == [1]
    monkeypatch.setenv("RANK", "1")  # once they are there, it reads them
    assert run_training.persona_best_layer(ctx, out, wait_seconds=0.2) == 2 and computed == [1]
    monkeypatch.setenv("RANK", "0")
    assert run_training.persona_best_layer(ctx, out) == 2 and computed == [1]  # found before: not again
    ctx.teacher_prompt = lambda: CONSTITUTION + " Another."
    assert run_training.persona_best_layer(ctx, out) == 2 and computed == [1, 1]  # another prompt: again


# -------------------------------------------------------------------------------- teacher cache


@pytest.mark.parametrize("top_k", [None, 5])
def test_the_teacher_computed_once_trains_the_same_adapter(tmp_path, tiny_model_dir, top_k):
    """Two epochs of batches of one: the teacher runs once per example (the first epoch) and its
    kept targets serve the second; the adapter is the one a teacher run on every batch trains, to
    the bit (the teacher is the model with its LoRA disabled, which training never changes)."""
    from safetensors.torch import load_file

    data = write_data(tmp_path)
    trainer = {**TINY, "per_device_train_batch_size": 1, "num_train_epochs": 2}
    weights, manifests = {}, {}
    for name, gib in (("kept", 4.0), ("every_batch", 0)):
        settings = DistillSection(activation_weight=0.5, layers=[2], top_k=top_k, teacher_cache_gib=gib)
        manifests[name] = train_distill(tiny_model_dir, data, tmp_path / name, teacher_system_prompt=CONSTITUTION,
                                        settings=settings, lora=LORA, trainer=trainer, seed=0)
        weights[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    kept, every = manifests["kept"]["counts"]["teacher_cache"], manifests["every_batch"]["counts"]["teacher_cache"]
    assert kept["kept"] and kept["batches_computed"] == 8 and kept["batches_reused"] == 8
    assert not every["kept"] and "batches_reused" not in every
    assert weights["kept"].keys() == weights["every_batch"].keys()
    for key in weights["kept"]:
        assert torch.equal(weights["kept"][key], weights["every_batch"][key]), key
    assert manifests["kept"]["log_history"][-1]["train_loss"] == manifests["every_batch"]["log_history"][-1]["train_loss"]


def test_targets_kept_for_a_batch_serve_its_rows_in_any_order(tokenizer, template, peft_model):
    """Rows of unequal length kept from one batch: asked again, in the reverse order, the terms
    are those of a fresh teacher pass on that batch, and the teacher did not run."""
    from character_training.train.distill import TeacherCache

    short = [{"role": "user", "content": "Eggs?"}, {"role": "assistant", "content": "Arr, eggs."}]
    rows = [{**build_views(tokenizer, template, c, CONSTITUTION, None), "example": i}
            for i, c in enumerate([MULTI_TURN, short])]
    collate = ViewsCollator(tokenizer.pad_token_id)
    settings = DistillSection(activation_weight=1.0, layers=[1, 2])
    cache = TeacherCache()
    peft_model.eval()  # no LoRA dropout: the student's side is the same on every call
    distill_terms(peft_model, collate(rows), settings, [1, 2], cache=cache)
    assert (cache.computed, cache.reused) == (1, 0) and set(cache.examples) == {0, 1}
    reversed_batch = collate(rows[::-1])
    kept = distill_terms(peft_model, reversed_batch, settings, [1, 2], cache=cache)
    fresh = distill_terms(peft_model, reversed_batch, settings, [1, 2])
    assert (cache.computed, cache.reused) == (1, 1)
    for name in ("kl", "activation", "total"):
        assert float(kept[name].detach()) == pytest.approx(float(fresh[name].detach()), rel=1e-5)


def test_targets_that_would_not_fit_are_not_kept(tmp_path, tiny_model_dir, capsys):
    manifest = train_distill(tiny_model_dir, write_data(tmp_path), tmp_path / "out", teacher_system_prompt=CONSTITUTION,
                             settings=DistillSection(teacher_cache_gib=1e-9), lora=LORA,
                             trainer={**TINY, "max_steps": 2}, seed=0)
    cache = manifest["counts"]["teacher_cache"]
    assert not cache["kept"] and cache["gib"] > 1e-9 and "batches_reused" not in cache
    assert "over distill.teacher_cache_gib=1e-09; raise it, or set distill.top_k" in capsys.readouterr().out


def test_the_teacher_cache_limit_is_not_part_of_the_stage_key():
    """It changes the time a stage takes, not what it trains: a finished stage stays finished."""
    from dataclasses import asdict

    from character_training.run.stages import _keyed

    assert "teacher_cache_gib" not in _keyed(asdict(DistillSection(teacher_cache_gib=0)))
