"""HTTP error paths of the readings middleware against real vLLM servers, with the official
``openai`` client and raw HTTP (``urllib``): a mix sent to an engine without emokern (400),
``GET /v1/emotions`` without or with a wrong API key (401) and on an engine without emokern
(404), paths the middleware does not own (vLLM's 404), and the API key guarding the mix check.

Two servers, started together once for the module (eager, the default model; this module is
about the HTTP side), neither with emokern's additional config:

- ``server``: the middleware added by ``--middleware`` (what ``emokern serve`` passes), with an
  API key given only by ``VLLM_API_KEY``. This middleware runs *outside* vLLM's
  authentication, so its own key check (the ``VLLM_API_KEY`` fallback included) decides.
- the plugin server: the middleware added by the endpoint plugin (``VLLM_PLUGINS=emokern``, no
  ``--middleware``), no key. Added this way it runs inside vLLM's authentication, so only a
  server of the first kind can show the middleware's own key handling.

Run by ``make test-vllm``; skipped without vLLM. The middleware alone, without vLLM:
``tests/test_http_middleware.py``.
"""

from __future__ import annotations

import sys
import time

import pytest
from live_server import call, openai_client, server_env, start, stop, wait

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

import emokern.vllm  # noqa: E402
from emokern.vllm.http import READINGS_FIELD  # noqa: E402
from emokern.vllm.serve import MIDDLEWARE  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.model]

KEY = "emokern-http-errors-key"
WITHOUT_EMOKERN = "was given but this engine was started without emotion steering"
PARAM = "vllm_xargs['emotion']"


