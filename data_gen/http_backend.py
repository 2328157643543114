"""A backend over OpenAI-compatible HTTP servers (``vllm serve``, or any /v1/chat/completions).

``OpenAIBackend`` sends one POST ``{base_url}/chat/completions`` per conversation, spread
round-robin over one or more servers, at most ``max_concurrency`` at a time, and returns the
completions in input order. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff (with jitter) on the next server; any other 4xx is the user's to fix and is
raised at once. Either way the error is a ``UserError`` naming the URL and what to check.

Start a server for it with, e.g.::

    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8000 \\
        --enable-lora --lora-modules pirate=/runs/pirate/dpo/adapter

and build ``OpenAIBackend("HuggingFaceTB/SmolLM2-135M-Instruct", "http://127.0.0.1:8000/v1")``.
An ``adapter`` given to ``chat`` is sent as the request's model name: a name is sent as it is;
a local adapter directory is sent as its basename, so the server must have been started with
``--lora-modules <basename>=<path>`` (vLLM serves LoRA adapters by name, not by path).

Seeds: each request carries its own seed (data_gen/seeds.py): the one given to ``chat`` (a
stage's cache derives them), or one derived from the backend's ``seed``, the request's user-side
messages and which sample of an identical request in this call it is, so a run is reproducible
whatever order the answers arrive in, and the n samples of a best-of-n request still differ.
``seed=None`` sends no seed. A vLLM server on a CPU must run whole prefills for seeded requests
(``vllm serve ... --no-enable-chunked-prefill --max-num-batched-tokens <max-model-len or more>``):
a chunked prefill rewinds a seeded request's generator, which the CPU generator cannot do ("CPU
Generator does not use offset"). A GPU server needs nothing.

The API key is read from the environment variable ``api_key_env`` (when set) into an
``Authorization: Bearer`` header; it is never logged, never in a repr or an error message. A
credential written into a base URL (``http://user:secret@host/v1``, or a key in its query
string) is sent as given but shown as ``***`` in every message and repr (``redact_url``).
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import httpx

from data_gen.backends import Completion, Conversation, Sampling
from data_gen.errors import UserError

# Statuses worth another try: rate limited, or the server failed (it may be restarting).
_RETRIABLE = {429} | set(range(500, 600))
# OpenAI's API and vLLM both cap top_logprobs at 20 (vLLM: --max-logprobs, default 20).
_MAX_TOP_LOGPROBS = 20
_BODY_CHARS = 300  # how much of a server's error body goes into an error message
# Query parameters that carry a credential (api_key=..., token=..., sig=...): their values are redacted.
_SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|sig|credential", re.I)


def _query_secrets(query: str) -> list[tuple[str, str]]:
    """(name, value) of the query parameters named like a credential, as written (not decoded)."""
    pairs = [part.split("=", 1) for part in query.split("&") if "=" in part]
    return [(name, value) for name, value in pairs if value and _SECRET_PARAM.search(name)]


def url_secrets(url: str) -> list[str]:
    """The credentials written into a URL: the password of its user info (or the user, when it
    stands alone: a token) and the values of query parameters named like a key or token (at least 4 characters: a shorter one could not be
    replaced wherever it occurs without mangling a message; the URL itself is redacted whole)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [value for _, value in _query_secrets(parts.query)]
    if "@" in parts.netloc:  # user:password, or a token alone as the user
        user, _, password = parts.netloc.rsplit("@", 1)[0].partition(":")
        found.append(password or user)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """The URL as it may be shown: its user info and secret query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" in parts.netloc:
        url = url.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
    for name, value in _query_secrets(parts.query):
        url = url.replace(f"{name}={value}", f"{name}=***")
    return url


class OpenAIBackend:
    """Chat completions from OpenAI-compatible servers (see the module docstring)."""

    def __init__(self, model: str, base_urls: list[str] | str, *, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 4,
                 backoff_s: float = 1.0, seed: int | None = 0, check: bool = True):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise UserError("OpenAIBackend needs at least one base URL: pass e.g. 'http://127.0.0.1:8000/v1'")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise UserError("OpenAIBackend: max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0 and "
                            "backoff_s >= 0; fix the backend settings")
        self.model = model
        self.base_urls = [u.strip().rstrip("/") for u in urls]
        # What messages show of each URL, and what they must never show (credentials in the URLs).
        self._shown = {u: redact_url(u) for u in self.base_urls}
        self._secrets = sorted({s for u in self.base_urls for s in url_secrets(u)}, key=len, reverse=True)
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.seed = seed
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s),
                                    limits=httpx.Limits(max_connections=max_concurrency * 2))
        self._next_url = 0  # round-robin position, carried across calls
        self._jitter = random.Random()  # only spaces out retries; never touches what is generated
        self._jitter_lock = threading.Lock()
        if check:
            self.check()

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_urls={[self._shown[u] for u in self.base_urls]!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------- checks

    def check(self) -> None:
        """GET ``{base_url}/models`` on every server; raise a UserError naming the servers that
        did not answer and, where the model is not served, the names that are."""
        unreachable, missing = [], []
        for url in self.base_urls:
            shown = self._shown[url]
            try:
                response = self._client.get(f"{url}/models")
                response.raise_for_status()
                served = [m.get("id") for m in response.json().get("data", [])]
            except httpx.HTTPStatusError as exc:
                unreachable.append(f"{shown} (HTTP {exc.response.status_code} from {shown}/models)")
                continue
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError) as exc:
                unreachable.append(f"{shown} ({self._redact(_describe(exc))})")
                continue
            if self.model not in served:
                missing.append(f"{shown} serves {self._redact(str(served))}")
        if unreachable:
            raise UserError(f"OpenAI-compatible server(s) not reachable: {'; '.join(unreachable)}. Start the "
                            f"server (e.g. `vllm serve {self.model} --port 8000`), check the base URL ends with "
                            f"/v1, and on HTTP 401/403 the API key in the backend's api_key_env variable")
        if missing:
            raise UserError(f"model {self.model!r} is not served: {'; '.join(missing)}. Use one of the served "
                            f"names as the model, or start the server with `--served-model-name {self.model}`")

    # ------------------------------------------------------------------------------ requests

    def request_model(self, adapter: str | None) -> str:
        """The model name a request is sent under: the base model, or the adapter's served name."""
        if adapter is None:
            return self.model
        if os.path.isdir(adapter):
            return Path(adapter).resolve().name  # served by `--lora-modules <basename>=<path>`
        return adapter

    def _payload(self, conversation: Conversation, sampling: Sampling, model: str, seed: int | None) -> dict:
        payload = {"model": model, "messages": list(conversation), "temperature": sampling.temperature,
                   "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        if sampling.repetition_penalty != 1.0:
            payload["repetition_penalty"] = sampling.repetition_penalty  # a vLLM extension
        if sampling.frequency_penalty != 0.0:
            payload["frequency_penalty"] = sampling.frequency_penalty
        if sampling.logprobs > 0:
            payload["logprobs"] = True
            payload["top_logprobs"] = min(sampling.logprobs, _MAX_TOP_LOGPROBS)
        if seed is not None and self.seed is not None:
            payload["seed"] = int(seed)
        return payload

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling,
             adapter: str | None = None, desc: str = "generating",
             seeds: Sequence[int] | None = None) -> list[Completion]:
        from tqdm.auto import tqdm

        from data_gen.seeds import seeds_for

        if not conversations:
            return []
        model = self.request_model(adapter)
        if seeds is None:
            seeds = seeds_for(self.seed or 0, conversations, adapter)
        # Payloads (and seeds) and servers are fixed here, in input order, before any is sent.
        jobs = []
        for conversation, seed in zip(conversations, seeds):
            jobs.append((self._payload(conversation, sampling, model, seed), self._next_url))
            self._next_url = (self._next_url + 1) % len(self.base_urls)
        results: list[Completion | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc=desc or None, disable=not desc, unit="answer") as bar, \
                ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
            futures = {pool.submit(self._post, payload, start): i for i, (payload, start) in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    results[futures[future]] = future.result()
                    bar.update(1)
        return results  # type: ignore[return-value]

    def _post(self, payload: dict, start: int) -> Completion:
        """One request, retried on the next server after a transient failure."""
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            base = self.base_urls[(start + attempt) % len(self.base_urls)]
            url, shown = f"{base}/chat/completions", f"{self._shown[base]}/chat/completions"
            if attempt:
                time.sleep(self._backoff(attempt, retry_after))
            retry_after = None
            try:
                response = self._client.post(url, json=payload)
            except httpx.InvalidURL as exc:
                raise UserError(f"{shown}: not a valid URL ({self._redact(_describe(exc))}); write the base URL as "
                                "http://HOST:PORT/v1") from None
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = f"{shown}: {self._redact(_describe(exc))}"
                continue
            if response.status_code == 200:
                try:
                    return _completion(response.json())
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise UserError(f"{shown} answered HTTP 200 with a body that is not a chat completion "
                                    f"({type(exc).__name__}: {self._redact(str(exc))}): {self._body(response)}. "
                                    f"Check the base "
                                    f"URL points at an OpenAI-compatible /v1 API") from None
            if response.status_code not in _RETRIABLE:
                raise UserError(f"{shown} refused the request for model {payload['model']!r}: HTTP "
                                f"{response.status_code}: {self._body(response)}."
                                f"{_hint(response.status_code)}") from None
            last = f"{shown}: HTTP {response.status_code}: {self._body(response)}"
            retry_after = _retry_after(response)
        raise UserError(f"chat completion failed after {self.max_retries + 1} attempt(s); last error: {last}. Is "
                        f"the server up (`curl {self._shown[self.base_urls[0]]}/models`) and is {payload['model']!r} "
                        "one of "
                        f"its served models? Raise timeout_s/max_retries if it is only slow") from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        with self._jitter_lock:
            jitter = self._jitter.uniform(0.5, 1.5)
        wait_s = self.backoff_s * 2 ** (attempt - 1) * jitter
        return max(wait_s, min(retry_after, 60.0)) if retry_after is not None else wait_s

    def _redact(self, text: str) -> str:
        """``text`` without the API key or any credential written into a base URL."""
        auth = self._client.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        for url in self.base_urls:  # whole URLs first, so that their shape stays readable
            text = text.replace(url, self._shown[url])
        for secret in ([key] if key else []) + self._secrets:
            text = text.replace(secret, "***")
        return text

    def _body(self, response: httpx.Response) -> str:
        """The server's error message (vLLM/OpenAI: {"error": {"message"}}), short and redacted."""
        text = response.text
        try:
            error = response.json().get("error")
            text = error.get("message", text) if isinstance(error, dict) else (error or text)
        except (ValueError, AttributeError):
            pass
        text = " ".join(str(text).split())
        return self._redact(text[:_BODY_CHARS] + ("..." if len(text) > _BODY_CHARS else ""))


def _completion(body: dict) -> Completion:
    choice = body["choices"][0]
    text = choice["message"].get("content") or ""
    usage = body.get("usage") or {}
    content = (choice.get("logprobs") or {}).get("content") or []
    num_tokens = usage.get("completion_tokens")
    if num_tokens is None:
        num_tokens = len(content)
    # Only a model that ended its answer counts as "stop"; cut off, aborted or unknown is "length".
    finish_reason = "stop" if choice.get("finish_reason") == "stop" else "length"
    first = None
    if content and content[0].get("top_logprobs"):
        first = {}
        for alt in content[0]["top_logprobs"]:
            first[alt["token"]] = max(first.get(alt["token"], float("-inf")), float(alt["logprob"]))
    return Completion(text=text, finish_reason=finish_reason, num_tokens=int(num_tokens), first_logprobs=first)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _hint(status: int) -> str:
    if status in (401, 403):
        return " Check the API key in the backend's api_key_env variable (OPENAI_API_KEY by default)"
    if status == 404:
        return (" Check the model name (the server's --served-model-name, or an adapter's name in "
                "--lora-modules) and that the base URL ends with /v1")
    if status == 400:
        return (" Check the sampling settings (max_tokens plus the prompt must fit the server's "
                "--max-model-len) and the adapter's name")
    return ""
