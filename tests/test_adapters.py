"""Persona adapter algebra on a tiny random Llama with random LoRA adapters of unequal ranks,
alphas, rank/alpha patterns and rsLoRA settings (one with an embedding LoRA). The reference is
always PEFT's own view: each delta is read back through PEFT's ``get_delta_weight``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from character_training.adapters import algebra as alg
from character_training.adapters.inspect import format_inspect, inspect
from character_training.adapters.io import Factors, load_adapter
from character_training.adapters.cli import parse_term
from character_training.errors import UserError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Three adapters: different ranks, alphas, patterns, rsLoRA and target sets (the union is composed).
SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True),
    "c": dict(r=6, lora_alpha=5, target_modules=["q_proj", "o_proj", "down_proj", "embed_tokens"]),
}
IDS = torch.tensor([[1, 422, 1345, 314, 253, 9530, 30, 17]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matrices here are tiny; on a busy machine intra-op threads mostly wait on each other."""
    with alg.one_thread():
        yield


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), str(adapter_dir)).eval()


def peft_deltas(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Each adapted module's delta as PEFT applies it (in the base weight's layout), float64."""
    from peft.tuners.lora import LoraLayer

    model = _peft(model_dir, adapter_dir)
    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
            found[name] = module.get_delta_weight("default").double()
    return found


def layout(f: Factors) -> torch.Tensor:
    """Our dense delta in the base weight's layout (PEFT applies embedding deltas transposed)."""
    return f.dense().T if f.embedding else f.dense()


def logits(model_dir, adapter_dir=None):
    model = _base(model_dir) if adapter_dir is None else _peft(model_dir, adapter_dir)
    with torch.no_grad():
        return model(IDS).logits


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir):
    """{name: adapter dir} of the three random adapters, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("loras")
    dirs = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(_base(tiny_model_dir), LoraConfig(task_type="CAUSAL_LM", **spec))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:  # lora_B (and embedding A) start at zero: give every factor a value
                    param.copy_(torch.randn_like(param) * 0.2)
        model.save_pretrained(tmp / name)
        dirs[name] = tmp / name
    return dirs


@pytest.fixture(scope="module")
def reference(loras, tiny_model_dir):
    return {name: peft_deltas(tiny_model_dir, path) for name, path in loras.items()}


def _weighted_sum(reference, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for module, delta in reference[name].items():
            total[module] = total.get(module, 0) + w * delta
    return total


def test_factors_and_scaling_are_read_as_peft_reads_them(loras, reference):
    for name, path in loras.items():
        adapter = load_adapter(path)
        assert set(adapter.modules) == set(reference[name])
        for module, f in adapter.modules.items():
            assert rel(layout(f), reference[name][module]) < 1e-6, (name, module)
    a = load_adapter(loras["a"]).modules
    assert a["model.layers.0.mlp.down_proj"].rank == 6 and a["model.layers.0.self_attn.v_proj"].scaling == 3 / 4
    b = load_adapter(loras["b"]).modules
    assert b["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(16 / 8 ** 0.5)  # rsLoRA
    assert load_adapter(loras["c"]).modules["model.embed_tokens"].embedding


def test_compose_equals_the_dense_weighted_sum_and_loads_in_peft(loras, reference, tiny_model_dir, tmp_path):
    weights = {"a": 1.0, "b": 0.5, "c": -0.3}
    report = alg.compose([(loras[n], w) for n, w in weights.items()], tmp_path / "out")
    got = peft_deltas(tiny_model_dir, tmp_path / "out")
    expected = _weighted_sum(reference, weights)
    assert set(got) == set(expected)  # the union of the target modules
    for module, delta in expected.items():
        assert rel(got[module], delta) < 1e-5, module
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 18  # q_proj: 4 + 8 + 6
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 4  # only in a
    assert config["rank_pattern"]["model.layers.1.mlp.down_proj"] == 12  # a's 6 + c's 6
    assert report["modules"] == len(expected) and report["rank"] == [4, 18]
    card = (tmp_path / "out" / "README.md").read_text()
    for name, w in weights.items():
        assert load_adapter(loras[name]).sha256 in card and f"| {w} |" in card
    assert "compose" in card and str(loras["a"]) in card


def test_weight_one_reproduces_the_adapters_outputs(loras, tiny_model_dir, tmp_path):
    alg.compose([(loras["b"], 1.0)], tmp_path / "one")  # b: rsLoRA
    expected = logits(tiny_model_dir, loras["b"])
    assert not torch.allclose(expected, logits(tiny_model_dir), atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(logits(tiny_model_dir, tmp_path / "one"), expected, atol=1e-5, rtol=1e-5)


def test_weight_minus_one_negates(loras, reference, tiny_model_dir, tmp_path):
    alg.compose([(loras["c"], -1.0)], tmp_path / "neg")
    got = peft_deltas(tiny_model_dir, tmp_path / "neg")
    for module, delta in reference["c"].items():
        assert rel(got[module], -delta) < 1e-6, module


def test_recompression_is_the_truncated_svd_of_the_dense_sum(loras, reference, tiny_model_dir, tmp_path):
    weights, k = {"a": 1.0, "b": 0.5, "c": -0.3}, 3
    report = alg.compose([(loras[n], w) for n, w in weights.items()], tmp_path / "k", rank=k)
    got = peft_deltas(tiny_model_dir, tmp_path / "k")
    errors = []
    for module, delta in _weighted_sum(reference, weights).items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert (got[module] - best).norm() / delta.norm() < 1e-5, module
        errors.append(float(s[k:].norm() / s.norm()))
    assert json.loads((tmp_path / "k" / "adapter_config.json").read_text())["r"] == k
    assert report["recompression"]["max_relative_error"] == pytest.approx(max(errors), rel=1e-4)


def _dense_basis(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis of the columns' span; PEFT's deltas are fp32 products, so singular
    values under 1e-5 of the largest are rounding noise."""
    u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    return u[:, : int((s > 1e-5 * s[0]).sum())]


