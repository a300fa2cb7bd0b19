"""The readings' neutral baseline and the detection layers, on tiny models: the statistics are
the ones the module defines, the vectors are never touched, Method EV stores its baseline."""

import numpy as np
import pytest
import torch
from helpers import random_bank

from emokern.extract import (
    detection_accuracy,
    extract_ev,
    neutral_baseline,
    neutral_stats,
)
from emokern.extract.neutral_readings import neutral_prompts
from emokern.models import decoder_layers, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = ["How was your weekend?", "Tell me about your morning commute.",
           "What do you think about rainy days?", "How do you feel about Mondays?"]


def test_neutral_stats_by_hand():
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(5, 2, 8, generator=g)
    counts = torch.tensor([3, 1, 4, 0, 2])
    vectors = torch.randn(2, 3, 8, generator=g)
    mean, std = neutral_stats(sums, counts, vectors)
    assert mean.shape == std.shape == (2, 3)
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    keep = counts > 0  # the response without tokens is skipped
    proj = torch.einsum("nld,lkd->nlk", sums[keep].double(), unit.double())
    torch.testing.assert_close(mean.double(), proj.sum(0) / counts[keep].sum(), rtol=1e-6,
                               atol=1e-6)
    per = proj / counts[keep].double()[:, None, None]
    torch.testing.assert_close(std.double(), per.std(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        neutral_stats(sums[:1], counts[:1], vectors)


def test_detection_accuracy_reads_standard_scores(small_llama):
    model, _ = small_llama
    bank = random_bank(model)  # joy, sadness, fear
    mean = torch.zeros(bank.n_layers, 3)
    std = torch.ones(bank.n_layers, 3)
    bank = bank.replace(neutral_mean=mean, neutral_std=std)
    unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
    # Each text lies along its emotion's direction at layer 0 and along the opposite at the
    # others: perfect detection at layer 0 only.
    labels = ["joy", "fear", "sadness", "anger"]  # anger is not in the bank: skipped
    states = torch.zeros(4, bank.n_layers, bank.dim)
    for i, y in enumerate(labels[:3]):
        k = bank.index(y)
        states[i, 0] = 10 * unit[0, k]
        states[i, 1:] = -10 * unit[1:, k]
    accuracy = detection_accuracy(states, labels, bank)
    assert float(accuracy[0]) == 1.0 and float(accuracy[1:].max()) < 1.0


def test_neutral_baseline_keeps_the_vectors(small_llama):
    model, tokenizer = small_llama
    bank = random_bank(model)
    calibrated = neutral_baseline(model, tokenizer, bank, queries=QUERIES, max_new_tokens=6,
                                  progress=False)
    assert torch.equal(calibrated.vectors, bank.vectors)
    assert calibrated.calibrated and calibrated.neutral_mean.shape == (bank.n_layers, 3)
    assert bool((calibrated.neutral_std > 0).all())
    meta = calibrated.metadata
    assert meta["neutral"]["responses"] >= 2 and meta["neutral"]["source"] == "custom"
    assert len(meta["detection_layers"]) == 3
    assert set(map(int, meta["detection_accuracy"])) == set(bank.layers)
    assert len(neutral_prompts(tokenizer, QUERIES)) == 4


def _eos_list(model) -> list:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]


def _answer_alone(model, tokenizer, prompt, max_new_tokens):
    """The greedy answer to one prompt, generated alone (no batch, no padding), cut before the
    first end-of-sequence token."""
    stop = {tokenizer.eos_token_id, *_eos_list(model)}
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
    answer = out[0, len(prompt):].tolist()
    return answer[:next((i for i, t in enumerate(answer) if t in stop), len(answer))]


def _layer_outputs(model, ids):
    """The output of every decoder layer for one unpadded sequence, ``[L, T, D]`` float64,
    captured by this test's own hooks (``hidden_states`` of the last layer is taken after the
    final norm, not at the layer's output)."""
    captured = {}
    layers = decoder_layers(model)

    def hook(index):
        def grab(module, args, output):
            captured[index] = (output if isinstance(output, torch.Tensor) else output[0])[0]
        return grab

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(len(layers))]).double()


