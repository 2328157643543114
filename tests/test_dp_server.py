"""Data-parallel generation on vLLM's own engine: one `vllm serve --data-parallel-size N` behind
the HTTP backend (``backend: {kind: openai, base_urls: [one URL]}``), the README's recommended
multi-GPU generation path. A fake OpenAI-compatible server in a thread stands in for it: it
hands each request to the least busy of its N engines, as vLLM's data-parallel front end does,
and records which engine answered and how many were busy at once. What is held: with one URL
the backend keeps every engine busy, every answer comes back once and in input order, and a
recipe's generation stage runs through it unchanged."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from data_gen.backends import Sampling
from data_gen.http_backend import OpenAIBackend

ROOT = Path(__file__).resolve().parents[1]
MODEL = "served/persona-model"
WORDS = ("harbour kettle lantern meadow orchard pebble quarry ribbon saddle thistle umbrella violin walnut "
         "yarrow zephyr anchor bramble cinder dune ember fjord glacier hazel islet juniper kelp loam").split()


class DataParallelServer:
    """``engines`` engines behind one URL: a request goes to the engine with the fewest requests in
    flight and takes ``delay(request)`` seconds there; an engine answers ``slots`` at a time."""

    def __init__(self, engines: int, answer, delay=lambda request: 0.05, slots: int = 1):
        self.engines, self.answer, self.delay = engines, answer, delay
        self.load = [0] * engines
        self.served: list[tuple[int, str]] = []   # (engine, the request's last user message)
        self.max_busy_engines = 0
        self._lock = threading.Condition()
        self.slots = slots
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # /v1/models: the backend checks the served model first
                self._send({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine = server.acquire()
                try:
                    time.sleep(server.delay(request))
                    text = server.answer(request, engine)
                    with server._lock:
                        server.served.append((engine, request["messages"][-1]["content"]))
                finally:
                    server.release(engine)
                self._send({"id": "x", "object": "chat.completion", "model": MODEL,
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def acquire(self) -> int:
        with self._lock:
            while min(self.load) >= self.slots:
                self._lock.wait()
            engine = self.load.index(min(self.load))
            self.load[engine] += 1
            self.max_busy_engines = max(self.max_busy_engines, sum(1 for n in self.load if n))
            return engine

    def release(self, engine: int) -> None:
        with self._lock:
            self.load[engine] -= 1
            self._lock.notify_all()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def dp_server():
    servers = []

    def start(*args, **kwargs) -> DataParallelServer:
        servers.append(DataParallelServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_one_url_keeps_every_engine_of_a_data_parallel_server_busy(dp_server):
    # Uneven requests (every fourth one long), as a batch of generations is: the server balances them.
    server = dp_server(4, answer=lambda request, engine: "re: " + request["messages"][-1]["content"],
                       delay=lambda request: 0.3 if request["messages"][-1]["content"].endswith(("0", "4")) else 0.05)
    backend = OpenAIBackend(MODEL, server.url, max_concurrency=8, backoff_s=0.01, timeout_s=10.0)
    questions = [f"question {i}" for i in range(24)]
    completions = backend.chat([[{"role": "user", "content": q}] for q in questions],
                               Sampling(temperature=1.0, max_tokens=32), desc="")
    backend.close()
    assert [c.text for c in completions] == [f"re: {q}" for q in questions]  # input order, none lost
    assert sorted(q for _, q in server.served) == sorted(questions)          # each asked once
    assert server.max_busy_engines == 4                                      # all engines at work at once
    assert {engine for engine, _ in server.served} == {0, 1, 2, 3}


def test_a_recipe_generates_through_one_data_parallel_server(dp_server, tmp_path):
    """The prompts stage of a recipe with ``backend: {kind: openai, base_urls: [URL]}``: the
    recipe says nothing about data parallelism; the server's engines share its requests."""
    from character_training import cli

    def questions(request: dict, engine: int) -> str:
        with lock:
            start = counter[0]
            counter[0] += 10
        return "\n".join(f"{i + 1}. What would you say about the {WORDS[(start + i) % len(WORDS)]} and the "
                         f"{WORDS[(start + 3 * i + 1) % len(WORDS)]} number {start + i}?" for i in range(10))

    lock, counter = threading.Lock(), [0]
    server = dp_server(2, answer=questions, delay=lambda request: 0.05)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "constitution": str(ROOT / "constitutions" / "captain-marlow.yaml"), "run_dir": str(tmp_path / "run"),
        "model": None, "stages": ["prompts"],   # the packaged model, served under MODEL
        "backend": {"kind": "openai", "base_urls": [server.url], "served_model": MODEL, "max_concurrency": 8},
        "prompts": {"per_trait": 6, "heldout_per_trait": 2, "per_request": 10}}))
    assert cli.main(["run", str(recipe)]) == 0
    stage = tmp_path / "run" / "prompts"
    manifest = json.loads((stage / "manifest.json").read_text())
    rows = [json.loads(line) for line in (stage / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["counts"]["train"] + manifest["counts"]["heldout"] > 0
    assert len(server.served) == manifest["requests"] >= 2
    assert {engine for engine, _ in server.served} == {0, 1}  # both engines of the one server answered