@pytest.mark.parametrize("side", ["output", "input", "both"])
def test_orthogonalize_zeroes_inner_products_and_reports_what_it_removed(loras, reference, tiny_model_dir,
                                                                         tmp_path, side):
    report = alg.orthogonalize(loras["a"], [loras["b"], loras["c"]], tmp_path / "orth", side=side)
    got = peft_deltas(tiny_model_dir, tmp_path / "orth")
    against = [reference["b"], reference["c"]]
    for module, delta in reference["a"].items():
        others = [r[module] for r in against if module in r]
        expected = delta
        if others and side in ("output", "both"):
            q = _dense_basis(others)
            expected = expected - q @ (q.T @ expected)
        if others and side in ("input", "both"):
            p = _dense_basis([o.T for o in others])
            expected = expected - (expected @ p) @ p.T
        assert rel(got[module], expected) < 1e-5, module
        for other in others:  # zero Frobenius inner product with every --against adapter
            assert abs(float((got[module] * other).sum())) <= 1e-6 * float(got[module].norm() * other.norm()) + 1e-12
        removed = 1 - float(expected.norm() ** 2 / delta.norm() ** 2)
        assert report["per_module"][module]["removed_fraction"] == pytest.approx(removed, abs=1e-6), module
        if not others:  # k_proj and gate_proj: neither b nor c adapts them
            assert removed == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < report["removed_fraction"] < 1.0
    assert {f.rank for f in load_adapter(tmp_path / "orth").modules.values()} == {4, 6}  # ranks kept
    assert "against" in (tmp_path / "orth" / "README.md").read_text()


