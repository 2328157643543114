"""vLLM's engine options from a recipe (checked against EngineArgs, passed to vllm.LLM, the
CPU's left out), one engine at a time (Engines, LazyEngine) and data-parallel sharding.

No real engine starts here: ``vllm.LLM`` is replaced by a recorder of its keyword arguments,
and the data-parallel workers build a fake engine (real processes, real pipes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_gen.backends import Completion, Engines, Sampling, VLLMBackend, check_engine_options
from data_gen.errors import UserError
from data_gen.parallel import DataParallelBackend, contiguous_shards, gpu_sets

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]

# What VLLMBackend gave vllm.LLM before engine options existed (data_gen/backends.py at a2e67a0),
# for make_backend's settings (seed, kv_cache_gib=2), on a CPU without AVX512-BF16 and on a GPU.
TODAY_CPU = dict(model="m", seed=0, max_model_len=2048, dtype="float32", enable_prefix_caching=True,
                 enable_lora=False, enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=2048)
TODAY_CPU_LORA = dict(TODAY_CPU, enable_lora=True, max_lora_rank=64)
TODAY_GPU = dict(model="m", seed=0, max_model_len=2048, dtype="bfloat16", enable_prefix_caching=True,
                 enable_lora=False, gpu_memory_utilization=0.85)


# ---- check_engine_options -----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_args():
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


def test_the_options_the_issue_names_pass_and_come_back_as_a_copy(engine_args):
    options = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "data_parallel_size": 4,
               "gpu_memory_utilization": 0.9, "max_model_len": 4096, "quantization": "awq", "max_num_seqs": 64,
               "max_lora_rank": 32, "block_size": 32, "cudagraph_capture_sizes": [1, 2, 4], "dtype": "bfloat16"}
    checked = check_engine_options(options)
    assert checked == options and checked is not options


def test_an_unknown_key_names_the_nearest_engine_args_field(engine_args):
    with pytest.raises(UserError, match=r"^models\.teacher\.engine\.tensor_paralel_size: not a vLLM engine option.*"
                                        r"did you mean 'tensor_parallel_size'\?.*fix the name or remove it"):
        check_engine_options({"tensor_paralel_size": 2}, where="models.teacher.engine")
    with pytest.raises(UserError, match=r"backend\.engine\.zzz: not a vLLM engine option") as caught:
        check_engine_options({"zzz": 1})
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize("key,value,says", [
    ("model", "other/model", r"models\.<role>"),
    ("tokenizer", "other/tok", r"models\.<role>"),
    ("seed", 3, r"recipe's `seed`"),
    ("enable_lora", True, r"stage that serves adapters"),
    ("data_parallel_rank", 1, r"give data_parallel_size only"),
])
def test_a_key_the_framework_sets_says_which_setting_sets_it(engine_args, key, value, says):
    with pytest.raises(UserError, match=rf"^backend\.engine\.{key}: set by this framework.*{says}.*remove it"):
        check_engine_options({key: value})


@pytest.mark.parametrize("key,value,says", [
    ("tensor_parallel_size", 0, "give 1 or more"),
    ("pipeline_parallel_size", -1, "give 1 or more"),
    ("data_parallel_size", 0, "give 1 or more"),
    ("gpu_memory_utilization", 1.5, "at most 1"),
    ("gpu_memory_utilization", 0, "above 0"),
    ("max_model_len", 0, "give 1 or more"),
    ("max_num_seqs", 0, "give 1 or more"),
    ("max_lora_rank", 0, "give 1 or more"),
    ("tensor_parallel_size", "2", "is not a whole number"),
    ("max_num_seqs", True, "is not a whole number"),
    ("gpu_memory_utilization", "0.9", "is not a number"),
    ("enforce_eager", "yes", "is not true or false"),
    ("max_lora_rank", 12, "is not one of 1, 8, 16, 32, 64"),
    ("dtype", "fp33", "is not one of auto, half"),
    ("quantization", 4, "is not a string or null"),
])
def test_a_bad_value_is_refused_with_the_field_and_the_fix(engine_args, key, value, says):
    with pytest.raises(UserError, match=rf"^backend\.engine\.{key}: .*{says}"):
        check_engine_options({key: value})


def test_no_options_do_not_import_vllm():
    code = ("import sys; from data_gen.backends import check_engine_options as c; "
            "assert c({}) == {} and c(None) == {}; print('vllm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ---- what reaches vllm.LLM ------------------------------------------------------------------

class RecordingLLM:
    """Stands in for vllm.LLM: records its keyword arguments and shutdowns; answers "model:prompt"."""

    built: list[dict] = []
    shutdowns: list[str] = []

    def __init__(self, **kwargs):
        RecordingLLM.built.append(kwargs)
        model = kwargs["model"]
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(
            shutdown=lambda: RecordingLLM.shutdowns.append(model)))
        self.model = model

    def chat(self, conversations, params, use_tqdm=False, lora_request=None):
        out = lambda text: SimpleNamespace(text=text, finish_reason="stop", token_ids=[1, 2], logprobs=None)
        return [SimpleNamespace(outputs=[out(f"{self.model}:{c[-1]['content']}")]) for c in conversations]


@pytest.fixture
def recorder(monkeypatch, engine_args):
    """vllm.LLM recorded, on a CPU (the env vars the CPU path sets, restored)."""
    import torch
    import vllm

    RecordingLLM.built, RecordingLLM.shutdowns = [], []
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    return RecordingLLM


def test_the_cpu_default_dtype_is_fp32_and_a_recipe_may_ask_for_bf16(recorder):
    """fp32 on every CPU: a CPU with AVX512-BF16 picked bf16 under "auto" and drew other samples."""
    VLLMBackend("m", seed=0, kv_cache_gib=2)
    VLLMBackend("m", seed=0, kv_cache_gib=2, engine={"dtype": "bfloat16"})
    assert [b["dtype"] for b in recorder.built] == ["float32", "bfloat16"]


def test_without_engine_options_vllm_gets_exactly_what_it_got_before(recorder, monkeypatch, capsys):
    VLLMBackend("m", seed=0, kv_cache_gib=2)
    VLLMBackend("m", seed=0, kv_cache_gib=2, enable_lora=True, max_lora_rank=64, engine={})
    VLLMBackend("m", seed=0, kv_cache_gib=2, engine=None)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    VLLMBackend("m", seed=0, kv_cache_gib=2)
    assert recorder.built == [TODAY_CPU, TODAY_CPU_LORA, TODAY_CPU, TODAY_GPU]
    assert "note:" not in capsys.readouterr().out


def test_engine_options_reach_vllm_over_the_defaults(recorder):
    VLLMBackend("m", seed=0, kv_cache_gib=2, enable_lora=True,
                engine={"max_model_len": 512, "max_lora_rank": 16, "dtype": "bfloat16", "enforce_eager": False,
                        "max_num_seqs": 8, "tensor_parallel_size": 1, "quantization": None})
    assert recorder.built == [dict(TODAY_CPU_LORA, max_model_len=512, max_lora_rank=16, dtype="bfloat16",
                                   enforce_eager=False, max_num_seqs=8, tensor_parallel_size=1, quantization=None)]


def test_dtype_auto_in_the_options_is_the_backends_own_choice(recorder):
    VLLMBackend("m", seed=0, engine={"dtype": "auto", "max_num_seqs": 4})
    assert recorder.built[0]["dtype"] == "float32"  # not vLLM's auto (bf16: slow kernels on this CPU)


def test_the_cpu_leaves_out_what_has_no_meaning_there_with_one_note(recorder, monkeypatch, capsys):
    engine = {"gpu_memory_utilization": 0.5, "kv_cache_memory_bytes": 2 ** 30, "max_num_seqs": 4}
    VLLMBackend("m", seed=0, kv_cache_gib=2, engine=engine)
    assert recorder.built[-1] == dict(TODAY_CPU, max_num_seqs=4)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "gpu_memory_utilization" in notes[0] and "kv_cache_memory_bytes" in notes[0]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU both apply, the user's share wins
    VLLMBackend("m", seed=0, kv_cache_gib=2, engine=engine)
    assert recorder.built[-1] == dict(TODAY_GPU, gpu_memory_utilization=0.5, kv_cache_memory_bytes=2 ** 30,
                                      max_num_seqs=4)
    assert "note:" not in capsys.readouterr().out


def test_one_backend_is_one_engine_and_data_parallel_needs_a_gpu(recorder):
    with pytest.raises(UserError, match=r"data_parallel_size: 2 asks for several engines.*Engines\(\)\.vllm"):
        VLLMBackend("m", engine={"data_parallel_size": 2})
    with pytest.raises(UserError, match=r"data_parallel_size: 2 on a machine without a GPU.*remove data_parallel_size"):
        Engines().vllm("m", seed=0, engine={"data_parallel_size": 2})
    assert recorder.built == []
    Engines().vllm("m", seed=0, engine={"data_parallel_size": 1})  # one engine: passed on as is
    assert recorder.built == [dict(TODAY_CPU, data_parallel_size=1)]


def test_a_closed_backend_says_so(recorder):
    backend = VLLMBackend("m", seed=0)
    assert [c.text for c in backend.chat([HI], Sampling())] == ["m:hi"]
    backend.close()
    with pytest.raises(RuntimeError, match=r"the vLLM engine of m was closed.*engines\.lazy"):
        backend.chat([HI], Sampling())


# ---- one engine at a time -------------------------------------------------------------------

def test_engines_hold_one_engine_at_a_time(recorder, capsys):
    engines = Engines()
    a = engines.vllm("a", seed=0, kv_cache_gib=2)
    assert engines.vllm("a", seed=0, kv_cache_gib=2) is a  # the same key: the same engine (its seed stream runs on)
    assert recorder.shutdowns == [] and "releasing" not in capsys.readouterr().out
    b = engines.vllm("b", seed=0, kv_cache_gib=2, engine={"max_num_seqs": 4, "cudagraph_capture_sizes": [1, 2]})
    assert recorder.shutdowns == ["a"] and a.llm is None and b.llm is not None
    assert "releasing the vLLM engine of a to start one for b" in capsys.readouterr().out
    assert engines.vllm("b", seed=0, kv_cache_gib=2, engine={"cudagraph_capture_sizes": [1, 2], "max_num_seqs": 4}) is b
    engines.vllm("b", seed=0, kv_cache_gib=2, enable_lora=True)  # same model, other settings: still one at a time
    assert recorder.shutdowns == ["a", "b"]
    assert "of b (engine=" in capsys.readouterr().out
    engines.release()
    assert recorder.shutdowns == ["a", "b", "b"] and len(recorder.built) == 3


def test_lazy_backends_swap_engines_only_when_the_role_changes(recorder):
    engines = Engines()
    teacher, student = engines.lazy("teacher", seed=0), engines.lazy("student", seed=0, enable_lora=True)
    assert (teacher.model, teacher.enable_lora, student.enable_lora) == ("teacher", False, True)
    assert teacher.chat([], Sampling()) == [] and recorder.built == []  # nothing asked: no engine
    answers = [backend.chat([HI], Sampling())[0].text for backend in (teacher, teacher, student, student, teacher)]
    assert answers == ["teacher:hi", "teacher:hi", "student:hi", "student:hi", "teacher:hi"]
    assert [k["model"] for k in recorder.built] == ["teacher", "student", "teacher"]
    assert recorder.shutdowns == ["teacher", "student"]
    with pytest.raises(UserError, match=r"backend\.engine\.max_num_seq: .*did you mean 'max_num_seqs'"):
        engines.lazy("teacher", seed=0, engine={"max_num_seq": 4})  # refused when made, not at the first chat
    engines.release()


# ---- data parallel --------------------------------------------------------------------------

class FakeEngine:
    """A worker's engine: answers "seed|devices|prompt"; leaves a file when closed."""

    def __init__(self, model, *, seed, closed_dir, fail_seed=None, **kwargs):
        if seed == fail_seed:
            raise UserError(f"engine with seed {seed} could not start")
        self.seed, self.closed_dir = seed, closed_dir
        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES")

    def chat(self, conversations, sampling, adapter=None, desc="generating", seeds=None):
        if conversations[0][-1]["content"] == "boom":
            raise ValueError(f"boom in engine {self.seed}")
        return [Completion(f"{self.seed}|{self.devices}|{c[-1]['content']}|{adapter}", "stop", 1)
                for c in conversations]

    def close(self):
        Path(self.closed_dir, f"closed-{self.seed}").touch()


