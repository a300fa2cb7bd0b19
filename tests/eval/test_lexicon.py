"""The NRC EmoLex scorer: word list from the nrclex package, tokenizer-free counting."""

import numpy as np
import pytest

from emokern.eval.lexicon import LexiconScorer, load_emolex


@pytest.fixture(scope="module")
def lexicon():
    return LexiconScorer()


def test_word_list_is_emolex():
    words = load_emolex()
    assert len(words) > 6000
    assert "fear" in words["afraid"] and "joy" in words["happy"]
    assert all(isinstance(tags, frozenset) for tags in words.values())


def test_densities_and_shares_make_sense(lexicon):
    texts = ["I am so happy and cheerful today, what a delightful party!",
             "I was afraid and terrified of the horrible monster.",
             "The table has four legs.", ""]
    d = lexicon.score(texts)
    p = lexicon.probabilities(texts)
    assert d.shape == p.shape == (4, 6) and d.dtype == np.float32
    joy, fear = lexicon.column("joy"), lexicon.column("fear")
    assert d[0].argmax() == joy and d[1].argmax() == fear
    assert d[0, joy] > 0.2 and d[1, fear] > 0.2
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    # No tagged word (or no word at all): zero density, uniform share.
    assert (d[2:] == 0).all()
    np.testing.assert_allclose(p[2:], 1 / 6)


def test_inflections_match_their_stem(lexicon):
    assert lexicon.tags("cries") == lexicon.tags("cry") != frozenset()
    assert lexicon.tags("mourned") == lexicon.tags("mourn") != frozenset()
    assert "anger" in lexicon.tags("rages")
    assert lexicon.tags("zzzqqq") == frozenset()


def test_bad_input(lexicon):
    with pytest.raises(ValueError, match="EmoLex's labels"):
        LexiconScorer(emotions=("joy", "boredom"))
    with pytest.raises(TypeError, match="not a single str"):
        lexicon.score("one text")
    with pytest.raises(ValueError, match="emotion must be one of"):
        lexicon.column("trust")