@pytest.fixture(scope="module")
def talkative_llama():
    """A 3-layer tiny Llama whose greedy answers vary: its own random, untied output head (the
    shared tiny models, with tied embeddings, repeat the prompt's last token forever)."""
    model, tokenizer = tiny_model("llama", num_layers=3, hidden_size=32)
    generator = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape,
                                                          generator=generator))
    model.config.tie_word_embeddings = False
    return model, tokenizer


def test_neutral_baseline_end_to_end_by_hand(talkative_llama, monkeypatch):
    """neutral_baseline recomputed from scratch on a tiny model: each query's greedy answer
    generated alone, the answer's tokens read at the output of every decoder layer, projected
    in float64 onto the unit vectors; the mean over all answer tokens and the spread (n - 1) of
    the per-answer means, per layer and emotion. The bank's layers are a subset in another
    order, so a baseline row or column put at the wrong layer or emotion shows; answers of
    different lengths tell a token-weighted mean from a mean of answer means."""
    model, tokenizer = talkative_llama
    bank = random_bank(model).select(["fear", "joy", "sadness"], layers=[2, 0])
    max_new = 5
    prompts = neutral_prompts(tokenizer, QUERIES)
    # The random model never ends an answer by itself: make the third token of the first
    # answer an end-of-sequence token, so that answers stop at different lengths.
    stop = _answer_alone(model, tokenizer, prompts[0], max_new)[2]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [*_eos_list(model), stop])
    calibrated = neutral_baseline(model, tokenizer, bank, queries=QUERIES,
                                  max_new_tokens=max_new, detect=False, progress=False)
    per_answer, tokens = [], []
    for prompt in prompts:
        answer = _answer_alone(model, tokenizer, prompt, max_new)
        if not answer:
            continue
        states = _layer_outputs(model, prompt + answer)[:, len(prompt):]  # [L_model, n, D]
        rows = []
        for i, layer in enumerate(bank.layers):
            v = bank.vectors[i].double().numpy()
            unit = v / np.linalg.norm(v, axis=1, keepdims=True)  # [K, D]
            rows.append(states[layer].numpy() @ unit.T)  # [n, K]
        proj = np.stack(rows)  # [L, n, K]
        per_answer.append(proj.sum(axis=1))
        tokens.append(len(answer))
    assert len(tokens) >= 3 and len(set(tokens)) > 1, tokens
    sums, counts = np.stack(per_answer), np.array(tokens, dtype=np.float64)  # [N, L, K], [N]
    mean = sums.sum(axis=0) / counts.sum()
    spread = (sums / counts[:, None, None]).std(axis=0, ddof=1)
    np.testing.assert_allclose(calibrated.neutral_mean.double().numpy(), mean, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(calibrated.neutral_std.double().numpy(), spread, rtol=1e-4,
                               atol=1e-5)
    assert calibrated.metadata["neutral"]["responses"] == len(tokens)
    assert calibrated.metadata["neutral"]["tokens"] == int(counts.sum())
    # Every layer and emotion has its own baseline (else a wrong index could pass).
    assert len(np.unique(np.round(mean, 6))) == mean.size
    assert len(np.unique(np.round(spread, 6))) == spread.size
    # Each answer's standard scores, by hand against that baseline, and through the bank.
    z = (sums / counts[:, None, None] - mean) / spread
    got = calibrated.standardize(torch.tensor(sums / counts[:, None, None], dtype=torch.float32),
                                 calibrated.layers)
    np.testing.assert_allclose(got.double().numpy(), z, rtol=1e-4, atol=1e-4)


def test_ev_extraction_stores_its_neutral_baseline(small_llama):
    model, tokenizer = small_llama
    bank = extract_ev(model, tokenizer, emotions=["joy", "fear"], queries=QUERIES,
                      max_new_tokens=6, progress=False)
    assert bank.calibrated and bank.neutral_std.shape == (bank.n_layers, 2)
    assert bank.metadata["neutral"]["responses"] >= 2
    assert set(bank.detection_layers) <= set(bank.layers)
