"""Operators' presets and the steering key over HTTP, against ``emokern serve`` with the
``openai`` client: a preset steers exactly like its mix written out, an unknown preset is a
400 naming it, steering without the steering key is a 403 and with it a 200, a plain request
needs no key, ``GET /v1/emotions`` lists the presets (with the key).

One server for the module: ``emokern serve --preset ... --presets FILE --steering-api-key KEY``
(eager, small: this module is about the HTTP side). Run by ``make test-vllm``; skipped without
vLLM. Without vLLM: ``tests/test_serve_presets.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

pytestmark = [pytest.mark.slow, pytest.mark.model]

KEY = "emokern-steering-key"
START_TIMEOUT_S = 600
CALM = "joy=4,fear=1"
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers=None, timeout: float = 60):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``emokern serve`` with two presets (a flag and a file) and a steering key."""
    folder = tmp_path_factory.mktemp("presets-key")
    presets = folder / "presets.json"
    presets.write_text(json.dumps({"cheer": {"joy": 4}}))
    log = folder / "serve.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "emokern.cli", "serve", "--preset", f"calm={CALM}",
           "--presets", str(presets), "--steering-api-key", KEY,
           "--served-model-name", "m", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--seed", "0", "--disable-uvicorn-access-log",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("EMOKERN_STEERING_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"emokern serve exited ({proc.returncode}):\n"
                            + log.read_text()[-4000:])
            with contextlib.suppress(OSError):
                if _get(url + "/health", timeout=2)[0] == 200:
                    break
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail("emokern serve did not start:\n" + log.read_text()[-4000:])
            time.sleep(2)
        print(f"server up in {time.monotonic() - start:.0f} s")
        assert KEY not in log.read_text()  # the key is not on the logged command line
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _client(server, key):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=key, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def keyed(server):
    """A client that sends the steering key (``Authorization: Bearer``: vLLM has no key)."""
    return _client(server, KEY)


@pytest.fixture(scope="module")
def keyless(server):
    return _client(server, "not-the-key")


def _complete(client, mix, **kw):
    return client.completions.create(
        model="m", prompt="Today I went to the market and", max_tokens=MAX_TOKENS,
        temperature=0, extra_body=None if mix is None else {"vllm_xargs": {"emotion": mix}},
        **kw)


def test_a_preset_steers_like_its_mix_written_out(keyed):
    written = _complete(keyed, CALM)
    named = _complete(keyed, "calm")
    plain = _complete(keyed, None)
    assert named.choices[0].text == written.choices[0].text
    assert named.choices[0].text != plain.choices[0].text  # it steers
    readings = [[x for row in a.model_extra["emotion_readings"]["choices"][0]["mean"]
                 for x in row] for a in (named, written)]
    assert readings[0] == pytest.approx(readings[1], rel=1e-4, abs=1e-5)
    file_preset = _complete(keyed, "cheer")
    # vllm_xargs values are strings or numbers over HTTP: the object form goes as its JSON
    assert file_preset.choices[0].text == _complete(keyed, '{"joy": 4}').choices[0].text


def test_an_unknown_preset_is_a_400_naming_it(keyed):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        _complete(keyed, "stormy")
    error = caught.value.body
    assert "'stormy'" in error["message"] and "preset" in error["message"]


def test_steering_needs_the_steering_key(keyed, keyless):
    import openai

    for mix in ("calm", CALM):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            _complete(keyless, mix)
        assert caught.value.status_code == 403
        assert "EMOKERN_STEERING_API_KEY" in caught.value.body["message"]
    assert _complete(keyed, "calm").choices[0].text
    # the steering key in its own header works as well
    answer = _complete(keyless, "calm", extra_headers={"X-Emokern-Key": KEY})
    assert answer.choices[0].text == _complete(keyed, "calm").choices[0].text


def test_a_plain_request_needs_no_key(keyless):
    answer = _complete(keyless, None)
    assert answer.choices[0].text
    assert "emotion_readings" not in (answer.model_extra or {})  # readings: key holders only


def test_emotions_lists_the_presets_for_key_holders(server):
    status, body = _get(server + "/v1/emotions")
    assert status == 403 and body["error"]["type"] == "PermissionDeniedError"
    status, body = _get(server + "/v1/emotions", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["presets"] == {"cheer": "joy=4", "calm": CALM}
