"""Stand-ins for vLLM's API server app and engine client, to run the readings middleware
(``emokern.vllm.http.EmotionMiddleware``) as a plain ASGI app without vLLM: messages in, messages
out (import as ``from asgi_app import App, exchange``). Over HTTP against a real server:
``tests/vllm/``."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from emokern.vllm.http import EmotionMiddleware

#: The default bank's model (SmolLM2-135M) has 30 decoder layers.
MODEL_LAYERS = 30


class Engine:
    """vLLM's ``engine_client`` as the middleware reads it: the additional config, the model's
    layer count, its device type, and ``collective_rpc("emokern_readings")`` answered by one
    worker with ``readings`` (request id → reading); every call recorded in :attr:`rpc`."""

    def __init__(self, additional, readings=None, device="cuda"):
        self.vllm_config = SimpleNamespace(additional_config=additional,
                                           device_config=SimpleNamespace(device_type=device))
        self.model_config = SimpleNamespace(
            hf_text_config=SimpleNamespace(num_hidden_layers=MODEL_LAYERS))
        self.readings = readings or {}
        self.rpc = []

    async def collective_rpc(self, method, args=()):
        self.rpc.append((method, args))
        return [dict(self.readings)]


def json_answer(content, status: int = 200) -> list[dict]:
    """The ASGI messages of a JSON answer with its content length."""
    body = json.dumps(content).encode()
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body, "more_body": False}]


class App:
    """vLLM's app as the middleware sees it: ``state`` (engine, parsed arguments); answers
    with the messages ``answer`` (default 200 ``{}``) and records what it received in
    :attr:`received` (path, whole body)."""

    def __init__(self, additional=None, *, api_key=None, readings=None, answer=None,
                 device="cuda"):
        self.state = SimpleNamespace(engine_client=Engine(additional, readings, device),
                                     args=SimpleNamespace(api_key=api_key))
        self.received = []
        self.answer = answer or json_answer({})

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.received.append((scope["path"], body))
        for message in self.answer:
            await send(message)


def exchange(app, method, path, body=None, *, headers=(), key=None, chunks=1,
             scope_type="http", root_path=""):
    """One exchange through the middleware in front of ``app``: ``(status, headers, body
    bytes)`` (``(None, {}, b"")`` when nothing was sent). ``body``: bytes or JSON content, sent
    as ``chunks`` ``http.request`` messages; ``headers``: ``(name, value)`` pairs; ``key``: the
    raw ``authorization`` header."""
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    step = max(1, -(-len(data) // chunks))
    parts = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    request_headers = [(b"content-type", b"application/json"),
                       *((k.lower().encode(), v.encode()) for k, v in headers)]
    if key is not None:
        request_headers.append((b"authorization", key.encode()))
    scope = {"type": scope_type, "method": method, "path": root_path + path,
             "root_path": root_path, "app": app, "headers": request_headers}
    asyncio.run(EmotionMiddleware(app)(scope, receive, send))
    if not sent:
        return None, {}, b""
    start = sent[0]
    return (start["status"], dict(start.get("headers", [])),
            b"".join(m.get("body", b"") for m in sent[1:]))


def bearer_key_check(scope, tokens) -> bool:
    """vLLM's API-key check (importing it imports vLLM) as an exact comparison of the bearer
    token: patch ``emokern.vllm.internals.api_key_ok`` with it."""
    return dict(scope["headers"]).get(b"authorization") in [
        f"Bearer {t}".encode() for t in tokens]