def _start(extra: list[str], env: dict, log):
    """vLLM's own launcher on the default model (eager, small), not waited for."""
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(emokern.vllm.default_model_dir()), "--served-model-name", "m",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--disable-uvicorn-access-log", *extra]
    return start(cmd, server_env(drop=("VLLM_PLUGINS", "VLLM_API_KEY"), **env), log)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers of the module docstring, started at once: ``{"middleware": url, "plugin":
    url}``; stopped after the module."""
    logs = tmp_path_factory.mktemp("http-errors")
    since = time.monotonic()
    procs = {}
    try:
        procs["middleware"] = _start(["--middleware", MIDDLEWARE], {"VLLM_API_KEY": KEY},
                                     logs / "middleware.log")
        procs["plugin"] = _start([], {"VLLM_PLUGINS": "emokern"}, logs / "plugin.log")
        for name, (proc, url) in procs.items():
            wait(proc, url, logs / f"{name}.log", since)
        print(f"servers up in {time.monotonic() - since:.0f} s")
        plugin_log = (logs / "plugin.log").read_text()
        assert "Loaded endpoint plugin emokern" in plugin_log, plugin_log[-4000:]
        assert "Loaded endpoint plugin" not in (logs / "middleware.log").read_text()
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            stop(proc)


@pytest.fixture(scope="module")
def server(servers):
    return servers["middleware"]


def _client(url, key=KEY):
    return openai_client(url, key, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return _client(server)


def _completion(mix, **kw):
    body = {"model": "m", "prompt": "Today I", "max_tokens": 2, "temperature": 0, **kw}
    if mix is not None:
        body["vllm_xargs"] = {"emotion": mix}
    return body


def _assert_without_emokern_error(error: dict) -> None:
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == PARAM
    assert WITHOUT_EMOKERN in error["message"] and PARAM in error["message"]


@pytest.mark.parametrize("door", ["middleware", "plugin"])
def test_the_servers_answer_without_a_mix(servers, door):
    server = servers[door]
    status, answer = call(server + "/v1/completions", "POST", _completion(None), key=KEY)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    assert READINGS_FIELD not in answer  # no emokern: nothing added
    assert call(server + "/health")[0] == 200  # outside /v1: no key needed


@pytest.mark.parametrize("door", ["middleware", "plugin"])
@pytest.mark.parametrize("mix", ["joy=2", {"joy": 1.0}, "hope=1"])
def test_a_mix_for_an_engine_without_emokern_is_a_400_over_raw_http(servers, door, mix):
    """Any mix, valid for a bank or not, is refused before vLLM reads the request: completions
    and chat, streaming or not, through either way of adding the middleware."""
    server = servers[door]
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "vllm_xargs": {"emotion": mix}}
    for path, body in (("/v1/completions", _completion(mix)),
                       ("/v1/completions", _completion(mix, stream=True)),
                       ("/v1/chat/completions", chat),
                       ("/v1/chat/completions", {**chat, "stream": True})):
        status, answer = call(server + path, "POST", body, key=KEY)
        assert status == 400, (path, body, answer)
        _assert_without_emokern_error(answer["error"])


@pytest.mark.parametrize("door", ["middleware", "plugin"])
def test_a_mix_for_an_engine_without_emokern_is_a_400_with_the_openai_client(servers, door):
    import openai

    client = _client(servers[door])
    calls = {
        "completions": lambda stream: client.completions.create(
            model="m", prompt="Today I", max_tokens=2, stream=stream,
            extra_body={"vllm_xargs": {"emotion": "joy=2"}}),
        "chat": lambda stream: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            stream=stream, extra_body={"vllm_xargs": {"emotion": "sadness=1,joy=0.5"}}),
    }
    for door, create in calls.items():
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                result = create(stream)
                if stream:
                    list(result)
            assert info.value.status_code == 400, (door, stream)
            _assert_without_emokern_error(info.value.body)
    # The same client without a mix is served.
    plain = client.completions.create(model="m", prompt="Today I", max_tokens=2)
    assert plain.choices[0].finish_reason == "length"


def test_emotions_needs_the_api_key(server, client):
    import openai

    for authorization in (None, "Bearer wrong-key", f"Basic {KEY}", KEY):
        headers = {} if authorization is None else {"authorization": authorization}
        status, answer = call(server + "/v1/emotions", headers=headers)
        assert (status, answer) == (401, {"error": "Unauthorized"}), authorization
    wrong = client.with_options(api_key="wrong-key")
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.get("/emotions", cast_to=object)
    assert info.value.status_code == 401


@pytest.mark.parametrize("door", ["middleware", "plugin"])
def test_emotions_without_emokern_is_a_404(servers, door):
    import openai

    server, client = servers[door], _client(servers[door])
    status, answer = call(server + "/v1/emotions", key=KEY)
    assert status == 404
    error = answer["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404 and error["param"] is None
    assert "without emotion steering" in error["message"] and "emokern serve" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/emotions", cast_to=object)
    assert info.value.status_code == 404 and info.value.body["type"] == "NotFoundError"


def test_paths_the_middleware_does_not_own_are_vllm_404s(server):
    for method, path in (("GET", "/v1/emotions/joy"), ("POST", "/v1/emotions"),
                         ("GET", "/v1/emotion")):
        status, answer = call(server + path, method, {} if method == "POST" else None,
                               key=KEY)
        assert (status, answer) == (404, {"detail": "Not Found"}), (method, path)
        # vLLM's authentication guards them too
        assert call(server + path, method, {} if method == "POST" else None)[0] == 401


def test_the_api_key_comes_before_the_mix_check(server, client):
    """Without the key vLLM's authentication answers 401 (the middleware checks no mix for an
    unauthenticated client); with it the mix is refused; the server stays healthy."""
    import openai

    bad = _completion("hope=1")
    for key in (None, "wrong-key"):
        status, answer = call(server + "/v1/completions", "POST", bad, key=key)
        assert (status, answer) == (401, {"error": "Unauthorized"}), key
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong-key").completions.create(
            model="m", prompt="Today I", max_tokens=2,
            extra_body={"vllm_xargs": {"emotion": "hope=1"}})
    status, answer = call(server + "/v1/completions", "POST", bad, key=KEY)
    assert status == 400
    _assert_without_emokern_error(answer["error"])
    assert call(server + "/health")[0] == 200
    status, answer = call(server + "/v1/completions", "POST", _completion(None), key=KEY)
    assert status == 200
