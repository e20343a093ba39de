"""A small scriptable OpenAI-compatible server for judge tests (127.0.0.1 only, stdlib only).

`POST /v1/chat/completions` answers with a one-token chat completion carrying `top_logprobs`. Behaviour:

* `server.top` — default `(token, logprob)` pairs of each reply; `server.responder(prompt) -> pairs` overrides.
* `server.enqueue(*faults)` — faults applied to the next requests, one per request, in arrival order.
* `server.fail_when(substring, fault)` — a permanent fault for every request whose prompt contains `substring`.
* `server.delay` — seconds every request sleeps before answering.
* `server.reply_tokens` — the tokens of a reply to a request with `max_tokens` > 1 and logprobs (a judge probing
  whether numbers are split into digits), e.g. `["8", "5"]`; None: the usual one-token reply.
* `server.sample_texts` — reply texts for a request asking for `n` > 1 completions without logprobs (a sampled
  judge): choice i answers `sample_texts[i % len]`.

Faults: "429", "500", "503" (HTTP errors), "401-echo" (401 echoing the bearer token, like a real "incorrect
API key" message), "slow" (sleep `slow_seconds`, then answer), "drop" (close without a response), "malformed"
(invalid JSON body), "no_choices", "no_logprobs" (answer text only), "refusal", "code".

Run standalone for manual checks: `python tests/fake_openai_server.py` prints its base URL.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Pairs = list[tuple[str, float]]


def _completion(model: str, pairs: Pairs, with_logprobs: bool = True) -> dict[str, Any]:
    best = max(pairs, key=lambda p: p[1])
    logprobs = None
    if with_logprobs:
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in pairs]
        logprobs = {"content": [{"token": best[0], "logprob": best[1], "bytes": None, "top_logprobs": top}]}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": best[0]},
                "finish_reason": "length",
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


class FakeOpenAIServer:
    """Threaded fake chat-completions server; use as a context manager."""

    def __init__(self, top: Pairs | None = None) -> None:
        self.top: Pairs = top or [("80", math.log(0.6)), ("90", math.log(0.4))]
        self.responder: Callable[[str], Pairs] | None = None
        self.delay = 0.0
        self.sample_texts: list[str] = ["50"]
        self.reply_tokens: list[str] | None = None
        self.slow_seconds = 2.0
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        self.answered = 0
        self._faults: deque[str] = deque()
        self._rules: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- scripting ------------------------------------------------------------------------------------------
    def enqueue(self, *faults: str) -> None:
        with self._lock:
            self._faults.extend(faults)

    def fail_when(self, substring: str, fault: str) -> None:
        with self._lock:
            self._rules.append((substring, fault))

    def prompts(self) -> list[str]:
        """User-message text of every request received so far, in arrival order."""
        with self._lock:
            return [r["messages"][-1]["content"] for r in self.requests]

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
                pass

            def do_POST(self) -> None:  # noqa: N802
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling -----------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        prompt = body.get("messages", [{}])[-1].get("content", "")
        with self._lock:
            self.requests.append(body)
            self.auth_headers.append(h.headers.get("Authorization", ""))
            fault = next((f for s, f in self._rules if s in prompt), None)
            if fault is None and self._faults:
                fault = self._faults.popleft()
        if self.delay:
            time.sleep(self.delay)
        if not h.path.endswith("/chat/completions"):
            return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
        pairs = self.responder(prompt) if self.responder else self.top
        model = body.get("model", "fake")
        if fault in ("429", "500", "502", "503"):
            return self._send(h, int(fault), {"error": {"message": f"fake {fault}", "type": "server_error"}})
        if fault == "401-echo":
            key = h.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._send(h, 401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
        if fault == "drop":
            h.close_connection = True
            return None
        if fault == "slow":
            time.sleep(self.slow_seconds)
        if fault == "malformed":
            return self._send(h, 200, b'{"id": "chatcmpl-fake", "choices": [')
        if fault == "no_choices":
            return self._send(
                h, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model}
            )
        if fault == "refusal":
            pairs = [("REF", math.log(0.9)), ("0", math.log(0.05))]
        elif fault == "code":
            pairs = [("CODE", math.log(0.8)), ("50", math.log(0.1))]
        reply = _completion(model, pairs, with_logprobs=fault != "no_logprobs" and bool(body.get("logprobs", True)))
        if int(body.get("max_tokens") or 1) > 1 and body.get("logprobs") and self.reply_tokens:
            reply["choices"][0]["logprobs"]["content"] = [
                {"token": t, "logprob": 0.0, "bytes": None, "top_logprobs": [{"token": t, "logprob": 0.0}]}
                for t in self.reply_tokens]
            reply["choices"][0]["message"]["content"] = "".join(self.reply_tokens)
        if int(body.get("n") or 1) > 1 and not body.get("logprobs"):
            texts = [self.sample_texts[i % len(self.sample_texts)] for i in range(int(body["n"]))]
            reply["choices"] = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                                 "logprobs": None} for i, t in enumerate(texts)]
        self._send(h, 200, reply)
        with self._lock:
            self.answered += 1
        return None

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


if __name__ == "__main__":  # pragma: no cover - manual use
    with FakeOpenAIServer() as srv:
        print(srv.base_url, flush=True)  # noqa: T201
        threading.Event().wait()
