"""Transformers plumbing of the steerer: the owner of the decoder layers, a forward's
arguments, the past length, a module's device."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from emokern.models import decoder_layers
from emokern.steering.adapters import ForwardInputs, layers_owner, module_device, past_length


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_layers_owner_runs_the_decoder_layers(family, request):
    model, _ = request.getfixturevalue(family)
    layers = decoder_layers(model)
    owner = layers_owner(model, layers)
    assert any(child is layers for child in owner.children())
    assert type(owner).__name__ in ("LlamaModel", "GPT2Model")
    with pytest.raises(ValueError, match="emokern.steer: could not find the module"):
        layers_owner(torch.nn.Linear(2, 2), layers)


def test_forward_inputs_reads_keywords_then_positions():
    def forward(input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        return None

    inputs = ForwardInputs(forward)
    ids, mask = torch.zeros(1, 3), torch.ones(1, 3)
    assert inputs.get("input_ids", (ids,), {}) is ids
    assert inputs.get("attention_mask", (ids, None, mask), {}) is mask
    assert inputs.get("attention_mask", (ids,), {"attention_mask": mask}) is mask
    assert inputs.get("inputs_embeds", (ids,), {}) is None  # not in the signature
    assert inputs.get("past_key_values", (ids,), {}) is None  # not given
    assert ForwardInputs(print).position == {}  # no signature: keywords only


def test_past_length_of_caches():
    assert past_length(None) == 0
    keys = torch.zeros(2, 4, 5, 8)
    assert past_length(((keys, keys),)) == 5  # legacy tuple of (keys, values) per layer
    assert past_length(object()) == 0
    cache = DynamicCache()
    assert past_length(cache) == 0
    cache.update(keys, keys, 0)
    assert past_length(cache) == 5


def test_module_device_falls_back_without_parameters():
    assert module_device(torch.nn.Linear(2, 2), torch.device("meta")) == torch.device("cpu")
    assert module_device(torch.nn.ReLU(), torch.device("meta")) == torch.device("meta")


def test_forward_inputs_reads_the_cache_under_either_name():
    def new_forward(input_ids=None, attention_mask=None, cache=None, use_cache=None):
        pass

    def old_forward(input_ids=None, past_key_values=None, attention_mask=None, use_cache=None):
        pass

    # (forward, position of its cache argument, position of its attention mask)
    for forward, cache_at, mask_at in ((new_forward, 2, 1), (old_forward, 1, 2)):
        inputs = ForwardInputs(forward)
        # A distinct object at every position: reading the wrong position (the other
        # forward's order, an off-by-one, a clamp to the last argument) returns the wrong one.
        args = tuple(object() for _ in range(4))
        ids, mask, cache = args[0], args[mask_at], args[cache_at]
        assert inputs.position == {"input_ids": 0, "attention_mask": mask_at,
                                   "past_key_values": cache_at}
        assert inputs.get("input_ids", args, {}) is ids
        assert inputs.get("past_key_values", args, {}) is cache
        assert inputs.get("attention_mask", args, {}) is mask
        # A keyword is read under either name, whatever the forward calls it, and wins over
        # the positions.
        other = object()
        assert inputs.get("past_key_values", args, {"cache": other}) is other
        assert inputs.get("past_key_values", args, {"past_key_values": other}) is other
        assert inputs.get("past_key_values", (), {"cache": other}) is other
        # Arguments that stop before the cache's position: no cache, whatever came before.
        assert inputs.get("past_key_values", args[:cache_at], {}) is None
        assert inputs.get("past_key_values", (), {}) is None
