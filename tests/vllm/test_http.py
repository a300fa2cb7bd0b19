"""emokern.vllm.http without a server: choice indices of derived request ids, server-sent
events (the server tests are in test_serve.py)."""

from emokern.vllm.http import _choice_index, _event_data, _maybe_last


def test_choice_index_of_derived_ids():
    completion = _choice_index("cmpl-1", "completion", n=2)
    assert [completion(r) for r in ("cmpl-1-0", "1_cmpl-1-0", "cmpl-1-1", "1_cmpl-1-1")] == [
        0, 1, 2, 3]
    assert completion("cmpl-10-0") is None and completion("x_cmpl-1-0") is None
    chat = _choice_index("chatcmpl-7", "chat", n=3)
    assert [chat(r) for r in ("chatcmpl-7", "1_chatcmpl-7", "2_chatcmpl-7")] == [0, 1, 2]


def test_events():
    assert _event_data(b"data: [DONE]") == b"[DONE]"
    assert _event_data(b": keep-alive") is None
    assert _event_data(b'data: {"a":\ndata: 1}') == b'{"a":\n1}'
    assert not _maybe_last(b'{"choices": [{"index": 0, "finish_reason": null}]}')
    assert _maybe_last(b'{"choices": [{"index": 0, "finish_reason": "length"}]}')
    assert _maybe_last(b'{"choices": [], "usage": {}}')
    assert not _maybe_last(b"not json")


# ---------------------------------------------------------------------------- the middleware


import asyncio  # noqa: E402
import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from emokern.vllm.http import EmotionMiddleware  # noqa: E402


class _App:
    """A stand-in for vLLM's app: records what reached it, answers 200 ``{}``."""

    def __init__(self, additional=None, api_key=None):
        engine = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=additional))
        self.state = SimpleNamespace(engine_client=engine, args=SimpleNamespace(api_key=api_key))
        self.bodies = []

    async def __call__(self, scope, receive, send):
        self.bodies.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _exchange(app, method, path, body=None, headers=()):
    sent = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode() if body else b"",
                 "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "app": app,
             "headers": list(headers)}
    asyncio.run(EmotionMiddleware(app)(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, payload


def test_middleware_refuses_a_bad_mix_with_one_400_naming_the_field(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = _App({"emokern": {}})
    for mix in ("banana=1", "joy=", {"joy": "x"}, 5, {"joy": float("inf")}):
        status, payload = _exchange(app, "POST", "/v1/completions",
                                    {"prompt": "hi", "vllm_xargs": {"emotion": mix}})
        error = json.loads(payload)["error"]
        assert status == 400 and error["code"] == 400 and error["type"] == "BadRequestError"
        assert error["param"] == "vllm_xargs['emotion']"
        assert "vllm_xargs['emotion']" in error["message"]
    assert app.bodies == []  # nothing reached vLLM
    body = {"prompt": "hi", "vllm_xargs": {"emotion": "joy=2"}}
    status, payload = _exchange(app, "POST", "/v1/embeddings", body)
    assert status == 200 and json.loads(app.bodies[0]) == body  # the body replayed whole


def test_middleware_without_emokern(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = _App(None)
    status, payload = _exchange(app, "POST", "/v1/completions",
                                {"prompt": "hi", "vllm_xargs": {"emotion": "joy=2"}})
    assert status == 400 and "started without emotion steering" in payload.decode()
    status, payload = _exchange(app, "GET", "/v1/emotions")
    assert status == 404 and json.loads(payload)["error"]["type"] == "NotFoundError"
    status, _ = _exchange(app, "POST", "/v1/completions", {"prompt": "hi"})
    assert status == 200 and len(app.bodies) == 1


def test_middleware_leaves_unauthorized_requests_to_vllm(monkeypatch):
    pytest.importorskip("vllm.entrypoints.serve.middleware.authenticate")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = _App({"emokern": {}}, api_key=["k1"])
    assert _exchange(app, "GET", "/v1/emotions")[0] == 401
    bad = {"prompt": "hi", "vllm_xargs": {"emotion": "banana=1"}}
    # not checked without the key: vLLM's own authentication answers (here: the stand-in)
    assert _exchange(app, "POST", "/v1/completions", bad)[0] == 200
    key = [(b"authorization", b"Bearer k1")]
    assert _exchange(app, "POST", "/v1/completions", bad, key)[0] == 400


def test_middleware_takes_levels_only_from_an_engine_that_enables_them(monkeypatch):
    """A level mix (or a malformed one) to an engine without levels is one 400 naming the
    field, and the middleware keeps answering; an engine with levels lets it through."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    off, on = _App({"emokern": {}}), _App({"emokern": {"levels": True}})
    for mix in ("sadness@1.5", {"anger": {"max": 0.5}}, "fear=erase", "joy>=1,joy@2"):
        status, payload = _exchange(off, "POST", "/v1/completions",
                                    {"prompt": "hi", "vllm_xargs": {"emotion": mix}})
        error = json.loads(payload)["error"]
        assert status == 400 and error["param"] == "vllm_xargs['emotion']"
        assert "vllm_xargs['emotion']" in error["message"]
    assert "started without levels" in json.loads(_exchange(off, "POST", "/v1/completions", {
        "prompt": "hi", "vllm_xargs": {"emotion": "sadness@1.5"}})[1])["error"]["message"]
    assert off.bodies == []
    status, _ = _exchange(off, "POST", "/v1/completions",
                          {"prompt": "hi", "vllm_xargs": {"emotion": "joy=2"}})
    assert status == 200 and len(off.bodies) == 1  # still serving
    body = {"prompt": "hi", "vllm_xargs": {"emotion": "sadness@1.5,joy=2,joy<=3"}}
    assert _exchange(on, "POST", "/v1/completions", body)[0] == 200
    assert json.loads(on.bodies[0]) == body
    status, payload = _exchange(on, "POST", "/v1/completions",
                                {"prompt": "hi", "vllm_xargs": {"emotion": "joy@1,joy=2"}})
    assert status == 400 and "has a level and a push" in payload.decode()
