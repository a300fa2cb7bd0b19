"""Operators' presets and the steering key of ``emokern serve``, without vLLM: presets read from
``--preset``/``--presets``, checked against the bank at start (one error naming the preset),
resolved where a request's mix is parsed (:func:`emokern.vllm.config.check_mix`) and listed by
``GET /v1/emotions``; the steering key (``EMOKERN_STEERING_API_KEY``) checked by the middleware
on a plain ASGI app (403 for a steering request or ``/v1/emotions`` without it, plain requests
served, no readings without it). Over HTTP against a real server:
``tests/vllm/test_presets_key.py``."""

from __future__ import annotations

import json

import asgi_app
import pytest

from emokern.steering.mix import format_mix
from emokern.vllm import http, internals
from emokern.vllm.config import EmokernConfig, check_mix, check_presets
from emokern.vllm.http import KEY_ENV, READINGS_FIELD
from emokern.vllm.serve import read_presets, vllm_argv

KEY = "steer-123"
VLLM_KEY = "vllm-456"
PRESETS = {"calm": "joy=1,anger=-0.5", "happy": {"joy": 2}, "grim_2": "sadness=rec"}


def _config(presets=PRESETS, **settings) -> EmokernConfig:
    return EmokernConfig.from_additional_config({"emokern": {"presets": presets, **settings}})


def _argv(presets, **kw):
    return vllm_argv(**{"model": "/m", "bank": "default", "layers": "auto", "host": "h",
                        "port": 1, "extra": [], "cuda": True, "presets": presets, **kw})


# ----------------------------------------------------------------------------- presets


def test_read_presets_from_flags_and_a_file(tmp_path):
    path = tmp_path / "presets.json"
    path.write_text(json.dumps({"happy": {"joy": 2}, "grim": "sadness=1"}))
    presets = read_presets(["calm=joy=1,anger=-0.5", " cool =fear=-1"], str(path))
    assert presets == {"happy": {"joy": 2}, "grim": "sadness=1", "calm": "joy=1,anger=-0.5",
                       "cool": "fear=-1"}
    assert read_presets() == {}
    with pytest.raises(ValueError, match="NAME=MIX"):
        read_presets(["calm"])
    with pytest.raises(ValueError, match="'grim' is given twice"):
        read_presets(["grim=joy=1"], str(path))
    path.write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        read_presets(file=str(path))
    with pytest.raises(ValueError, match="--presets"):
        read_presets(file=str(tmp_path / "missing.json"))


def test_presets_reach_the_engine_config_in_any_grammar_form():
    argv = _argv(read_presets(["calm=joy=1,anger=-0.5"]) | {"happy": {"joy": 2}},
                 extra=["--additional-config", '{"emokern": {"presets": {"low": "fear=-1"}}}'])
    additional = json.loads(argv[argv.index("--additional-config") + 1])
    assert additional["emokern"]["presets"] == {"low": "fear=-1", "calm": "joy=1,anger=-0.5",
                                                "happy": {"joy": 2}}
    config = EmokernConfig.from_additional_config(additional)
    assert config.presets == (("low", "fear=-1"), ("calm", "joy=1,anger=-0.5"),
                              ("happy", "joy=2"))
    hash(config)  # the bank cache's key
    assert check_presets(config) == {"low": {"fear": -1.0}, "calm": {"joy": 1.0, "anger": -0.5},
                                     "happy": {"joy": 2.0}}
    plain = _argv(None)
    assert "presets" not in json.loads(plain[plain.index("--additional-config") + 1])["emokern"]


@pytest.mark.parametrize("presets, message", [
    ({"calm": "joyy=1"}, "preset 'calm' names unknown emotion 'joyy'"),
    ({"calm": "joy=="}, "preset 'calm': weight of 'joy' must be a number"),
    ({"calm": "anger<=0"}, "preset 'calm'.*without levels"),
    ({"calm": 5}, "preset 'calm' must be a mix"),
    ({"joy": "joy=1"}, "preset name 'joy' is an emotion of the bank"),
    ({"1calm": "joy=1"}, "preset name '1calm' must be an identifier"),
    ({"calm down": "joy=1"}, "preset name 'calm down' must be an identifier"),
    ({"none": "joy=1"}, "preset name 'none'"),
])
def test_a_bad_preset_stops_the_server_before_vllm_starts(presets, message):
    with pytest.raises(ValueError, match=message):
        _argv(presets)


