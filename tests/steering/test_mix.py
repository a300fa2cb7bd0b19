"""Mixes: the text form (:func:`parse_mix`) and the weights the op reads
(:func:`mix_to_weights`)."""

from __future__ import annotations

import pytest
import torch

from emokern.steering import mix_to_weights, parse_mix


def test_parse_mix():
    assert parse_mix("joy=2") == {"joy": 2.0}
    assert parse_mix(" sadness = 1.5 , fear=-0.5 ") == {"sadness": 1.5, "fear": -0.5}
    assert parse_mix("") == {} and parse_mix("none") == {}
    for bad, message in (("joy", "bad term"), ("joy=", "bad term"), ("=1", "bad term"),
                         ("joy=abc", "must be a number"), ("joy=nan", "must be finite"),
                         ("joy=1,joy=2", "twice"), ("joy=1,,fear=2", "bad term")):
        with pytest.raises(ValueError, match=message):
            parse_mix(bad)
    with pytest.raises(TypeError):
        parse_mix({"joy": 1.0})


def test_mix_to_weights_dicts_and_tensors():
    names = ["joy", "sadness", "fear"]
    weights = mix_to_weights([{"fear": 2.0, "joy": -1}, {}], names)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    source = torch.tensor([[0.5, 0.0, 1.0]], dtype=torch.float64)
    copied = mix_to_weights(source, names)
    source[0, 0] = 9.0  # a copy: later changes do not reach the weights
    assert copied.dtype == torch.float32 and copied[0, 0] == 0.5
    with pytest.raises(ValueError, match=r"emokern.steer: rows\[1\] names unknown emotion"):
        mix_to_weights([{}, {"rage": 1.0}], names, argument="rows")
    with pytest.raises(TypeError, match="must be floating point"):
        mix_to_weights(torch.zeros(1, 3, dtype=torch.long), names)


@pytest.mark.parametrize("weight", [1e40, -1e40])
def test_weights_beyond_float32_are_one_clear_error(weight):
    """1e40 is finite in Python but inf in the float32 weights the op reads: refused up front,
    naming the emotion and float32's range, by every form a mix comes in."""
    names = ["joy", "fear"]
    with pytest.raises(ValueError, match=r"mix\[0\]\['fear'\] is -?1e\+40, outside float32's "
                                         r"finite range \[-3\.403e\+38, 3\.403e\+38\]"):
        mix_to_weights([{"joy": 1.0, "fear": weight}], names)
    with pytest.raises(ValueError, match=r"weight of 'fear' .*outside float32's finite range"):
        parse_mix(f"joy=1,fear={weight!r}")
    tensor = torch.tensor([[0.0, weight]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mix\[0, 1\] \('fear'\) is -?1e\+40, outside "
                                         r"float32's finite range"):
        mix_to_weights(tensor, names)
    # The largest float32 itself still fits.
    edge = mix_to_weights([{"fear": -torch.finfo(torch.float32).max}], names)
    assert torch.isfinite(edge).all()
