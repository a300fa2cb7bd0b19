"""emokern.ablate: the MLP intermediate neurons scaled in a real forward, bit-identical when
the set is empty, hooks removed on exit, one clear error for bad input or an unknown layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import emokern
from emokern.steering.ablate import mlp_down_projections

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tokenizer):
    enc = tokenizer(["The storm broke the old fence.", "A quiet morning."],
                    return_tensors="pt", padding=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def _logits(model, enc):
    with torch.inference_mode():
        return model(**enc).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_empty_set_is_bit_identical_and_exit_restores(request, fixture):
    model, tokenizer = request.getfixturevalue(fixture)
    enc = _batch(tokenizer)
    before = _logits(model, enc)
    with emokern.ablate(model, neurons={0: [], 2: []}):
        assert torch.equal(_logits(model, enc), before)
    with emokern.ablate(model, neurons={1: [3, 7]}):
        assert not torch.equal(_logits(model, enc), before)
    assert torch.equal(_logits(model, enc), before)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_matches_a_plain_hook_on_the_down_projection(request, fixture, scale):
    model, tokenizer = request.getfixturevalue(fixture)
    enc = _batch(tokenizer)
    neurons = {0: [1, 5, 9], 3: [0, 100, 127]}
    projections = mlp_down_projections(model)
    handles = []
    for layer, ids in neurons.items():
        def hook(module, args, ids=ids):
            act = args[0].clone()
            act[..., ids] = act[..., ids] * scale
            return (act,)
        handles.append(projections[layer][0].register_forward_pre_hook(hook))
    try:
        want = _logits(model, enc)
    finally:
        for h in handles:
            h.remove()
    with emokern.ablate(model, neurons=neurons, scale=scale) as ab:
        got = _logits(model, enc)
    assert ab.num_neurons == 6
    assert torch.equal(got, want)


def test_reference_backend_gives_the_same_logits(tiny_llama):
    model, tokenizer = tiny_llama
    enc = _batch(tokenizer)
    with emokern.ablate(model, neurons={2: [4, 8, 15]}):
        fused = _logits(model, enc)
    with emokern.ablate(model, neurons={2: [4, 8, 15]}, backend="reference"):
        ref = _logits(model, enc)
    assert torch.equal(fused, ref)


def test_intermediate_sizes(tiny_llama, tiny_gpt2):
    assert [f for _, f in mlp_down_projections(tiny_llama[0])] == [128] * 4
    assert [f for _, f in mlp_down_projections(tiny_gpt2[0])] == [256] * 4


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


class _NoMLP(nn.Module):
    """Decoder layers where emokern finds them, but no MLP down projection inside."""

    def __init__(self):
        super().__init__()
        self.model = _Blocks()


@pytest.mark.parametrize("neurons,scale,exc,match", [
    ({9: [1]}, 0.0, ValueError, "layer 9"),
    ({0: [128]}, 0.0, ValueError, "id 128"),
    ({0: [-1]}, 0.0, ValueError, "id -1"),
    ({0: [3, 3]}, 0.0, ValueError, "twice"),
    ({0: "12"}, 0.0, TypeError, "list of neuron ids"),
    ([1, 2], 0.0, TypeError, "mapping"),
    ({0: [1]}, float("nan"), ValueError, "finite"),
    ({0: [1]}, "0", ValueError, "finite"),
])
def test_bad_input_is_one_clear_error_before_any_hook(tiny_llama, neurons, scale, exc, match):
    model, _ = tiny_llama
    with pytest.raises(exc, match="emokern.ablate: .*" + match):
        emokern.ablate(model, neurons=neurons, scale=scale)
    assert all(not m._forward_pre_hooks for m, _ in mlp_down_projections(model))


def test_unrecognised_mlp_layout():
    with pytest.raises(ValueError,
                       match=r"MLP layout of _NoMLP \(decoder layer 0, a Linear\) is not"):
        emokern.ablate(_NoMLP(), neurons={0: [1]})


def test_forward_with_gradients_is_refused(small_llama):
    model, tokenizer = small_llama
    enc = _batch(tokenizer)
    with emokern.ablate(model, neurons={0: [1]}):
        with pytest.raises(RuntimeError, match="for inference"):
            model(**enc)
