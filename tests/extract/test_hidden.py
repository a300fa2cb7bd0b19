"""Reading a model: span sums of hidden states equal unpadded per-sequence forwards (masking),
batched generation equals one prompt at a time."""

import pytest
import torch

from emokern.extract import generate_responses, span_hidden_states
from emokern.models import decoder_layers
from emokern.tokens import chat_prompt_ids, eos_ids


@pytest.mark.parametrize("family", ["small_llama", "small_gpt2"])
def test_span_states_equal_unpadded_per_sequence_forward(family, request):
    model, tokenizer = request.getfixturevalue(family)
    texts = ["Hello there, how are you doing today my friend?", "Hi", "The quick brown fox"]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    spans = [(3, len(seqs[0])), (0, 1), (1, 3)]
    layers = [0, 2]
    sums, counts, norm_sums = span_hidden_states(model, seqs, spans, layers=layers,
                                                 pad_token_id=tokenizer.pad_token_id,
                                                 batch_size=3)
    assert sums.shape == (3, 2, 32) and counts.tolist() == [b - a for a, b in spans]
    for i, (seq, (a, b)) in enumerate(zip(seqs, spans, strict=True)):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        # Layer 2 is the last layer: transformers reports hidden_states[3] after the final
        # norm, so read the decoder layer's own output there.
        ref = []
        for layer in layers:
            h = out.hidden_states[layer + 1][0] if layer < 2 else _layer_output(model, seq, 2)
            ref.append(h[a:b])
        torch.testing.assert_close(sums[i], torch.stack([r.sum(0) for r in ref]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm_sums[i], torch.stack([r.norm(dim=-1).sum() for r in ref]),
                                   atol=1e-5, rtol=1e-5)


def _layer_output(model, seq, layer):
    seen = {}
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("h", out if torch.is_tensor(out) else out[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
    finally:
        handle.remove()
    return seen["h"][0]


def test_span_states_reject_bad_spans(small_llama):
    model, _ = small_llama
    with pytest.raises(ValueError, match="one .start, stop. per sequence"):
        span_hidden_states(model, [[1, 2]], [], layers=[0])
    with pytest.raises(ValueError, match=r"spans\[0\]"):
        span_hidden_states(model, [[1, 2]], [(0, 3)], layers=[0])


def test_empty_spans_count_nothing_and_leave_no_hook(small_llama):
    model, tokenizer = small_llama
    seqs = [tokenizer("One two three", add_special_tokens=False)["input_ids"]] * 2
    hooks = [len(block._forward_hooks) for block in decoder_layers(model)]
    sums, counts, norm_sums = span_hidden_states(model, seqs, [(1, 1), (0, 0)], layers=[1])
    assert counts.tolist() == [0, 0]
    assert not bool(sums.any()) and not bool(norm_sums.any())
    assert [len(block._forward_hooks) for block in decoder_layers(model)] == hooks


def test_batched_generation_equals_one_prompt_at_a_time(small_llama):
    model, tokenizer = small_llama
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
               for text in ("Hi", "Tell me about the sea and the sky", "What now?")]
    batches = []
    together = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=2,
                                  progress=False,
                                  steer_weights=lambda a, b: batches.append((a, b)))
    alone = [generate_responses(model, tokenizer, [p], max_new_tokens=6, progress=False)[0]
             for p in prompts]
    assert together == alone
    assert batches == [(0, 2), (2, 3)]
    stop = eos_ids(model, tokenizer)
    assert all(len(r) <= 6 and not stop & set(r) for r in together)
