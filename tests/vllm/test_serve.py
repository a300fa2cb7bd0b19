"""``emokern serve`` over HTTP with the official ``openai`` client: readings in the answers and
on the last chunk of a stream, ``GET /v1/emotions``, bad input through every door, concurrent
clients. One server (the default model, vLLM's compilation on) on 127.0.0.1 at a free port,
shared by the module; run by ``make test-vllm``. Without vLLM only the first test runs: the
command explains what is missing.
"""

import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import standard_scores_by_hand
from live_server import call, openai_client, running, server_env

import emokern
from emokern.cli import main as cli_main
from emokern.vllm.http import READINGS_FIELD
from emokern.vllm.serve import MIDDLEWARE, vllm_argv

try:  # a submodule: this tests/vllm directory would pass for the package ``vllm``
    import vllm.sampling_params  # noqa: F401
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

MAX_TOKENS = 12
# Readings over HTTP vs the Hugging Face monitor, same tokens (see test_engine.READING_ATOL).
READING_ATOL = 1e-3
EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
CLIENTS, PER_CLIENT = 32, 4


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_serve_explains_a_missing_vllm(capsys):
    assert cli_main(["serve", "--port", "8123", "--max-num-seqs", "4"]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and 'pip install "emokern[vllm]"' in err


def test_serve_arguments_for_vllm():
    argv = vllm_argv(model="/m", bank="concept", layers="3,4", host="127.0.0.1", port=8001,
                     extra=["--max-num-seqs", "4",
                            "--additional-config={\"x\": 1, \"emokern\": {\"monitor\": false}}"],
                     cuda=False)
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-num-seqs") + 1] == "4" and argv.count("--additional-config") == 1
    additional = json.loads(argv[argv.index("--additional-config") + 1])
    assert additional == {"x": 1, "emokern": {"monitor": False, "bank": "concept",
                                              "layers": [3, 4]}}
    cuda = vllm_argv(model="/m", bank="default", layers="auto", host="h", port=1, extra=[],
                     cuda=True)
    assert "--dtype" not in cuda
    assert "levels" not in json.loads(cuda[cuda.index("--additional-config") + 1])["emokern"]
    leveled = vllm_argv(model="/m", bank="default", layers="auto", host="h", port=1, extra=[],
                        cuda=True, levels=True)  # emokern serve --levels
    assert json.loads(leveled[leveled.index("--additional-config") + 1])["emokern"]["levels"]
    for kw, message in ((dict(bank="nope"), "--bank"), (dict(layers="3,x"), "--layers"),
                        (dict(port=0), "--port"), (dict(extra=["--additional-config", "{"]),
                                                   "--additional-config must be JSON")):
        args = dict(model="/m", bank="default", layers="auto", host="h", port=1, extra=[],
                    cuda=False) | kw
        with pytest.raises(ValueError, match=message):
            vllm_argv(**args)


needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM (make test-vllm)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``emokern serve`` on 127.0.0.1:<free port>; yields its base URL (with
    ``EMOKERN_TEST_SERVER=<url>``, that running server instead)."""
    if os.environ.get("EMOKERN_TEST_SERVER"):
        yield os.environ["EMOKERN_TEST_SERVER"].rstrip("/")
        return
    cmd = [str(Path(sys.executable).with_name("emokern")), "serve", "--max-model-len", "512",
           "--max-num-seqs", "32", "--seed", "0", "--disable-uvicorn-access-log"]
    with running(cmd, server_env("2"), tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def _xargs(mix):
    return {"vllm_xargs": {"emotion": mix}} if mix is not None else None


def _chat(client, model_name, mix, text="Tell me about your day.", **kw):
    return client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": text}], temperature=0,
        max_tokens=MAX_TOKENS, extra_body=_xargs(mix), **kw)


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_completion_readings_match_the_hugging_face_monitor(client, model_name):
    mix = {"joy": 4.0, "fear": 1.0}
    model, tokenizer = emokern.load_model("default")
    from emokern.tokens import chat_prompt_ids

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "How was the concert?"}])
    plain = client.completions.create(model=model_name, prompt=ids, max_tokens=MAX_TOKENS,
                                      temperature=0)
    out = client.completions.create(model=model_name, prompt=ids, max_tokens=MAX_TOKENS,
                                    temperature=0, logprobs=0,
                                    extra_body=_xargs("joy=4,fear=1"))
    assert out.choices[0].text != plain.choices[0].text  # steering changed the answer
    readings = out.model_extra[READINGS_FIELD]
    choice = readings["choices"][0]
    assert choice["index"] == 0
    assert choice["count"] == out.usage.completion_tokens - 1
    assert choice["prompt_count"] == len(ids)
    bank = emokern.EmotionBank.load_default()
    assert readings["names"] == list(bank.names)
    assert readings["layers"] == list(bank.recommended_layers)
    assert set(choice["readings"]) == set(bank.names)
    # The same prompt and mix through Hugging Face: same tokens, same readings.
    x = torch.tensor([ids])
    with emokern.steer(model, bank, mix=[mix], layers=readings["layers"], positions="all",
                       monitor="generated") as s:
        hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                            max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
    assert tokenizer.decode(hf[0, len(ids):]) == out.choices[0].text
    got = torch.tensor(choice["mean"])
    print("max |HTTP - HF| reading:", (got - s.monitor.mean()[0]).abs().max().item())
    torch.testing.assert_close(got, s.monitor.mean()[0], atol=READING_ATOL, rtol=0)
    # the summary readings are standard scores: against the monitor's and against the raw means
    # standardised here by hand (per layer and emotion, float64)
    z = torch.tensor([choice["readings"][name] for name in bank.names], dtype=torch.float64)
    by_hand, sigma = standard_scores_by_hand(bank, readings["layers"], s.monitor.mean()[0])
    torch.testing.assert_close(z, by_hand, atol=READING_ATOL / sigma, rtol=0)
    torch.testing.assert_close(z, s.monitor.readings()[0].double(), atol=READING_ATOL / sigma,
                               rtol=0)
    # the unsteered answer carries readings too (zero weights: read, not steered)
    assert plain.model_extra[READINGS_FIELD]["choices"][0]["count"] == (
        plain.usage.completion_tokens - 1)


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_chat_stream_has_readings_on_its_last_chunk_only(client, model_name):
    whole = _chat(client, model_name, "sadness=5")
    assert whole.model_extra[READINGS_FIELD]["choices"][0]["count"] == (
        whole.usage.completion_tokens - 1)
    for usage in (False, True):
        chunks = list(_chat(client, model_name, "sadness=5", stream=True,
                            stream_options={"include_usage": True} if usage else None))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        with_readings = [i for i, c in enumerate(chunks)
                         if (c.model_extra or {}).get(READINGS_FIELD)]
        assert with_readings == [len(chunks) - 1]
        last = chunks[-1].model_extra[READINGS_FIELD]
        assert last == whole.model_extra[READINGS_FIELD]
        if usage:
            assert chunks[-1].choices == [] and chunks[-1].usage is not None


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_completion_stream_and_several_choices(client, model_name):
    """Two prompts x n = 2 samples: choice i·n + j gets the readings of prompt i's sample j
    (told apart by the prompts' lengths: each prompt is read once, its second sample may reuse
    the prefix cache)."""
    _, tokenizer = emokern.load_model("default")
    prompts = ["Hi", "Once upon a time, in a small village by the sea, there"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    kw = dict(model=model_name, prompt=prompts, max_tokens=6, temperature=0.8, n=2,
              extra_body=_xargs("anger=3"))
    for stream in (False, True):
        out = client.completions.create(**kw, stream=stream)
        if stream:
            chunks = list(out)
            found = [c.model_extra.get(READINGS_FIELD) for c in chunks]
            assert all(r is None for r in found[:-1])
            readings = found[-1]
        else:
            assert [c.index for c in out.choices] == [0, 1, 2, 3]
            readings = out.model_extra[READINGS_FIELD]
        choices = readings["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        for i, length in enumerate(lengths):
            counts = [choices[2 * i + j]["prompt_count"] for j in range(2)]
            assert max(counts) == length and min(counts) <= length, (i, counts, lengths)
        if not stream:
            assert sum(c["count"] + 1 for c in choices) == out.usage.completion_tokens


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_emotions_endpoint(server):
    status, info = call(server + "/v1/emotions")
    assert status == 200
    bank = emokern.EmotionBank.load_default()
    assert info["names"] == list(bank.names)
    assert info["layers"] == list(bank.recommended_layers)
    assert info["recommended_weights"] == {n: bank.recommended_weight(n) for n in bank.names}


BAD_MIXES = [("hope=1", "unknown emotion 'hope'"), ("joy=nan", "must be finite"),
             ("joy=inf", "must be finite"), ("joy==2", "must be a number"),
             ("joy", "bad term 'joy'"), (3, "must be a dict or a string"),
             (["joy=1"], "must be a dict or a string"), ("joy=rec,joy=1", "given twice")]


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_bad_input_is_a_400_and_the_server_stays_healthy(server, client, model_name):
    import openai

    doors = {
        "completions": lambda mix, stream: client.completions.create(
            model=model_name, prompt="Hello", max_tokens=4, stream=stream,
            extra_body=_xargs(mix)),
        "chat": lambda mix, stream: _chat(client, model_name, mix, stream=stream),
    }
    for mix, message in BAD_MIXES:
        for door, create in doors.items():
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    result = create(mix, stream)
                    if stream:
                        list(result)
                assert info.value.status_code == 400
                assert message in str(info.value), (door, stream, mix, str(info.value))
                assert "vllm_xargs['emotion']" in str(info.value)
    assert call(server + "/health")[0] == 200
    ok = _chat(client, model_name, "joy=2")
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_concurrent_clients_with_distinct_mixes(client, model_name):
    """32 clients x 4 requests, each with its own mix, all at once: 0 errors, every answer
    has its readings, and the answers checked alone first are unchanged under load."""
    mixes = [f"{EMOTIONS[i % 6]}={0.5 + 0.05 * i:.2f}" for i in range(CLIENTS * PER_CLIENT)]
    questions = ["Describe your neighbour.", "What do you think of the sea?",
                 "How was the concert?", "Tell me about your day."]
    alone = {i: _chat(client, model_name, mixes[i], questions[i % 4]).choices[0]
             .message.content for i in (0, 37, 81, 127)}

    def one_client(c):
        answers = {}
        for r in range(PER_CLIENT):
            i = c * PER_CLIENT + r
            out = _chat(client, model_name, mixes[i], questions[i % 4])
            reading = out.model_extra[READINGS_FIELD]["choices"][0]
            assert reading["count"] == out.usage.completion_tokens - 1
            answers[i] = out.choices[0].message.content
        return answers

    start = time.monotonic()
    answers, errors = {}, []
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(one_client, c) for c in range(CLIENTS)]:
            try:
                answers.update(f.result())
            except Exception as exc:  # counted, then reported
                errors.append(repr(exc))
    elapsed = time.monotonic() - start
    print(f"{CLIENTS} clients x {PER_CLIENT} requests: {len(answers)} answers, "
          f"{len(errors)} errors in {elapsed:.1f} s")
    assert errors == []
    assert len(answers) == CLIENTS * PER_CLIENT
    for i, text in alone.items():
        assert answers[i] == text, i


@pytest.mark.slow
@pytest.mark.model
@needs_vllm
def test_vllm_own_server_with_the_endpoint_plugin(tmp_path):
    """vLLM's own launcher, no ``--middleware``: with ``VLLM_PLUGINS=emokern`` the endpoint
    plugin adds the readings and ``/v1/emotions`` (eager: this test is about the HTTP side)."""
    additional = json.dumps({"emokern": {"layers": [12]}})
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(emokern.vllm.default_model_dir()), "--served-model-name", "m",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--additional-config", additional]
    with running(cmd, server_env("2", VLLM_PLUGINS="emokern"), tmp_path / "vllm.log") as url:
        status, body = call(url + "/v1/emotions")
        assert status == 200 and body["layers"] == [12]
        status, answer = call(url + "/v1/completions", "POST", {
            "model": "m", "prompt": "Today I", "max_tokens": 4, "temperature": 0,
            "vllm_xargs": {"emotion": "joy=2"}})
        assert status == 200
        readings = answer[READINGS_FIELD]
        assert readings["layers"] == [12]
        assert readings["choices"][0]["count"] == 3  # 4 tokens, the last one never fed back
        status, answer = call(url + "/v1/completions", "POST", {
            "model": "m", "prompt": "Today I", "max_tokens": 4,
            "vllm_xargs": {"emotion": "hope=1"}})
        error = answer["error"]
        assert status == 400 and "unknown emotion 'hope'" in error["message"]
        assert "vllm_xargs['emotion']" in error["message"]
