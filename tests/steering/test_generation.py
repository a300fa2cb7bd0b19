"""The :func:`emokern.steering.generate` convenience: prompts and mixes in, texts and readings
out."""

from __future__ import annotations

import math

import pytest
from helpers import NAMES
from steering_helpers import greedy

from emokern.steering import generate
from emokern.tokens import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_convenience(llama):
    model, tokenizer, bank = llama
    rows = generate(model, tokenizer, bank, "Tell me a story.", [{"joy": 2.0}, "fear=1", {}],
                    max_new_tokens=5, layers=[1, 2])
    assert [r["mix"] for r in rows] == [{"joy": 2.0}, {"fear": 1.0}, {}]
    for row in rows:
        assert row["prompt"] == "Tell me a story."
        assert isinstance(row["text"], str) and 1 <= row["n_tokens"] <= 5
        assert set(row["projections"]) == set(NAMES)
        assert all(math.isfinite(v) for v in row["projections"].values())
    # The empty mix's row is the unsteered generation.
    encoded = encode_prompts(tokenizer, ["Tell me a story."] * 3)
    plain = greedy(model, tokenizer, encoded, new_tokens=5)[2]
    assert rows[2]["text"] == tokenizer.decode(plain[:rows[2]["n_tokens"]],
                                               skip_special_tokens=True)
    with pytest.raises(ValueError, match="2 prompts and 3 mixes"):
        generate(model, tokenizer, bank, ["a", "b"], [{}, {}, {}], max_new_tokens=2)