def test_a_preset_with_a_level_needs_levels():
    argv = _argv({"calm": "joy=1,anger<=0"}, levels=True)
    config = EmokernConfig.from_additional_config(
        json.loads(argv[argv.index("--additional-config") + 1]))
    assert check_presets(config) == {"calm": {"joy": 1.0, "anger": {"max": 0.0}}}


def test_a_preset_is_resolved_where_the_mix_is_parsed():
    config = _config()
    assert check_mix({"emotion": "calm"}, config) == check_mix(
        {"emotion": "joy=1,anger=-0.5"}, config) == {"joy": 1.0, "anger": -0.5}
    assert check_mix({"emotion": " happy "}, config) == {"joy": 2.0}
    # rec resolved against the bank, as in a written-out mix
    assert check_mix({"emotion": "grim_2"}, config) == check_mix({"emotion": "sadness=rec"},
                                                                  config)
    assert check_mix({"emotion": "none"}, config) is None
    with pytest.raises(ValueError, match="'nope', not a mix and not a preset of this server "
                                         r"\(presets: \['calm', 'grim_2', 'happy'\]\)"):
        check_mix({"emotion": "nope"}, config)
    with pytest.raises(ValueError, match="bad term 'joy'"):  # an emotion alone: a bad term
        check_mix({"emotion": "joy"}, config)
    with pytest.raises(ValueError, match="presets: none"):
        check_mix({"emotion": "calm"}, _config({}))


# ----------------------------------------------------------------------- the middleware


def App(additional, api_key=None):
    """The stand-in app, answering 200 ``{"id": "cmpl-1"}``."""
    return asgi_app.App(additional, api_key=api_key, answer=asgi_app.json_answer({"id": "cmpl-1"}))


def exchange(app, method, path, body=None, headers=()):
    """``(status, JSON answer)`` of one exchange through the middleware."""
    status, _, answer = asgi_app.exchange(app, method, path, body, headers=headers)
    return status, json.loads(answer)


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def steering_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def vllm_key_check(monkeypatch):
    monkeypatch.setattr(internals, "api_key_ok", asgi_app.bearer_key_check)


def _completion(mix=None):
    body = {"model": "m", "prompt": "Hi"}
    if mix is not None:
        body["vllm_xargs"] = {"emotion": mix}
    return body


BEARER = (("authorization", f"Bearer {KEY}"),)
HEADER = (("x-emokern-key", KEY),)


def test_emotions_lists_the_presets_in_normal_form():
    status, body = exchange(App({"emokern": {"presets": PRESETS}}), "GET", "/v1/emotions")
    assert status == 200
    assert body["presets"] == {"calm": "joy=1,anger=-0.5", "happy": "joy=2",
                               "grim_2": format_mix(check_mix({"emotion": "sadness=rec"},
                                                              _config()))}
    assert exchange(App({"emokern": {}}), "GET", "/v1/emotions")[1]["presets"] == {}


def test_an_unknown_preset_is_a_400_naming_it():
    app = App({"emokern": {"presets": PRESETS}})
    status, body = exchange(app, "POST", "/v1/completions", _completion("stormy"))
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    assert "'stormy'" in body["error"]["message"] and "preset" in body["error"]["message"]
    assert app.received == []
    status, _ = exchange(app, "POST", "/v1/completions", _completion("calm"))
    assert status == 200 and app.received


def test_without_a_steering_key_everything_is_open():
    app = App({"emokern": {}})
    assert exchange(app, "POST", "/v1/completions", _completion("joy=1"))[0] == 200
    assert exchange(app, "GET", "/v1/emotions")[0] == 200


@pytest.mark.usefixtures("steering_key")
@pytest.mark.parametrize("mix", ["joy=1", {"joy": 1}, "calm", "nope"])
def test_steering_without_the_key_is_a_403(mix):
    app = App({"emokern": {"presets": PRESETS}})
    for headers in ((), (("authorization", "Bearer wrong"),), (("x-emokern-key", "wrong"),)):
        status, body = exchange(app, "POST", "/v1/completions", _completion(mix), headers)
        assert status == 403, headers
        error = body["error"]
        assert error["type"] == "PermissionDeniedError" and error["code"] == 403
        assert KEY_ENV in error["message"] and "steers" in error["message"]
    assert app.received == []


