"""The plugin's numbers in vLLM's ``/metrics``, scraped over raw HTTP from a live ``emokern
serve``: steered requests by kind of edit, refused mixes by reason and the readings histogram
move by exactly what the ``openai`` client sent and got back (buckets recounted from the
readings in the answers); the slot gauges show the engine's capacity, one request holding
slots while it streams, and none once it is gone.

One server for the module (levels on, a preset; eager, small). Run by ``make test-vllm``;
skipped without vLLM. Without vLLM: ``tests/test_metrics.py``.
"""

from __future__ import annotations

import sys
import time

import pytest
from live_server import call, openai_client, running, server_env

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

pytestmark = [pytest.mark.slow, pytest.mark.model]

MAX_NUM_SEQS = 4  # slots capacity: max_requests defaults to twice this
CALM = "joy=2,anger<=0.5"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``emokern serve --levels --preset calm=...`` (no steering key)."""
    log = tmp_path_factory.mktemp("metrics") / "serve.log"
    cmd = [sys.executable, "-m", "emokern.cli", "serve", "--levels", "--preset", f"calm={CALM}",
           "--served-model-name", "m", "--enforce-eager", "--max-model-len", "512",
           "--max-num-seqs", str(MAX_NUM_SEQS), "--seed", "0", "--disable-uvicorn-access-log"]
    with running(cmd, server_env(drop=("EMOKERN_STEERING_API_KEY",)), log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def scrape(server) -> dict:
    """``GET /metrics`` over raw HTTP, parsed: ``{(sample name, sorted label pairs): value}``
    of the ``emokern_`` samples."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = call(server + "/metrics")
    assert status == 200 and isinstance(body, bytes)  # Prometheus text, not JSON
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("emokern_"):
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, key
    return after[key] - before.get(key, 0.0)


def _xargs(mix) -> dict:
    return {"vllm_xargs": {"emotion": mix}, "ignore_eos": True}


def _complete(client, mix, **kw):
    kw = {"temperature": 0, **kw}
    return client.completions.create(
        model="m", prompt="Today I went to the market and", max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True} if mix is None else _xargs(mix), **kw)


def test_counters_and_histogram_move_by_what_was_sent(server, client):
    import openai

    before = scrape(server)
    returned = []  # the summary readings of every choice answered

    def readings_of(extra):
        returned.extend(c["readings"] for c in extra["emotion_readings"]["choices"])

    readings_of(_complete(client, "calm").model_extra)  # preset, push, cap
    stream = client.chat.completions.create(  # level, erase, floor; readings in the stream
        model="m", messages=[{"role": "user", "content": "Hello!"}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, extra_body=_xargs("sadness@1.5,fear=erase,joy>=1"))
    extras = [chunk.model_extra for chunk in stream]
    readings_of(next(e for e in extras if e and "emotion_readings" in e))
    rec = _complete(client, "anger=rec", n=2, temperature=1)  # rec, push; 2 choices (no seed: CPU)
    assert len(rec.choices) == 2
    readings_of(rec.model_extra)
    readings_of(_complete(client, None).model_extra)  # unsteered: read, not counted as steered
    for mix in ("joy=abc", "hope=1"):
        with pytest.raises(openai.BadRequestError):
            _complete(client, mix)
    after = scrape(server)

    steered = {"push": 2, "level": 1, "erase": 1, "cap": 1, "floor": 1, "rec": 1, "preset": 1}
    assert {k: _delta(before, after, "emokern_steered_requests_total", kind=k)
            for k in steered} == steered
    rejected = {"malformed": 1, "unknown_emotion": 1, "unknown_preset": 0, "out_of_range": 0,
                "over_limit": 0, "levels_off": 0, "no_emokern": 0, "forbidden": 0}
    assert {r: _delta(before, after, "emokern_rejected_mixes_total", reason=r)
            for r in rejected} == rejected

    assert len(returned) == 5
    emotions = list(returned[0])
    assert len(emotions) == 6 and all(None not in r.values() for r in returned)
    bounds = sorted({dict(labels)["le"] for name, labels in after
                     if name == "emokern_reading_bucket"}, key=float)
    assert bounds[-1] == "+Inf" and len(bounds) == 15
    for emotion in emotions:
        values = [r[emotion] for r in returned]
        assert _delta(before, after, "emokern_reading_count", emotion=emotion) == 5
        for le in bounds:  # every bucket recounted from the readings the client got
            assert _delta(before, after, "emokern_reading_bucket", emotion=emotion, le=le) \
                == sum(v <= float(le) for v in values), (emotion, le)


def _slots(server) -> tuple[float, float]:
    now = scrape(server)
    return now["emokern_slots_in_use", ()], now["emokern_slots_capacity", ()]


def _settled(server) -> tuple[float, float]:
    """The slot gauges once no request holds slots (a finished or aborted request frees them
    at the engine's next step, which may come just after its answer)."""
    deadline = time.monotonic() + 60
    while (slots := _slots(server))[0] != 0:
        assert time.monotonic() < deadline, f"slots still held a minute later: {slots}"
        time.sleep(0.5)
    return slots


def test_slots_in_use_while_a_request_streams_and_none_after(server, client):
    assert _settled(server) == (0, 2 * MAX_NUM_SEQS)
    stream = client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=400, temperature=0, stream=True,
        extra_body=_xargs("joy=2"))
    try:
        next(iter(stream))  # it runs
        assert _slots(server) == (1, 2 * MAX_NUM_SEQS)
    finally:
        stream.close()  # vLLM aborts it
    assert _settled(server) == (0, 2 * MAX_NUM_SEQS)
