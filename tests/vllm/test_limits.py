"""Bounded weights over HTTP, against ``emokern serve --max-weight 10 --max-level 3 --levels``
with the ``openai`` client: a push or level beyond the operator's limits (``rec`` included) and
a weight beyond float32 (text, object and JSON forms) are each a 400 naming
``vllm_xargs['emotion']``, the emotion, the value and the limit; nothing reaches the engine,
the server keeps serving, an in-limit request is answered with readings; ``GET /v1/emotions``
reports the limits.

One server for the module (eager, small: this module is about the front door). Run by ``make
test-vllm``; skipped without vLLM. Without vLLM: ``tests/test_mix_limits.py``.
"""

from __future__ import annotations

import sys

import pytest
from live_server import call, openai_client, running, server_env

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

pytestmark = [pytest.mark.slow, pytest.mark.model]

MAX_WEIGHT = 10.0
MAX_LEVEL = 3.0
FIELD = "vllm_xargs['emotion']"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``emokern serve`` with operator limits and levels on."""
    log = tmp_path_factory.mktemp("limits") / "serve.log"
    cmd = [sys.executable, "-m", "emokern.cli", "serve", "--max-weight", str(MAX_WEIGHT),
           "--max-level", str(MAX_LEVEL), "--levels",
           "--served-model-name", "m", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--seed", "0", "--disable-uvicorn-access-log"]
    with running(cmd, server_env(drop=("EMOKERN_STEERING_API_KEY",)), log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _complete(client, mix):
    return client.completions.create(
        model="m", prompt="Today I went to the market and", max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"emotion": mix}})


#: Mixes each door must refuse, and what the 400's message says besides the field.
REFUSED = [
    ("joy=10.5", "['joy']: push weight 10.5 is beyond this server's limit max_weight = 10 "
                 "(emokern serve --max-weight"),
    ("joy=1,sadness=-1e38", "['sadness']: push weight -1e+38 is beyond this server's limit "
                            "max_weight = 10"),
    ("fear=rec", "['fear']: push weight 12 ('rec': the recipe of 'fear') is beyond this "
                 "server's limit max_weight = 10"),
    ("anger<=-3.5", "['anger']: cap z = -3.5 is beyond this server's limit max_level = 3"),
    ("joy=1e40", "weight of 'joy' is 1e40, outside float32's finite range"),
    # vllm_xargs values are strings or numbers over HTTP: the object form goes as its JSON
    ('{"joy": 1e40}', "'joy' is 1e+40, outside float32's finite range"),
]


def test_beyond_the_limits_or_float32_is_a_400_naming_the_field(server, client):
    import openai

    for mix, message in REFUSED:
        with pytest.raises(openai.BadRequestError) as caught:
            _complete(client, mix)
        assert caught.value.status_code == 400
        text = caught.value.body["message"]
        assert text.startswith(f"emokern.vllm: {FIELD}") and message in text, (mix, text)
    assert call(server + "/health")[0] == 200


def test_within_the_limits_is_served(client):
    """At the limits exactly: a push of 10 and a level of -3 (readings come back)."""
    answer = _complete(client, f"joy={MAX_WEIGHT},sadness@-{MAX_LEVEL}")
    assert answer.choices[0].text and answer.choices[0].finish_reason in ("length", "stop")
    assert answer.model_extra["emotion_readings"]["choices"][0]["mean"]


def test_emotions_reports_the_limits(server):
    status, body = call(server + "/v1/emotions")
    assert status == 200
    assert (body["max_weight"], body["max_level"]) == (MAX_WEIGHT, MAX_LEVEL)
    assert body["recommended_weights"]["fear"] == 12.0  # beyond the limit: refused as 'rec'