@pytest.mark.usefixtures("steering_key")
@pytest.mark.parametrize("headers", [BEARER, HEADER])
def test_steering_with_the_key_is_served_with_readings(headers):
    app = App({"emokern": {"presets": PRESETS}})
    status, body = exchange(app, "POST", "/v1/completions", _completion("calm"), headers)
    assert status == 200 and READINGS_FIELD in body and app.state.engine_client.rpc
    status, body = exchange(app, "POST", "/v1/completions", _completion("nope"), headers)
    assert status == 400  # the key comes first, then the mix


@pytest.mark.usefixtures("steering_key")
def test_plain_requests_need_no_key_and_get_no_readings():
    app = App({"emokern": {}})
    for mix in (None, "", {}):
        status, body = exchange(app, "POST", "/v1/completions", _completion(mix))
        assert status == 200 and body == {"id": "cmpl-1"}
    body = {"model": "m", "prompt": "Hi", "vllm_xargs": {"other": 1}}
    assert exchange(app, "POST", "/v1/completions", body)[0] == 200
    assert app.state.engine_client.rpc == []  # readings only for key holders
    assert READINGS_FIELD in exchange(app, "POST", "/v1/completions", _completion(), HEADER)[1]


@pytest.mark.usefixtures("steering_key")
def test_emotions_needs_the_steering_key():
    app = App({"emokern": {"presets": PRESETS}})
    status, body = exchange(app, "GET", "/v1/emotions")
    assert status == 403 and "GET /v1/emotions" in body["error"]["message"]
    assert exchange(app, "GET", "/v1/emotions", None, HEADER)[0] == 200
    assert exchange(app, "GET", "/v1/emotions", None, BEARER)[1]["presets"]["calm"] == \
        "joy=1,anger=-0.5"


@pytest.mark.usefixtures("steering_key", "vllm_key_check")
def test_with_vllms_key_too_the_steering_key_goes_in_its_own_header():
    app = App({"emokern": {}}, api_key=[VLLM_KEY])
    vllm = (("authorization", f"Bearer {VLLM_KEY}"),)
    # vLLM's check first: without its key, the middleware leaves the request to vLLM (401)
    assert exchange(app, "GET", "/v1/emotions", None, HEADER)[0] == 401
    assert exchange(app, "GET", "/v1/emotions", None, vllm)[0] == 403
    assert exchange(app, "GET", "/v1/emotions", None, vllm + HEADER)[0] == 200
    assert exchange(app, "POST", "/v1/completions", _completion("joy=1"), vllm)[0] == 403
    assert exchange(app, "POST", "/v1/completions", _completion("joy=1"), vllm + HEADER)[0] \
        == 200
    assert exchange(app, "POST", "/v1/completions", _completion(), vllm)[0] == 200


def test_serve_puts_the_steering_key_in_the_environment_only(monkeypatch):
    from emokern.vllm import serve as serve_module

    monkeypatch.setenv(KEY_ENV, "restored after the test")
    started = []
    monkeypatch.setattr(internals, "api_server_main",
                        lambda: lambda: started.append(http.os.environ.get(KEY_ENV)))
    assert serve_module.serve(["--model", "/m"], cuda=True, steering_key=KEY) == 0
    assert started == [KEY]
    with pytest.raises(ValueError, match="must not be empty"):
        serve_module.serve([], cuda=True, steering_key=" ")


def test_tensor_parallel_ranks_get_disjoint_cores():
    from emokern.vllm.serve import cpu_rank_binding

    assert cpu_rank_binding(2, [0, 1]) == "0|1"
    assert cpu_rank_binding(2, list(range(16))) == "0-7|8-15"
    assert cpu_rank_binding(2, [0, 2, 4, 6, 8]) == "0,2|4,6"
    assert cpu_rank_binding(1, [0, 1]) is None and cpu_rank_binding(4, [0, 1]) is None