def test_scale_chosen_layers_and_modules(loras, reference, tiny_model_dir, tmp_path):
    report = alg.scale(loras["a"], 0.25, tmp_path / "s", layers="1", modules="q_proj,mlp.down_proj")
    got = peft_deltas(tiny_model_dir, tmp_path / "s")
    chosen = {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert report["scaled_modules"] == 2
    for module, delta in reference["a"].items():
        assert rel(got[module], delta * (0.25 if module in chosen else 1.0)) < 1e-6, module
    with pytest.raises(UserError, match=r"layer\(s\) 5-7.*its layers: 0-1"):
        alg.scale(loras["a"], 2.0, tmp_path / "x", layers="0,5-7")
    with pytest.raises(UserError, match="did you mean 'q_proj'"):
        alg.scale(loras["a"], 2.0, tmp_path / "x", modules="qproj")
    with pytest.raises(UserError, match="runs backwards"):
        alg.parse_layers("20-10")


def test_compose_onto_gives_the_chained_stages_on_the_original_base(loras, tiny_model_dir, tmp_path):
    """Stage 2 trained b on base + a merged; compose_onto(a, b) is one LoRA on the original base."""
    from peft import PeftModel

    merged = _peft(tiny_model_dir, loras["a"]).merge_and_unload()
    chained = PeftModel.from_pretrained(merged, str(loras["b"])).eval()
    with torch.no_grad():
        expected = chained(IDS).logits
    alg.compose_onto(loras["a"], loras["b"], tmp_path / "onto")
    torch.testing.assert_close(logits(tiny_model_dir, tmp_path / "onto"), expected, atol=1e-5, rtol=1e-5)


def test_inspect_table_heatmap_and_figures(loras, reference, tmp_path):
    report = inspect([loras["a"], loras["b"], loras["c"]], png=tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_inspect(report)
    assert "cosine" in table and "overlap" in table and "map.png" in table
    assert [a["label"] for a in report["adapters"]] == ["a", "b", "c"]
    a, b = reference["a"], reference["b"]
    shared = set(a) & set(b)
    dot = sum(float((a[m] * b[m]).sum()) for m in shared)
    norm = lambda r: sum(float(d.norm() ** 2) for d in r.values()) ** 0.5  # noqa: E731
    pair = next(p for p in report["pairs"] if (p["a"], p["b"]) == (0, 1))
    assert pair["cosine"] == pytest.approx(dot / (norm(a) * norm(b)), rel=1e-6)
    assert pair["shared_modules"] == len(shared)
    assert report["adapters"][0]["norm"] == pytest.approx(norm(a), rel=1e-6)
    module = "model.layers.1.self_attn.q_proj"
    s = torch.linalg.svdvals(a[module])
    assert report["modules"][module]["per_adapter"][0]["effective_rank"] == pytest.approx(
        alg.effective_rank(s[:4]), rel=1e-6)  # rank 4; the rest is fp32 rounding noise
    # With itself: cosine 1, the subspaces coincide (overlap 1, far above chance).
    same = inspect([loras["a"], load_adapter(loras["a"])])
    assert same["pairs"][0]["cosine"] == pytest.approx(1.0)
    assert same["pairs"][0]["output_overlap"] == pytest.approx(1.0)
    assert same["pairs"][0]["output_chance"] < 1.0


def _copy(src, dst, config_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        config = json.loads((dst / "adapter_config.json").read_text())
        config.update(config_edit)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_refusals_say_what_is_wrong(loras, tmp_path):
    from safetensors.torch import load_file, save_file

    other_base = _copy(loras["b"], tmp_path / "other-base", {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"})
    with pytest.raises(UserError, match="different base models"):
        alg.compose([(loras["a"], 1.0), (other_base, 1.0)], tmp_path / "o1")
    wide = _copy(loras["b"], tmp_path / "wide")
    tensors = load_file(str(wide / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(8, 80)
    save_file(tensors, str(wide / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"module model\.layers\.1\.self_attn\.q_proj: .*80"):
        alg.compose([(loras["a"], 1.0), (wide, 1.0)], tmp_path / "o2")
    with pytest.raises(UserError, match="IA3 adapter"):
        load_adapter(_copy(loras["a"], tmp_path / "ia3", {"peft_type": "IA3"}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(_copy(loras["a"], tmp_path / "dora", {"use_dora": True}))
    with pytest.raises(UserError, match="pissa"):
        load_adapter(_copy(loras["a"], tmp_path / "pissa", {"init_lora_weights": "pissa"}))
    with pytest.raises(UserError, match="not found"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json missing"):
        load_adapter(tmp_path / "empty")
    no_weights = _copy(loras["a"], tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors missing"):
        load_adapter(no_weights)
    alg.compose([(loras["a"], 1.0)], tmp_path / "done")
    with pytest.raises(UserError, match="already exists.*--force"):
        alg.compose([(loras["a"], 1.0)], tmp_path / "done")
    alg.compose([(loras["a"], 2.0)], tmp_path / "done", overwrite=True)


def _cli(argv):
    from character_training import cli

    return cli.main(argv)  # the real command line: `character-training adapters ...`


def test_cli_commands(loras, tmp_path, capsys):
    a, b, c = (str(loras[n]) for n in "abc")
    assert _cli(["adapters", "compose", f"{a}:1.0", f"{b}:0.5", f"{c}:-0.3", "-o", str(tmp_path / "mix"),
                 "--rank", "4"]) == 0
    assert "re-compressed" in capsys.readouterr().out
    assert load_adapter(tmp_path / "mix").config["r"] == 4
    assert _cli(["adapters", "orthogonalize", a, "--against", b, "--against", c, "--side", "both",
                 "-o", str(tmp_path / "orth")]) == 0
    assert "removed" in capsys.readouterr().out
    assert _cli(["adapters", "scale", a, "--weight", "-1", "--layers", "0-1", "--modules", "q_proj,v_proj",
                 "-o", str(tmp_path / "scaled")]) == 0
    assert "4 of 14 modules" in capsys.readouterr().out
    assert _cli(["adapters", "inspect", a, b, "--png", str(tmp_path / "i.png"),
                 "--json", str(tmp_path / "i.json")]) == 0
    assert "cosine" in capsys.readouterr().out and (tmp_path / "i.png").is_file()
    assert json.loads((tmp_path / "i.json").read_text())["pairs"][0]["shared_modules"] == 6
    assert parse_term("x/y:-0.5") == ("x/y", -0.5) and parse_term("x/y") == ("x/y", 1.0)
    with pytest.raises(UserError, match="'1,0' is not a number"):
        parse_term("persona:1,0")
    assert _cli(["adapters", "compose", f"{a}:1", "-o", str(tmp_path / "mix")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.integration
def test_vllm_serves_composed_orthogonalized_and_recompressed_adapters_like_peft(tmp_path, default_model_dir):
    """vLLM (CPU, fp32, eager) serves our outputs with the greedy tokens and logprobs PEFT gives:
    a composition of unequal ranks and module sets (one rsLoRA; the result has a rank_pattern),
    an orthogonalized adapter and a re-compressed one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from data_gen.backends import VLLMBackend

    specs = [dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
             dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])]
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        model = get_peft_model(_base(default_model_dir), LoraConfig(task_type="CAUSAL_LM", **spec))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.02)
        model.save_pretrained(tmp_path / f"p{i}")
    outputs = {"composed": tmp_path / "composed", "orthogonal": tmp_path / "orthogonal",
               "rank6": tmp_path / "rank6"}
    alg.compose([(tmp_path / "p0", 1.0), (tmp_path / "p1", -0.5)], outputs["composed"])
    config = load_adapter(outputs["composed"]).config
    assert config["r"] == 12 and set(config["rank_pattern"].values()) == {8}  # q/v: 8 + 4, the rest 8
    alg.orthogonalize(tmp_path / "p0", [tmp_path / "p1"], outputs["orthogonal"], side="both")
    alg.compose([(tmp_path / "p0", 1.0), (tmp_path / "p1", 1.0)], outputs["rank6"], rank=6)

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tokenizer("The sea is", add_special_tokens=False)["input_ids"]
    backend = VLLMBackend(default_model_dir, enable_lora=True, max_lora_rank=16, dtype="float32", kv_cache_gib=1)
    served = {}
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
        for n, (name, path) in enumerate(outputs.items(), 1):
            served[name] = backend.llm.generate({"prompt_token_ids": prompt}, params,
                                                lora_request=LoRARequest(name, n, str(path)),
                                                use_tqdm=False)[0].outputs[0]
    finally:
        backend.close()
    base = logits(default_model_dir, None)
    for name, result in served.items():
        tokens = list(result.token_ids)
        vllm_logprobs = [lp[t].logprob for lp, t in zip(result.logprobs, tokens)]
        model = _peft(default_model_dir, outputs[name])
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].double(), dim=-1)
        steps = full[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
        assert steps.argmax(-1).tolist() == tokens, name  # PEFT's greedy choice at every step
        peft_logprobs = steps[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        assert max(abs(x - y) for x, y in zip(vllm_logprobs, peft_logprobs)) < 2e-3, name
        assert not torch.allclose(base, logits(default_model_dir, outputs[name]), atol=1e-3), f"{name} must matter"
