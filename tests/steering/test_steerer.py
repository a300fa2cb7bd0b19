"""Steering real transformers models with :class:`emokern.steering.Steerer`: exactness,
per-row mixes, positions and padding, the allocation-free decode step, set_mix, errors.

Fast tests use the tiny randomly initialised Llama and GPT-2 models of ``tests/conftest.py``
(the real tokenizer); the test marked ``slow`` loads the default model.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_bank
from steering_helpers import Capture, encode, greedy, hook_counts, logits
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from emokern.benchmarks import hook_baselines as baseline
from emokern.benchmarks.workload import benchmark_bank
from emokern.models import decoder_layers, load_model, tiny_model
from emokern.steering import Steerer, steer
from emokern.tokens import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ exactness


def test_zero_mix_is_bit_identical(family):
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    plain = logits(model, encoded)
    plain_tokens = greedy(model, tokenizer, encoded)
    zeros = [{}, {"joy": 0.0, "fear": 0.0}, {"sadness": 0.0}]
    for positions in ("all", "prompt", "generated"):
        with steer(model, bank, zeros, layers=[0, 1, 2, 3], positions=positions) as s:
            assert torch.equal(logits(model, encoded), plain)
            assert torch.equal(greedy(model, tokenizer, encoded), plain_tokens)
        assert s.monitor.count().sum() > 0  # the monitor did read those forwards


def test_steering_changes_output_and_remove_restores_bit_identical(family):
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    hooks_before = hook_counts(model)
    plain = logits(model, encoded)
    with steer(model, bank, [{"joy": 1.0}, {"fear": -1.0}, {}], layers=[1, 2]) as s:
        assert s.installed and hook_counts(model) != hooks_before
        steered = logits(model, encoded)
    assert not s.installed
    assert hook_counts(model) == hooks_before
    real = encoded["attention_mask"].bool()
    assert (steered[0] - plain[0])[real[0]].abs().max() > 1e-3
    assert (steered[1] - plain[1])[real[1]].abs().max() > 1e-3
    assert torch.equal(steered[2], plain[2])  # the empty mix's row
    assert torch.equal(logits(model, encoded), plain)
    # Explicit install/remove, twice, gives the same.
    s.install()
    s.install()
    assert torch.equal(logits(model, encoded), steered)
    s.remove()
    assert torch.equal(logits(model, encoded), plain)


def test_row_does_not_depend_on_other_rows_mixes(family):
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    runs = []
    for neighbours in ([{"sadness": 2.0}, {"fear": -1.5}], [{}, {"joy": 3.0, "fear": 1.0}]):
        with steer(model, bank, [{"joy": 1.5}, *neighbours], layers=[1, 2]):
            runs.append((logits(model, encoded), greedy(model, tokenizer, encoded)))
    assert torch.equal(runs[0][0][0], runs[1][0][0])
    assert torch.equal(runs[0][1][0], runs[1][1][0])
    assert not torch.equal(runs[0][0][1], runs[1][0][1])


@pytest.mark.parametrize("spread", ["divide", "each"])
def test_matches_naive_baseline_for_a_shared_mix(family, spread):
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    mix = {"joy": 1.5, "fear": -0.5}
    layers = [0, 2, 3]
    with steer(model, bank, [mix] * 3, layers=layers, spread=spread):
        fused = logits(model, encoded)
    with baseline.NaiveSteering(model, baseline.shared_deltas(bank, mix, layers, spread)):
        naive = logits(model, encoded)
    real = encoded["attention_mask"].bool()
    # The naive hooks also steer the left padding; padding never influences real tokens.
    torch.testing.assert_close(fused[real], naive[real], rtol=1e-4, atol=1e-4)
    assert (fused[real] - logits(model, encoded)[real]).abs().max() > 1e-2


@pytest.mark.skipif(not baseline.steering_vectors_available(),
                    reason="steering-vectors is not installed")
def test_matches_steering_vectors_library(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer, ["a plain prompt without padding"])
    mix = {"sadness": 2.0}
    with steer(model, bank, [mix], layers=[1, 3]):
        fused = logits(model, encoded)
    with baseline.steering_vectors_patch(model, baseline.shared_deltas(bank, mix, [1, 3])):
        library = logits(model, encoded)
    torch.testing.assert_close(fused, library, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ positions, padding


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_positions_and_padding(family, positions):
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    assert not real.all()  # the batch has left padding
    capture = Capture(decoder_layers(model)[2])
    try:
        s = steer(model, bank, [{"joy": 1.0}, {"sadness": 2.0}, {"fear": -1.0}], layers=[2],
                  positions=positions).install()
        capture.attach_after()
        new_tokens = 4
        greedy(model, tokenizer, encoded, new_tokens=new_tokens)
        s.remove()
    finally:
        capture.remove()
    changed = capture.changed()
    assert len(changed) == new_tokens  # one prefill + 3 decode steps
    prompt_expected = real if positions in ("all", "prompt") else torch.zeros_like(real)
    assert torch.equal(changed[0], prompt_expected)
    for step in changed[1:]:
        assert step.shape == (3, 1)
        assert bool(step.all()) == (positions in ("all", "generated"))
        assert bool(step.any()) == (positions in ("all", "generated"))
    counted = torch.zeros(3, dtype=torch.int64)
    if positions in ("all", "prompt"):
        counted += real.sum(dim=1)
    if positions in ("all", "generated"):
        counted += new_tokens - 1
    assert torch.equal(s.monitor.count(), counted)


def test_chunked_prefill_counts_as_prompt(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    capture = Capture(decoder_layers(model)[1])
    try:
        s = steer(model, bank, [{"joy": 1.0}] * 3, layers=[1], positions="prompt",
                  trajectory=True).install()
        capture.attach_after()
        greedy(model, tokenizer, encoded, new_tokens=3, prefill_chunk_size=3)
        s.remove()
    finally:
        capture.remove()
    n_chunks = math.ceil(real.shape[1] / 3)
    changed = capture.changed()
    assert len(changed) == n_chunks + 2
    assert torch.equal(torch.cat(changed[:n_chunks], dim=1), real)
    assert not any(bool(c.any()) for c in changed[n_chunks:])
    assert torch.equal(s.monitor.count(), real.sum(dim=1))
    assert s.monitor.trajectory().shape[0] == 3  # one step per generated token




def test_plain_forward_without_attention_mask_steers_every_token(llama):
    model, tokenizer, bank = llama
    ids = tokenizer(["one two three four"], return_tensors="pt")["input_ids"]
    with steer(model, bank, [{"joy": 1.0}], layers=[1]) as s, torch.inference_mode():
        model(input_ids=ids)
    assert s.monitor.count().tolist() == [ids.shape[1]]


# ------------------------------------------------------------------------ hot path


def _allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_decode_step_allocates_nothing(llama):
    """The pre-hook and the layer hooks of a decode step (one token after a past) use only
    preallocated tensors; a prompt forward's hooks allocate their masks (the profiler's
    control)."""
    model, _, bank = llama
    s = steer(model, bank, [{"joy": 1.0}, {"fear": -2.0}], layers=[1, 2]).install()
    try:
        hooks = [s._layer_hook(slot) for slot in range(2)]
        hidden = torch.randn(2, 1, model.config.hidden_size)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :4] = 0
        decode = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "attention_mask": mask}
        prompt = {"input_ids": torch.zeros(2, 12, dtype=torch.long), "attention_mask": mask}

        def step(kwargs, h):
            s._before_forward(None, (), kwargs)
            for hook in hooks:
                hook(None, (), h)

        with torch.inference_mode():
            step(decode, hidden)  # warm-up
            assert _allocated_bytes(lambda: step(decode, hidden)) == 0
            assert s._active is s._decode_calls
            prompt_hidden = torch.randn(2, 12, model.config.hidden_size)
            assert _allocated_bytes(lambda: step(prompt, prompt_hidden)) > 0
    finally:
        s.remove()


# ------------------------------------------------------------------------ set_mix


class _SwitchMix(LogitsProcessor):
    """Calls steerer.set_mix(mix) once generation has produced ``after`` tokens."""

    def __init__(self, steerer, mix, after, prompt_length):
        self.steerer, self.mix, self.after, self.prompt_length = steerer, mix, after, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.after:
            self.steerer.set_mix(self.mix)
        return scores


def test_set_mix_mid_generation_without_reinstall(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    capture = Capture(decoder_layers(model)[1])
    try:
        s = steer(model, bank, [{"joy": 2.0}] * 3, layers=[1]).install()
        capture.attach_after()
        handles = list(s._handles)
        weights_storage = s.applied[torch.device("cpu")].data_ptr()
        switch = _SwitchMix(s, [{}] * 3, after=2, prompt_length=encoded["input_ids"].shape[1])
        greedy(model, tokenizer, encoded, new_tokens=5,
               logits_processor=LogitsProcessorList([switch]))
        assert s._handles == handles
        assert s.applied[torch.device("cpu")].data_ptr() == weights_storage
        s.remove()
    finally:
        capture.remove()
    changed = [bool(c.any()) for c in capture.changed()]
    # The processor sees the logits of forward f with f tokens generated so far: it switches
    # after forward 2, so forwards 0 (prefill), 1 and 2 are steered and 3, 4 are not.
    assert changed == [True, True, True, False, False]


def test_set_mix_between_generate_calls_equals_a_fresh_steerer(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    first, second = [{"joy": 1.0}] * 3, [{"fear": 2.0}, {}, {"sadness": -1.0, "joy": 0.5}]
    with steer(model, bank, second, layers=[1, 2]):
        expected = greedy(model, tokenizer, encoded)
    with steer(model, bank, first, layers=[1, 2]) as s:
        greedy(model, tokenizer, encoded)
        s.set_mix(second)
        assert torch.equal(greedy(model, tokenizer, encoded), expected)
        assert torch.equal(s.weights[2], torch.tensor([0.5, -1.0, 0.0]))  # joy, sadness, fear
        # A tensor mix over bank.names works the same.
        s.set_mix(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.5, -1.0, 0.0]]))
        assert torch.equal(greedy(model, tokenizer, encoded), expected)
        # A different batch size reallocates.
        s.set_mix([{"joy": 1.0}])
        greedy(model, tokenizer, encode(tokenizer, ["single prompt"]))
        assert s.monitor.count().shape == (1,)


def test_norm_preserving_keeps_each_steered_row_norm(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    capture = Capture(decoder_layers(model)[2])
    try:
        s = steer(model, bank, [{"joy": 3.0}, {"fear": -2.0}, {}], layers=[2],
                  norm_preserving=True).install()
        capture.attach_after()
        logits(model, encoded)
        s.remove()
    finally:
        capture.remove()
    before, after = capture.before[0], capture.after[0]
    real = encoded["attention_mask"].bool()
    torch.testing.assert_close(after.norm(dim=-1)[real], before.norm(dim=-1)[real],
                               rtol=1e-5, atol=1e-6)
    assert (after[0] - before[0]).abs().max() > 1e-3


def test_backends_agree(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    mixes = [{"joy": 1.0}, {"fear": -2.0, "sadness": 0.5}, {}]
    results = {}
    for backend in ("reference", None):
        with steer(model, bank, mixes, layers=[1, 2], backend=backend) as s:
            results[backend] = (logits(model, encoded), s.monitor.mean())
    torch.testing.assert_close(results["reference"][0], results[None][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["reference"][1], results[None][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        steer(model, bank, mixes, backend="fortran")


def test_sampling_and_bfloat16():
    model, tokenizer = tiny_model("llama", seed=3)
    model = model.to(torch.bfloat16)
    bank = random_bank(model)
    encoded = encode(tokenizer)
    sampled = [{"joy": 1.0}, {}, {"fear": 1.0}]
    with steer(model, bank, sampled, layers=[1, 2]) as s, torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=4, do_sample=True, top_k=20,
                             pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 4
    real = encoded["attention_mask"].bool()
    # Every real prompt token and the 3 generated tokens fed back were counted.
    assert torch.equal(s.monitor.count(), real.sum(1) + 3)
    # The sampled run's readings by hand: the tokens it fed to the model in one steered
    # forward, hidden states captured with output_hidden_states (a steered layer's entry
    # holds its output after steering: the added (w / 2) v_l comes off again), projected in
    # float64 onto the unit vectors, averaged over the counted tokens, at layers 1 and 2.
    fed = out[:, :-1]
    fed_mask = torch.cat([encoded["attention_mask"],
                          torch.ones(3, 3, dtype=encoded["attention_mask"].dtype)], dim=1)
    positions = (fed_mask.cumsum(-1) - 1).clamp_min(0)  # left padding, as generate() does
    with steer(model, bank, sampled, layers=[1, 2]) as replay, torch.inference_mode():
        states = model(input_ids=fed, attention_mask=fed_mask, position_ids=positions,
                       output_hidden_states=True).hidden_states
    counted = fed_mask.bool()[..., None].double()
    expected = []
    for layer in (1, 2):
        v = bank.layer_vectors(layer).double()
        added = (replay.weights.double() / 2) @ v  # [B, D]
        before = states[layer + 1].double() - added[:, None, :] * counted
        p = before @ (v / v.norm(dim=-1, keepdim=True)).T  # [B, T, K]
        expected.append((p * counted).sum(1) / counted.sum(1))
    expected = torch.stack(expected, dim=1)  # [B, 2, K]
    torch.testing.assert_close(replay.monitor.mean().double(), expected, rtol=1e-2, atol=1e-2)
    # The sampled run read the same tokens step by step (a KV cache; bfloat16 rounding).
    torch.testing.assert_close(s.monitor.mean().double(), expected, rtol=1e-2, atol=1e-2)
    # One bfloat16 forward checked by hand (float64): layer 1 adds (w / 2) v_1 to the real
    # tokens of the steered rows only, and the monitor reads the state before steering.
    mixes = [{"joy": 1.0}, {}, {"fear": -2.0, "sadness": 0.5}]
    capture = Capture(decoder_layers(model)[1])
    try:
        s = steer(model, bank, mixes, layers=[1, 2]).install()
        capture.attach_after()
        logits(model, encoded)
        s.remove()
    finally:
        capture.remove()
    before, after = capture.before[0].double(), capture.after[0].double()
    added = (s.weights.double() / 2) @ bank.layer_vectors(1).double()  # [B, D]
    expected = before + added[:, None, :] * real[..., None]
    torch.testing.assert_close(after, expected, rtol=1e-2, atol=2e-2)
    assert torch.equal(after[1], before[1]) and torch.equal(after[~real], before[~real])
    unit = bank.layer_vectors(1).double()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    projections = (before @ unit.T) * real[..., None]
    mean = projections.sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(s.monitor.mean()[:, 0].double(), mean, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------ errors


def _bad_steer_cases(model, bank):
    other, _ = tiny_model("llama", seed=1)
    return [
        (dict(mix=[{"happiness": 1.0}]), ValueError, "unknown emotion 'happiness'"),
        (dict(mix=[{"joy": float("nan")}]), ValueError, "must be finite"),
        (dict(mix=[{"joy": math.inf}]), ValueError, "must be finite"),
        (dict(mix=[{"joy": "2"}]), TypeError, "must be a number"),
        (dict(mix=[{"joy": True}]), TypeError, "must be a number"),
        (dict(mix={"joy": 1.0}), TypeError, "one dict per sequence"),
        (dict(mix=[]), ValueError, "at least one row"),
        (dict(mix=[["joy", 1.0]]), TypeError, r"mix\[0\] must be a dict"),
        (dict(mix=torch.zeros(2, 5)), ValueError, r"\[B, K\] with K = 3"),
        (dict(mix=torch.tensor([[0.0, float("nan"), 0.0]])), ValueError, "must be finite"),
        (dict(mix=[{}], layers=[7]), ValueError, "layer 7 is outside the model"),
        (dict(mix=[{}], layers=[-1]), ValueError, "outside the model"),
        (dict(mix=[{}], layers=[1, 1]), ValueError, "twice"),
        (dict(mix=[{}], layers=[]), ValueError, "non-empty"),
        (dict(mix=[{}], layers="middle"), ValueError, "'auto'"),
        (dict(mix=[{}], positions="decode"), ValueError, "positions must be one of"),
        (dict(mix=[{}], monitor="sometimes"), ValueError, "monitor must be"),
        (dict(mix=[{}], spread="sum"), ValueError, "spread must be one of"),
        (dict(mix=[{}], emotions=["anger"]), ValueError, "unknown emotion 'anger'"),
        (dict(mix=[{}], bank=random_bank(other)), ValueError, "not compatible"),
        (dict(mix=[{}], bank=random_bank(model).select(layers=[0, 1])), ValueError,
         "layer 2 has no vectors in the bank"),
    ]


def test_bad_input_raises_before_anything_is_modified(llama):
    model, tokenizer, bank = llama
    hooks_before = hook_counts(model)
    for kwargs, exc, message in _bad_steer_cases(model, bank):
        kwargs = dict(kwargs)
        chosen_bank = kwargs.pop("bank", bank)
        mix = kwargs.pop("mix")
        if "layers" not in kwargs and chosen_bank is not bank:
            kwargs["layers"] = [1, 2]
        with pytest.raises(exc, match=message):
            steer(model, chosen_bank, mix, **kwargs)
        assert hook_counts(model) == hooks_before, kwargs


def test_unsupported_architecture_names_what_was_looked_for(llama):
    _, _, bank = llama
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        steer(torch.nn.Linear(4, 4), bank, [{}])


def test_wrong_batch_raises_before_any_layer_runs(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)  # 3 rows
    calls = []
    probe = decoder_layers(model)[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with steer(model, bank, [{"joy": 1.0}, {}], layers=[1]):
            with pytest.raises(ValueError, match="mix has 2 rows but the model got a batch of 3"):
                logits(model, encoded)
            with pytest.raises(ValueError, match="num_return_sequences"):
                greedy(model, tokenizer, encode(tokenizer, ["a"]), num_return_sequences=2)
    finally:
        probe.remove()
    assert calls == []


def test_set_mix_validates_before_changing_anything(llama):
    model, tokenizer, bank = llama
    s = steer(model, bank, [{"joy": 1.0}, {}], layers=[1])
    before = s.weights
    for bad in ([{"joy": float("nan")}, {}], [{"rage": 1.0}, {}], "joy=1"):
        with pytest.raises((ValueError, TypeError)):
            s.set_mix(bad)
    assert torch.equal(s.weights, before)


def test_grad_mode_forward_gets_a_clear_error(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    with steer(model, bank, [{}] * 3, layers=[1]):
        with pytest.raises(RuntimeError, match="torch.no_grad"):
            model(**encoded)
        with torch.no_grad():
            model(**encoded)


def test_steerer_repr_and_defaults(llama):
    model, _, bank = llama
    s = steer(model, bank, [{"joy": 1.0}])
    assert isinstance(s, Steerer)
    assert s.layers == (1, 2)  # bank.recommended_layers
    assert "installed" in repr(s) and "joy" in repr(s)


# ------------------------------------------------------------------------ real model


@pytest.mark.slow
@pytest.mark.model
def test_default_model_empty_row_equals_unsteered_generation():
    model, tokenizer = load_model("default")
    bank, _ = benchmark_bank(model, tokenizer)
    prompts = ["Tell me about your weekend.", "Tell me about your weekend."]
    encoded = encode_prompts(tokenizer, prompts)
    joy = {"joy": 4.0 * bank.default_weight}
    with steer(model, bank, [joy, {}], layers=list(range(10, 20))) as s:
        steered = greedy(model, tokenizer, encoded, new_tokens=24)
    plain = greedy(model, tokenizer, encoded, new_tokens=24)
    assert torch.equal(steered[1], plain[1])
    assert not torch.equal(steered[0], plain[0])
    assert s.monitor.mean().shape == (2, 10, bank.n_emotions)


def test_check_layers_is_one_check_for_every_caller(tiny_llama):
    """The Steerer, its monitor layers and the vLLM plugin share one layer check: "auto" = the
    bank's recommended layers, order kept, and every error names the caller and argument."""
    from emokern.steering import check_layers

    bank = random_bank(tiny_llama[0])
    n = len(bank.layers)
    assert check_layers("auto", bank, n) == (1, 2)
    assert check_layers([2, 0], bank, n) == (2, 0)
    assert check_layers(1, bank, n) == (1,)
    with pytest.raises(ValueError, match=r"^emokern\.vllm: layers: layer 9 is outside the model"):
        check_layers([9], bank, n, who="emokern.vllm")
    with pytest.raises(ValueError, match=r"^emokern\.steer: monitor_layers lists a layer twice"):
        check_layers([1, 1], bank, n, argument="monitor_layers")
    with pytest.raises(TypeError, match=r"^emokern\.steer: layers must hold ints, got '1'"):
        check_layers(["1"], bank, n)
    with pytest.raises(ValueError, match=r"must be 'auto' or a list of layer indices"):
        check_layers("all", bank, n)
    with pytest.raises(ValueError, match="layer 2 has no vectors in the bank"):
        check_layers([2], bank.select(layers=[0, 1]), n)
