"""The plugin's Prometheus numbers (:mod:`emokern.vllm.metrics`) without vLLM: the reason of
each refusal (from the real messages of ``check_mix``), the kinds of each accepted mix, what
the HTTP middleware counts and when (run as a plain ASGI app with the stand-ins of
``asgi_app``), the workers' slot counts, and — where prometheus_client is installed (it comes
with vLLM) — the metrics as ``/metrics`` prints them. Against a live server:
``tests/vllm/test_metrics.py``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from asgi_app import App, exchange, json_answer

from emokern.vllm import metrics, plugin
from emokern.vllm.config import EXTRA_KEY, EmokernConfig, check_mix
from emokern.vllm.http import KEY_ENV
from emokern.vllm.slots import SlotTable

PLAIN = EmokernConfig()
LEVELS = EmokernConfig(levels=True)
PRESETS = EmokernConfig(levels=True, presets=(("calm", "joy=1,anger<=0.5"), ("tame", "fear=rec")))


def _refusal(mix, config):
    with pytest.raises((TypeError, ValueError)) as caught:
        check_mix({EXTRA_KEY: mix}, config)
    return str(caught.value)


# ------------------------------------------------------------------------- reasons and kinds


@pytest.mark.parametrize("mix,config,reason", [
    ("joy=abc", PLAIN, "malformed"), ("joy", PLAIN, "malformed"), ("{joy: 1", PLAIN, "malformed"),
    ("joy=1,joy=2", PLAIN, "malformed"), (3, PLAIN, "malformed"),
    ({"joy": {"speed": 1}}, PLAIN, "malformed"), ("joy@1,joy<=2", LEVELS, "malformed"),
    ("joy>=2,joy<=1", LEVELS, "malformed"),
    ("hope=1", PLAIN, "unknown_emotion"), ('{"hope": 1}', PLAIN, "unknown_emotion"),
    ("stormy", PRESETS, "unknown_preset"), ("stormy", PLAIN, "unknown_preset"),
    ("joy=nan", PLAIN, "out_of_range"), ("joy=inf", PLAIN, "out_of_range"),
    ("joy=1e39", PLAIN, "out_of_range"), ({"joy": float("-inf")}, PLAIN, "out_of_range"),
    ("joy<=1e38", EmokernConfig(levels=True, max_level=3e38), "out_of_range"),
    ("joy<=1e38", LEVELS, "over_limit"), ("joy=1000", PLAIN, "over_limit"),
    ("anger=rec", EmokernConfig(max_weight=1.0), "over_limit"),
    ("joy@1", PLAIN, "levels_off"), ("anger<=0.5", PLAIN, "levels_off"),
    ("fear=erase", PLAIN, "levels_off"), ("joy=1,sadness>=0", PLAIN, "levels_off"),
    ("joy=1", None, "no_emokern"), ("calm", None, "no_emokern"),
])
def test_each_refusal_has_its_reason(mix, config, reason):
    assert metrics.reject_reason(_refusal(mix, config)) == reason


def test_every_reason_is_a_known_label():
    assert {r for _, r in metrics._REASON_PHRASES} | {"malformed", "forbidden"} \
        == set(metrics.REASONS)


@pytest.mark.parametrize("mix,config,kinds", [
    ("joy=2", PLAIN, ("push",)),
    ("joy=2,fear=-0.5", PLAIN, ("push",)),
    ({"joy": 1.5}, PLAIN, ("push",)),
    ("sadness@1.5", LEVELS, ("level",)),
    ("fear=erase", LEVELS, ("erase",)),
    ("fear@0", LEVELS, ("erase",)),  # erase is a level at z = 0, however written
    ("anger<=0.5", LEVELS, ("cap",)),
    ("joy>=1", LEVELS, ("floor",)),
    ("joy=2,joy<=3,sadness@1,fear=erase,anger>=-1", LEVELS,
     ("push", "level", "erase", "cap", "floor")),
    ("anger=rec", PLAIN, ("push", "rec")),  # the default bank's recipes are pushes
    ("joy[generated]=2,fear[12]<=1", LEVELS, ("push", "cap", "scope")),
    ('{"anger": {"weight": "rec", "max": 1}}', LEVELS, ("push", "cap", "rec")),
    ("calm", PRESETS, ("push", "cap", "preset")),
    ("  tame ", PRESETS, ("push", "rec", "preset")),
    ("joy=0", PLAIN, ()),  # all zeros: unsteered
    ("", PLAIN, ()), ("none", PLAIN, ()), (None, PLAIN, ()),
])
def test_the_kinds_of_an_accepted_mix(mix, config, kinds):
    normal = check_mix({EXTRA_KEY: mix}, config)
    assert metrics.edit_kinds(mix, normal, config.presets) == kinds


# ---------------------------------------------------------------- what the middleware counts


@pytest.fixture
def recorded(monkeypatch):
    """What the middleware reports, call by call (the recording functions replaced)."""
    calls = []
    for name in ("record_steered", "record_rejected", "record_readings", "record_slots"):
        monkeypatch.setattr(metrics, name,
                            lambda *args, _name=name: calls.append((_name, *args)))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return calls


def _post(app, mix, path="/v1/completions", **fields):
    body = {"prompt": "hi", **fields}
    if mix is not ...:
        body["vllm_xargs"] = {EXTRA_KEY: mix}
    return exchange(app, "POST", path, body)[0]


def test_a_steered_request_counts_once_vllm_answers_it(recorded):
    app = App({"emokern": {"levels": True, "presets": {"calm": "joy=1,anger<=0.5"}}})
    assert _post(app, "joy=2,fear=erase") == 200
    assert _post(app, "calm", path="/v1/chat/completions") == 200
    assert _post(app, "anger=rec", path="/v1/responses") == 200
    assert _post(app, "joy=1", path="/v1/messages") == 200
    assert _post(app, "joy=1", path="/v1/chat/completions/render") == 200  # generates nothing
    assert recorded == [("record_steered", ("push", "erase")),
                        ("record_steered", ("push", "cap", "preset")),
                        ("record_steered", ("push", "rec")),
                        ("record_steered", ("push",))]


def test_unsteered_and_refused_by_vllm_are_not_steered(recorded):
    app = App({"emokern": {}})
    for mix in (..., None, "", "joy=0", "none"):
        assert _post(app, mix) == 200
    assert recorded == []
    refused = App({"emokern": {}}, answer=json_answer({"error": {"code": 400}}, status=400))
    assert _post(refused, "joy=2") == 400  # vLLM refused it for another reason: not steered
    assert recorded == []


def test_each_refused_mix_counts_its_reason(recorded, monkeypatch):
    app = App({"emokern": {}})
    for mix in ("joy=abc", "hope=1", "joy=inf", "joy@1", "stormy"):
        assert _post(app, mix) == 400
    assert _post(App(None), "joy=1") == 400
    monkeypatch.setenv(KEY_ENV, "secret")
    assert _post(app, "joy=1") == 403
    assert _post(app, None) == 200  # no mix: served without the key, and nothing counted
    assert recorded == [("record_rejected", r) for r in (
        "malformed", "unknown_emotion", "out_of_range", "levels_off", "unknown_preset",
        "no_emokern", "forbidden")]
    assert app.received == [("/v1/completions", json.dumps(
        {"prompt": "hi", "vllm_xargs": {EXTRA_KEY: None}}).encode())]


def _reading(joy, fear):
    return {"layers": [3], "names": ["joy", "fear"], "standardized": True,
            "readings": {"joy": joy, "fear": fear}, "mean": [[joy, fear]],
            "last": [[joy, fear]], "count": 3, "prompt_mean": [[0.0, 0.0]], "prompt_count": 4}


def test_each_returned_choice_records_its_readings(recorded):
    readings = {"cmpl-7-0": _reading(1.5, None), "1_cmpl-7-0": _reading(-0.25, 2.0),
                "other-0": _reading(9.0, 9.0)}  # not this response's: not returned, not counted
    app = App({"emokern": {}}, readings=readings,
              answer=json_answer({"id": "cmpl-7", "choices": [{"index": 0}, {"index": 1}]}))
    assert _post(app, "joy=1", n=2) == 200
    assert recorded == [("record_readings", {"joy": 1.5, "fear": None}),
                        ("record_readings", {"joy": -0.25, "fear": 2.0}),
                        ("record_steered", ("push",))]
    recorded.clear()
    app = App({"emokern": {"monitor": False}}, readings=readings,
              answer=json_answer({"id": "cmpl-7", "choices": [{"index": 0}]}))
    assert _post(app, None) == 200  # no readings returned: none counted
    assert recorded == []


# -------------------------------------------------------------------- slots at each scrape


class SlotsApp(App):
    """The stand-in app whose engine answers ``collective_rpc("emokern_slots")`` with
    ``answers`` (one per worker), or raises it when it is an exception."""

    def __init__(self, additional, answers):
        super().__init__(additional, answer=json_answer({"vllm": "metrics"}))

        async def collective_rpc(method, args=()):
            self.state.engine_client.rpc.append((method, args))
            if isinstance(answers, Exception):
                raise answers
            return answers

        self.state.engine_client.collective_rpc = collective_rpc


def test_a_scrape_asks_the_workers_first(recorded):
    app = SlotsApp({"emokern": {}}, [{"in_use": 3, "capacity": 8}, {"in_use": 3, "capacity": 8}])
    for path in ("/metrics", "/metrics/"):
        status, _, body = exchange(app, "GET", path)
        assert (status, json.loads(body)) == (200, {"vllm": "metrics"})  # vLLM's answer
    assert recorded == [("record_slots", 3, 8)] * 2
    assert app.state.engine_client.rpc == [("emokern_slots", ())] * 2
    assert [p for p, _ in app.received] == ["/metrics", "/metrics/"]


def test_a_scrape_without_emokern_or_an_answer(recorded):
    app = SlotsApp(None, [None])
    assert exchange(app, "GET", "/metrics")[0] == 200
    assert recorded == [] and app.state.engine_client.rpc == []  # not asked
    app = SlotsApp({"emokern": {}}, RuntimeError("engine dead"))
    assert exchange(app, "GET", "/metrics")[0] == 200  # vLLM's metrics still go out
    assert len(recorded) == 1 and all(math.isnan(x) for x in recorded[0][1:])


def test_the_workers_count_requests_holding_slots():
    table = SlotTable(n_layers=2, n_emotions=3, max_requests=4, max_tokens=16)
    worker = SimpleNamespace(model_runner=SimpleNamespace(_emokern_steering=SimpleNamespace(
        table=table)))
    assert plugin._worker_slots(worker) == {"in_use": 0, "capacity": 4}
    table.add("a", torch.ones(3))
    table.add("b", None)  # unsteered, not read: no slots
    table.add("c", None, read=True)  # unsteered and read: slots
    assert plugin._worker_slots(worker) == {"in_use": 2, "capacity": 4}
    table.release("a")
    table.release("b")
    assert (table.in_use, table.capacity) == (1, 4)
    table.release("c")
    assert table.in_use == 0
    assert plugin._worker_slots(SimpleNamespace(model_runner=None)) is None


# ------------------------------------------------------------------- the Prometheus side


def test_the_modules_import_neither_vllm_nor_prometheus_client():
    code = ("import sys, emokern, emokern.vllm.metrics, emokern.vllm.http, emokern.vllm.plugin;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'prometheus_client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_the_metrics_as_prometheus_prints_them(monkeypatch):
    prometheus_client = pytest.importorskip(
        "prometheus_client", reason="prometheus_client comes with vLLM (the vLLM venv)")
    registry = prometheus_client.CollectorRegistry()
    made = metrics.Metrics(registry)
    monkeypatch.setattr(metrics, "current", lambda: made)
    value = registry.get_sample_value
    for kind in metrics.KINDS:  # every label exists from the start
        assert value("emokern_steered_requests_total", {"kind": kind}) == 0
    for reason in metrics.REASONS:
        assert value("emokern_rejected_mixes_total", {"reason": reason}) == 0
    metrics.record_steered(("push", "cap", "preset"))
    metrics.record_steered(("push",))
    metrics.record_rejected("unknown_emotion")
    metrics.record_readings({"joy": 1.5, "fear": None})
    metrics.record_readings({"joy": -0.25, "fear": float("nan")})
    metrics.record_slots(2, 8)
    assert value("emokern_steered_requests_total", {"kind": "push"}) == 2
    assert value("emokern_steered_requests_total", {"kind": "cap"}) == 1
    assert value("emokern_steered_requests_total", {"kind": "level"}) == 0
    assert value("emokern_rejected_mixes_total", {"reason": "unknown_emotion"}) == 1
    assert value("emokern_reading_count", {"emotion": "joy"}) == 2
    # buckets below 0: prometheus_client leaves the sum out (OpenMetrics), the buckets stay
    assert value("emokern_reading_sum", {"emotion": "joy"}) is None
    assert value("emokern_reading_bucket", {"emotion": "joy", "le": "-0.5"}) == 0
    assert value("emokern_reading_bucket", {"emotion": "joy", "le": "0.0"}) == 1
    assert value("emokern_reading_bucket", {"emotion": "joy", "le": "2.0"}) == 2
    assert value("emokern_reading_count", {"emotion": "fear"}) is None  # never a number
    assert value("emokern_slots_in_use") == 2 and value("emokern_slots_capacity") == 8
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE emokern_steered_requests_total counter" in text
    assert "# TYPE emokern_reading histogram" in text


def test_one_set_of_metrics_per_process():
    pytest.importorskip("prometheus_client",
                        reason="prometheus_client comes with vLLM (the vLLM venv)")
    from prometheus_client import REGISTRY

    assert metrics.current() is metrics.current()
    assert REGISTRY.get_sample_value("emokern_slots_capacity") is not None


_API_SERVER = """
import sys
from emokern.vllm import metrics
metrics.record_steered(("push",))
metrics.record_rejected("malformed")
metrics.record_readings({"joy": float(sys.argv[1])})
metrics.record_slots(int(sys.argv[1]), 8)
"""

_MERGED = """
import json, sys
from prometheus_client import CollectorRegistry, multiprocess
registry = CollectorRegistry()  # what vLLM's /metrics serves in multiprocess mode
multiprocess.MultiProcessCollector(registry, path=sys.argv[1])
print(json.dumps({s.name + json.dumps(s.labels, sort_keys=True): s.value
                  for m in registry.collect() for s in m.samples}))
"""


def test_several_api_servers_add_up(tmp_path):
    """With ``--api-server-count`` > 1 vLLM runs prometheus_client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``) and serves the merged values: two API-server processes
    count into it, the gauges show the latest scrape's refresh."""
    pytest.importorskip("prometheus_client",
                        reason="prometheus_client comes with vLLM (the vLLM venv)")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for in_use in (1, 3):  # the second process refreshes the gauges last
        subprocess.run([sys.executable, "-c", _API_SERVER, str(in_use)], env=env, check=True)
    out = subprocess.run([sys.executable, "-c", _MERGED, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    values = json.loads(out.stdout)
    assert values['emokern_steered_requests_total{"kind": "push"}'] == 2
    assert values['emokern_steered_requests_total{"kind": "level"}'] == 0
    assert values['emokern_rejected_mixes_total{"reason": "malformed"}'] == 2
    assert values['emokern_reading_count{"emotion": "joy"}'] == 2
    assert values['emokern_reading_bucket{"emotion": "joy", "le": "2.0"}'] == 1
    assert values["emokern_slots_in_use{}"] == 3 and values["emokern_slots_capacity{}"] == 8