def ask(*prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


@pytest.mark.parametrize("n,parts", [(7, 3), (2, 3), (0, 2), (6, 2), (1, 1)])
def test_contiguous_shards_give_the_batch_back_in_order(n, parts):
    shards = contiguous_shards(list(range(n)), parts)
    assert len(shards) == parts and [x for s in shards for x in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_gpu_sets_split_the_devices_and_refuse_too_few():
    assert gpu_sets(["4", "5", "6", "7"], 2, 2) == [["4", "5"], ["6", "7"]]
    with pytest.raises(UserError, match=r"needs 6 GPUs; this process sees 4 \(0,1,2,3\); lower data_parallel_size"):
        gpu_sets(["0", "1", "2", "3"], 3, 2)


def test_data_parallel_shards_keep_order_and_close_the_workers(tmp_path):
    dp = DataParallelBackend("m", replicas=3, devices_per_engine=2, seed=10, build=FakeEngine,
                             devices=[str(i) for i in range(6)], closed_dir=str(tmp_path))
    try:
        assert (dp.model, dp.enable_lora) == ("m", False)
        answers = [c.text for c in dp.chat(ask(*"abcdefg"), Sampling(), adapter="lora")]
        assert answers == ["10|0,1|a|lora", "10|0,1|b|lora", "10|0,1|c|lora", "11|2,3|d|lora", "11|2,3|e|lora",
                           "12|4,5|f|lora", "12|4,5|g|lora"]
        assert [c.text for c in dp.chat(ask("x", "y"), Sampling())] == ["10|0,1|x|None", "11|2,3|y|None"]
        with pytest.raises(ValueError, match="boom in engine 11"):
            dp.chat(ask("a", "boom", "c"), Sampling())
        assert [c.text[:2] for c in dp.chat(ask("a", "b", "c"), Sampling())] == ["10", "11", "12"]  # still in step
        processes = [p for p, _ in dp._workers]
    finally:
        dp.close()
    assert not any(p.is_alive() for p in processes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed-10", "closed-11", "closed-12"]
    with pytest.raises(RuntimeError, match="were closed"):
        dp.chat(ask("a"), Sampling())
    dp.close()  # twice: nothing left to stop


def test_a_worker_that_cannot_start_stops_them_all(tmp_path):
    with pytest.raises(UserError, match="engine with seed 1 could not start"):
        DataParallelBackend("m", replicas=2, build=FakeEngine, devices=["0", "1"], closed_dir=str(tmp_path),
                            fail_seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["closed-0"]  # the one that started was closed


@pytest.mark.integration
def test_a_real_cpu_engine_runs_with_the_options_that_apply(default_model_dir, capsys):
    """The same options a GPU recipe gives: the CPU leaves out the memory share and runs the rest."""
    pytest.importorskip("vllm")
    engines = Engines()
    try:
        backend = engines.vllm(default_model_dir, seed=0, kv_cache_gib=1,
                               engine={"max_num_seqs": 2, "max_model_len": 512, "gpu_memory_utilization": 0.9})
        answers = backend.chat(ask("Say hello.", "Name a colour.", "Count to three."), Sampling(max_tokens=8),
                               desc="")
        config = backend.llm.llm_engine.vllm_config
        assert (config.scheduler_config.max_num_seqs, config.model_config.max_model_len) == (2, 512)
    finally:
        engines.release()
    assert len(answers) == 3 and all(a.num_tokens > 0 for a in answers)
    assert "left out: gpu_memory_utilization" in capsys.readouterr().out
