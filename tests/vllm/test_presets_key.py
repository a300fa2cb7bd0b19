"""Operators' presets and the steering key over HTTP, against ``emokern serve`` with the
``openai`` client: a preset steers exactly like its mix written out, an unknown preset is a
400 naming it, steering without the steering key is a 403 and with it a 200, a plain request
needs no key, ``GET /v1/emotions`` lists the presets (with the key).

One server for the module: ``emokern serve --preset ... --presets FILE --steering-api-key KEY``
(eager, small: this module is about the HTTP side). Run by ``make test-vllm``; skipped without
vLLM. Without vLLM: ``tests/test_serve_presets.py``.
"""

from __future__ import annotations

import json
import sys

import pytest
from live_server import call, openai_client, running, server_env

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

pytestmark = [pytest.mark.slow, pytest.mark.model]

KEY = "emokern-steering-key"
CALM = "joy=4,fear=1"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``emokern serve`` with two presets (a flag and a file) and a steering key."""
    folder = tmp_path_factory.mktemp("presets-key")
    presets = folder / "presets.json"
    presets.write_text(json.dumps({"cheer": {"joy": 4}}))
    log = folder / "serve.log"
    cmd = [sys.executable, "-m", "emokern.cli", "serve", "--preset", f"calm={CALM}",
           "--presets", str(presets), "--steering-api-key", KEY,
           "--served-model-name", "m", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--seed", "0", "--disable-uvicorn-access-log"]
    with running(cmd, server_env(drop=("EMOKERN_STEERING_API_KEY",)), log) as url:
        assert KEY not in log.read_text()  # the key is not on the logged command line
        yield url


@pytest.fixture(scope="module")
def keyed(server):
    """A client that sends the steering key (``Authorization: Bearer``: vLLM has no key)."""
    return openai_client(server, KEY)


@pytest.fixture(scope="module")
def keyless(server):
    return openai_client(server, "not-the-key")


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
    status, body = call(server + "/v1/emotions")
    assert status == 403 and body["error"]["type"] == "PermissionDeniedError"
    status, body = call(server + "/v1/emotions", key=KEY)
    assert status == 200 and body["presets"] == {"cheer": "joy=4", "calm": CALM}
