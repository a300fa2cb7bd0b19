"""Bounded weights at every door, without vLLM.

A weight or level that does not fit the op's float32 is one clear error everywhere: the Python
API (``emokern.steer``, ``Steerer.set_mix``), ``emokern generate`` (exit code 2 before the model
loads, no traceback) and a vLLM engine's front door (:func:`emokern.vllm.config.check_mix`, a
400 through the HTTP middleware). A serving engine also has operator limits, ``max_weight``
(``|push weight|``) and ``max_level`` (``|z|`` of a level, cap or floor):
``additional_config["emokern"]`` or ``emokern serve --max-weight/--max-level``, by default
generous multiples of the bank's recipes (:func:`emokern.vllm.config.default_limits`, which
always admit the recipes), applied to requests, presets and ``rec``, reported by
``GET /v1/emotions``. Over HTTP against a real server: ``tests/vllm/test_limits.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from asgi_app import App, exchange
from helpers import random_bank
from steering_helpers import hook_counts

from emokern import EmotionBank
from emokern.cli import build_parser, main
from emokern.steering import steer
from emokern.steering.mix import FLOAT32_MAX, check_limits
from emokern.vllm.config import (
    LIMIT_FACTOR,
    MIN_MAX_LEVEL,
    EmokernConfig,
    check_mix,
    check_presets,
    default_limits,
    describe,
    limits_of,
)
from emokern.vllm.http import KEY_ENV
from emokern.vllm.serve import vllm_argv

FIELD = "vllm_xargs['emotion']"


def _config(**settings) -> EmokernConfig:
    return EmokernConfig.from_additional_config({"emokern": settings})


def _check(mix, config):
    return check_mix({"emotion": mix}, config, argument=FIELD)


# ------------------------------------------------------------------------- float32's range


#: Every form a mix beyond float32 comes in, and what the error says (emotion and value).
BEYOND_FLOAT32 = [
    ("joy=1e40", r"weight of 'joy' is 1e40, outside float32's finite range"),
    ("joy=-1e40", r"weight of 'joy' is -1e40, outside float32's finite range"),
    ({"joy": 1e40}, r"\['joy'\] is 1e\+40, outside float32's finite range"),
    ('{"joy": 1e40}', r"'joy' is 1e\+40, outside float32's finite range"),
    ({"joy": {"weight": 2, "max": -1e39}}, r"\['joy'\]\['max'\] is -1e\+39, outside float32"),
    ("sadness@1e39", r"level of 'sadness' is 1e39, outside float32's finite range"),
]


@pytest.mark.parametrize("mix, message", BEYOND_FLOAT32)
def test_beyond_float32_is_one_error_at_the_vllm_door(mix, message):
    """Whatever the limits (the largest float32 as the operator's), even with levels on."""
    for config in (_config(), _config(levels=True, max_weight=FLOAT32_MAX,
                                      max_level=FLOAT32_MAX)):
        with pytest.raises(ValueError, match=message) as caught:
            _check(mix, config)
        assert str(caught.value).startswith(f"emokern.vllm: {FIELD}")


@pytest.mark.parametrize("mix, message", BEYOND_FLOAT32)
def test_beyond_float32_is_one_error_in_the_python_api(small_llama, mix, message):
    """``emokern.steer`` refuses before installing anything; ``set_mix`` before changing
    anything (the bank is calibrated, so a level reaches the float32 check too)."""
    model, _ = small_llama
    bank = random_bank(model)
    bank = bank.replace(neutral_mean=torch.zeros(bank.n_layers, bank.n_emotions),
                        neutral_std=torch.ones(bank.n_layers, bank.n_emotions))
    before = hook_counts(model)
    with pytest.raises(ValueError, match=message) as caught:
        steer(model, bank, [{"fear": 1.0}, mix], layers=[1])
    assert str(caught.value).startswith("emokern.steer: mix[1]")
    assert hook_counts(model) == before
    with steer(model, bank, [{"fear": 1.0}, {}], layers=[1]) as steerer:
        weights = steerer.weights.clone()
        with pytest.raises(ValueError, match=message):
            steerer.set_mix([{}, mix])
        assert torch.equal(steerer.weights, weights)
    # the library sets no limit of its own: a large weight that fits float32 is taken
    with steer(model, bank, [{"fear": -1e38}], layers=[1]) as steerer:
        assert steerer.weights[0, bank.names.index("fear")].item() == pytest.approx(-1e38)


@pytest.mark.parametrize("mix, message", [
    ("joy=1e40", "weight of 'joy' is 1e40, outside float32's finite range"),
    ('{"joy": 1e40}', "'joy' is 1e+40, outside float32's finite range"),
    ("joy=1,sadness@-1e39", "level of 'sadness' is -1e39, outside float32's finite range"),
])
def test_generate_refuses_beyond_float32_before_the_model_loads(capsys, monkeypatch, mix,
                                                                message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the mix was checked")

    monkeypatch.setattr("emokern.models.load_model", no_model)
    assert main(["generate", "--prompt", "Hi", "--mix", "joy=1", "--mix", mix]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern generate: error:") and message in err, err
    assert err.count("\n") == 1  # one line
    assert main(["generate", "--prompt", "Hi", "--target", "joy=1e40"]) == 2
    assert "outside float32's finite range" in capsys.readouterr().err


@pytest.mark.parametrize("mix", ["joy=1e40", '{"joy": -1e39}'])
def test_export_refuses_beyond_float32_and_writes_nothing(capsys, tmp_path, mix):
    out = tmp_path / "x.gguf"
    assert main(["export", "--mix", mix, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern export: error:") and "outside float32's finite range" in err
    assert not out.exists()


def test_export_refuses_a_vector_that_overflows_and_writes_nothing(capsys, tmp_path):
    """A weight that fits float32 times vector entries above 1 does not: one error, no file
    (the summed vector would be inf, a file the reader refuses)."""
    out = tmp_path / "x.gguf"
    assert main(["export", "--mix", "joy=-3.4e38", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern export: error:") and "overflows float32" in err, err
    assert "layer" in err and not out.exists()


def test_generate_beyond_float32_from_a_shell():
    """The command itself: exit code 2, one line on stderr, no traceback, nothing printed."""
    done = subprocess.run([sys.executable, "-m", "emokern.cli", "generate", "--prompt", "Hi",
                           "--mix", "joy=-1e40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "emokern generate: error: parse_mix: weight of 'joy' is -1e40, outside float32's finite "
        "range [-3.403e+38, 3.403e+38] (the op reads float32 weights)"]


# ------------------------------------------------------------------------- default limits


@pytest.mark.parametrize("method", ["ev", "concept"])
def test_default_limits_admit_every_recipe_of_a_shipped_bank(method):
    bank = EmotionBank.load_default(method)
    max_weight, max_level = default_limits(bank)
    assert max_weight == LIMIT_FACTOR * max(
        [bank.default_weight] + [abs(bank.recommended_weight(n)) for n in bank.names])
    recipes = [bank.recommended(n) for n in bank.names]
    reached = [r.measured.get("reading", 0.0) for r in recipes] + [
        r.strength for r in recipes if r.mode == "level"]   # the concept bank's fear: z = 16
    assert max_level == max(MIN_MAX_LEVEL, LIMIT_FACTOR * max(abs(z) for z in reached))
    config = _config(bank=method, levels=True)
    assert limits_of(config) == (max_weight, max_level)
    every = ",".join(f"{n}=rec" for n in bank.names)
    assert _check(every, config) is not None  # every recipe at once
    # a push at the limit passes, just beyond it is refused
    assert _check(f"joy={max_weight}", config) == {"joy": max_weight}
    assert _check(f"joy=-{max_weight}", config) == {"joy": -max_weight}
    with pytest.raises(ValueError, match=rf"{re.escape(FIELD)}\['joy'\]: push weight "
                                         rf"{max_weight * 1.01:g} is beyond this server's limit "
                                         rf"max_weight = {max_weight:g} \(emokern serve "
                                         rf"--max-weight"):
        _check(f"joy={max_weight * 1.01:g}", config)
    assert _check(f"sadness@{max_level}", config) == {"sadness": {"level": max_level}}
    with pytest.raises(ValueError, match=rf"\['sadness'\]: level z = -{max_level + 1:g} is "
                                         rf"beyond this server's limit max_level"):
        _check(f"sadness@-{max_level + 1:g}", config)


def test_default_limits_follow_a_banks_own_recipes(small_llama, tmp_path):
    """A bank with a large push and a level recipe: its defaults are 4 x those; without
    measurements the level limit is the floor (10)."""
    model, _ = small_llama
    bank = random_bank(model, default_weight=2.0, recommended_weights={
        "joy": {"weight": 30.0}, "fear": {"mode": "level", "level": -5.0}})
    bank = bank.replace(neutral_mean=torch.zeros(bank.n_layers, bank.n_emotions),
                        neutral_std=torch.ones(bank.n_layers, bank.n_emotions))
    assert default_limits(bank) == (120.0, 20.0)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    config = _config(bank=str(path), levels=True)
    assert _check("joy=rec,fear=rec", config) == {"joy": 30.0, "fear": {"level": -5.0}}
    plain = random_bank(model, default_weight=0.5)
    assert default_limits(plain) == (2.0, MIN_MAX_LEVEL)


# ------------------------------------------------------------------------ operator limits


def test_operator_limits_refuse_each_kind_of_edit_naming_it():
    config = _config(levels=True, max_weight=3, max_level=2)
    assert (config.max_weight, config.max_level) == (3.0, 2.0) and limits_of(config) == (3, 2)
    hash(config)  # the bank cache's key
    assert _check("joy=3,sadness=-3,anger@2,fear<=-2,disgust>=2", config) == {
        "joy": 3.0, "sadness": -3.0, "anger": {"level": 2.0}, "fear": {"max": -2.0},
        "disgust": {"min": 2.0}}
    for mix, message in [
            ("joy=1,sadness=-3.5", r"\['sadness'\]: push weight -3.5 is beyond this server's "
                                   r"limit max_weight = 3 \(emokern serve --max-weight, "
                                   r"additional_config\['emokern'\]\['max_weight'\]\)"),
            ({"joy": {"weight": 1, "max": 2.5}}, r"\['joy'\]: cap z = 2.5 is beyond this "
                                                 r"server's limit max_level = 2 \(emokern serve "
                                                 r"--max-level"),
            ("fear>=-7", r"\['fear'\]: floor z = -7 is beyond .* max_level = 2"),
            ('{"anger": {"level": 1e30}}', r"\['anger'\]: level z = 1e\+30 is beyond"),
            ("joy=-1e38", r"\['joy'\]: push weight -1e\+38 is beyond .* max_weight = 3"),
            ("fear=rec", r"\['fear'\]: push weight 12 \('rec': the recipe of 'fear'\) is "
                         r"beyond this server's limit max_weight = 3")]:
        with pytest.raises(ValueError, match=message) as caught:
            _check(mix, config)
        assert str(caught.value).startswith(f"emokern.vllm: {FIELD}[")
    # without vllm_xargs: the engine's own argument name (LLM(..., extra_args=...))
    with pytest.raises(ValueError, match=r"^emokern.vllm: extra_args\['emotion'\]\['joy'\]"):
        check_mix({"emotion": "joy=4"}, config)
    # a level on an engine without levels says so first, whatever its size
    with pytest.raises(ValueError, match="without levels"):
        _check("sadness@99", _config(max_level=2))


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "must be a positive number within float32's range"),
    (-1, ValueError, "must be a positive number"),
    (float("inf"), ValueError, "got inf"),
    (1e39, ValueError, r"0 < {key} <= 3.403e\+38"),
    (True, TypeError, "got bool True"),
    ("5", TypeError, "got str '5'"),
])
def test_bad_limits_stop_the_engine_at_start(value, error, message):
    for key in ("max_weight", "max_level"):
        with pytest.raises(error, match=rf"additional_config\['emokern'\]\['{key}'\] .*"
                                        + message.format(key=key)):
            _config(**{key: value})
    assert _config(max_weight=None).max_weight is None  # null: the bank's default


def test_limits_apply_to_presets_at_start():
    config = _config(max_weight=2, presets={"calm": "joy=1,anger=-2"})
    assert check_presets(config) == {"calm": {"joy": 1.0, "anger": -2.0}}
    assert _check("calm", config) == {"joy": 1.0, "anger": -2.0}
    with pytest.raises(ValueError, match=r"preset 'calm'\['anger'\]: push weight -2.5 is "
                                         r"beyond this server's limit max_weight = 2"):
        check_presets(_config(max_weight=2, presets={"calm": "joy=1,anger=-2.5"}))
    with pytest.raises(ValueError, match=r"preset 'grim'\['sadness'\]: push weight 8 \('rec'"):
        check_presets(_config(max_weight=2, presets={"grim": "sadness=rec"}))


def _argv(**kw):
    argv = vllm_argv(**{"model": "/m", "bank": "default", "layers": "auto", "host": "h",
                        "port": 1, "extra": [], "cuda": True, **kw})
    return json.loads(argv[argv.index("--additional-config") + 1])["emokern"]


def test_serve_flags_reach_the_engine_config():
    args = build_parser().parse_args(["serve", "--max-weight", "5", "--max-level", "2.5"])
    assert (args.max_weight, args.max_level) == (5.0, 2.5)
    plain = build_parser().parse_args(["serve"])
    assert (plain.max_weight, plain.max_level) == (None, None)
    settings = _argv(max_weight=5.0, max_level=2.5)
    assert settings["max_weight"] == 5.0 and settings["max_level"] == 2.5
    assert "max_weight" not in _argv() and "max_level" not in _argv()
    # the flags replace a limit of --additional-config; a limit given there alone is kept
    extra = ["--additional-config", '{"emokern": {"max_weight": 9, "max_level": 4}}']
    assert _argv(extra=extra, max_weight=5.0) == {
        "max_weight": 5.0, "max_level": 4, "bank": "default", "layers": "auto",
        "monitor": True}
    with pytest.raises(ValueError, match=r"\['max_level'\] must be a positive number"):
        _argv(max_level=0.0)
    with pytest.raises(ValueError, match=r"\['max_weight'\] must be a positive number"):
        _argv(max_weight=float("nan"))
    with pytest.raises(ValueError, match=r"preset 'loud'\['joy'\]: push weight 6 is beyond"):
        _argv(max_weight=5.0, presets={"loud": "joy=6"})


# ------------------------------------------------------------------ the HTTP middleware


@pytest.fixture
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.mark.usefixtures("_no_key")
def test_the_middleware_answers_400_and_emotions_reports_the_limits():
    app = App({"emokern": {"max_weight": 5, "max_level": 2.5}})
    for mix, message in (("joy=6", "push weight 6 is beyond this server's limit max_weight = 5"),
                         ("joy=1e40", "outside float32's finite range"),
                         ('{"joy": 1e40}', "outside float32's finite range")):
        body = {"model": "m", "prompt": "Hi", "vllm_xargs": {"emotion": mix}}
        status, _, raw = exchange(app, "POST", "/v1/completions", body)
        answer = json.loads(raw)
        assert status == 400 and answer["error"]["type"] == "BadRequestError"
        assert FIELD in answer["error"]["message"] and message in answer["error"]["message"]
    assert app.received == []  # nothing reached vLLM
    body = {"model": "m", "prompt": "Hi", "vllm_xargs": {"emotion": "joy=5"}}
    assert exchange(app, "POST", "/v1/completions", body)[0] == 200
    status, _, raw = exchange(app, "GET", "/v1/emotions")
    info = json.loads(raw)
    assert status == 200 and (info["max_weight"], info["max_level"]) == (5.0, 2.5)
    default = json.loads(exchange(App({"emokern": {}}), "GET", "/v1/emotions")[2])
    assert (default["max_weight"], default["max_level"]) == default_limits(
        EmotionBank.load_default())
    assert "max_weight" in default["mix"]["limits"]


def test_describe_reports_the_limits_in_force():
    info = describe(_config(max_level=3), 30)
    assert info["max_level"] == 3.0
    assert info["max_weight"] == default_limits(EmotionBank.load_default())[0]


def test_check_limits_needs_rec_resolved():
    with pytest.raises(ValueError, match=r"mix\['joy'\] is 'rec', unresolved"):
        check_limits({"joy": "rec"}, max_weight=1.0)
    check_limits({"joy": 1e30, "fear": {"level": -1e30}})  # no limits: nothing to refuse
