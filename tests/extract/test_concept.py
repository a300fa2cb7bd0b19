"""Method concept on tiny random models: the token span of a concept, the category means minus
their mean, bad arguments."""

import pytest
import torch

from emokern.data import load_concepts
from emokern.extract import concept_token_span, extract_concept


def test_concept_token_span_covers_the_concept(small_llama):
    _, tokenizer = small_llama
    for carrier in load_concepts()["carriers"]:
        for word in ("joy", "a scream in the dark", "self-respect", "a neighbour's new car"):
            ids, a, b = concept_token_span(tokenizer, carrier, word)
            assert tokenizer.decode(ids[a:b]).strip() == word
    with pytest.raises(ValueError, match="exactly one"):
        concept_token_span(tokenizer, "no slot here", "joy")


def test_concept_shapes_centering_and_pooling(small_gpt2):
    model, tokenizer = small_gpt2
    cats = ["joy", "fear", "anger"]
    last = extract_concept(model, tokenizer, categories=cats, progress=False, baseline=False)
    mean = extract_concept(model, tokenizer, categories=cats, pooling="mean", layers=[1],
                           progress=False, baseline=False)
    assert last.vectors.shape == (3, 3, 32) and last.names == cats
    torch.testing.assert_close(last.vectors.sum(dim=1), torch.zeros(3, 32), atol=1e-5, rtol=0)
    assert mean.layers == [1] and not torch.allclose(mean.vectors[0], last.vectors[1])
    assert last.metadata["method"] == "concept" and last.metadata["pooling"] == "last"
    custom = extract_concept(model, tokenizer, categories={"a": ["sun", "smile"],
                                                           "b": ["rain", "storm"]},
                             carriers=["It was {concept}."], progress=False, baseline=False)
    torch.testing.assert_close(custom.vectors[:, 0], -custom.vectors[:, 1])
    assert custom.metadata["source"] == "custom"


def test_concept_vector_is_category_mean_minus_mean_of_categories(small_llama):
    model, tokenizer = small_llama
    cats = {"a": ["sun"], "b": ["rain"], "c": ["a storm"]}
    carrier = "It was {concept} again."
    bank = extract_concept(model, tokenizer, categories=cats, carriers=[carrier], layers=[1],
                           progress=False, baseline=False)
    states = []
    for words in cats.values():
        ids, _, b = concept_token_span(tokenizer, carrier, words[0])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        states.append(out.hidden_states[2][0, b - 1])
    states = torch.stack(states)
    torch.testing.assert_close(bank.vectors[0], states - states.mean(dim=0), atol=1e-5,
                               rtol=1e-4)


def test_concept_bad_input(small_llama):
    model, tokenizer = small_llama
    with pytest.raises(ValueError, match="unknown category"):
        extract_concept(model, tokenizer, categories=["joy", "glee"])
    with pytest.raises(ValueError, match="at least 2 categories"):
        extract_concept(model, tokenizer, categories=["joy"])
    with pytest.raises(ValueError, match="exactly one"):
        extract_concept(model, tokenizer, categories=["joy", "fear"], carriers=["no slot"])
    with pytest.raises(ValueError, match="pooling must be"):
        extract_concept(model, tokenizer, categories=["joy", "fear"], pooling="max")
    with pytest.raises(ValueError, match="non-empty list"):
        extract_concept(model, tokenizer, categories={"a": [], "b": ["x"]})
