"""Mixes: the grammar (:func:`parse_mix`, :func:`format_mix`, :func:`normalize_mix`) and what
the op reads (:func:`mix_to_edits`, :func:`mix_to_weights`, :func:`raw_bounds`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from emokern.bank import Recipe
from emokern.steering import mix_to_weights, parse_mix
from emokern.steering.mix import edit_scope, format_mix, mix_to_edits, normalize_mix, raw_bounds

INF = math.inf
NAMES = ["joy", "sadness", "fear"]


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


# ---------------------------------------------------------------------------- the grammar

#: Each term of the grammar, its text and its object form.
TERMS = [
    ("joy=2", {"joy": 2.0}),
    ("anger=rec", {"anger": "rec"}),
    ("sadness@1.5", {"sadness": {"level": 1.5}}),
    ("fear=erase", {"fear": {"level": 0.0}}),
    ("anger<=0.5", {"anger": {"max": 0.5}}),
    ("joy>=1", {"joy": {"min": 1.0}}),
    ("surprise=1,surprise>=-1", {"surprise": {"weight": 1.0, "min": -1.0}}),
    ("joy=rec,joy<=2,joy>=-0.5", {"joy": {"weight": "rec", "min": -0.5, "max": 2.0}}),
    ("joy>=1,joy<=1", {"joy": {"min": 1.0, "max": 1.0}}),
]


@pytest.mark.parametrize("text, expected", TERMS)
def test_every_term_in_text_json_and_back(text, expected):
    assert parse_mix(text) == expected
    assert parse_mix(format_mix(expected)) == expected
    assert parse_mix(json.dumps(expected)) == expected
    assert normalize_mix(expected) == expected


def test_the_object_form_and_its_spellings():
    given = {"joy": 2, "sadness": {"level": 1.5}, "anger": {"max": 0.5}, "fear": "erase",
             "surprise": {"weight": 1, "min": -1}, "disgust": {}}
    normal = {"joy": 2.0, "sadness": {"level": 1.5}, "anger": {"max": 0.5},
              "fear": {"level": 0.0}, "surprise": {"weight": 1.0, "min": -1.0}}
    assert normalize_mix(given) == normal  # an empty dict is no edit: dropped
    assert parse_mix(json.dumps(given)) == normal
    assert format_mix(given) == ("joy=2,sadness@1.5,anger<=0.5,fear=erase,surprise=1,"
                                 "surprise>=-1")
    assert normalize_mix({"joy": {"weight": 2}}) == {"joy": 2.0}
    assert format_mix({"joy": 0.1, "fear": -1e-7}) == "joy=0.1,fear=-1e-07"
    assert parse_mix(" joy = 2 , sadness @ -1 , fear >= 0 ") == {
        "joy": 2.0, "sadness": {"level": -1.0}, "fear": {"min": 0.0}}
    assert format_mix({}) == "" and parse_mix("{}") == {}


@pytest.mark.parametrize("text, message", [
    ("joy@1,joy=2", r"'joy' .*has a level and a push"),
    ("fear=erase,fear<=1", r"'fear' .*has a level and a cap"),
    ("joy@1,joy@2", r"'joy' is given twice as a level"),
    ("fear=erase,fear@1", r"'fear' is given twice as a level"),
    ("joy<=1,joy<=2", r"'joy' is given twice as a cap"),
    ("joy=rec,joy=1", r"'joy' is given twice as a push"),
    ("joy>=2,joy<=1", r"'joy' .*has a floor above its cap \(min 2.0 > max 1.0\)"),
    ("joy<2", "bad term"), ("joy=>2", "must be a number"), ("@1", "bad term"),
    ("joy@rec", "'rec' goes after '='"), ("joy<=erase", "'erase' goes after '='"),
    ("joy@x", "level of 'joy' must be a number"), ("joy<=inf", "cap of 'joy' must be finite"),
    ("joy>=1e39", "floor of 'joy' is 1e39, outside float32"),
    ("{bad", "not valid JSON"), ('{"joy": {"lvl": 1}}', r"unknown field\(s\) \['lvl'\]"),
    ('{"joy": {"level": 1, "weight": 2}}', "has a level and a push"),
])
def test_malformed_or_conflicting_terms_are_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(text)


def test_batches_become_weights_and_z_bounds():
    weights, bounds = mix_to_edits(
        [{"joy": 2, "sadness": {"level": 1.5}}, "fear<=0.5,joy=-1,joy>=-1", {}], NAMES)
    assert weights.dtype == torch.float32 and bounds.dtype == torch.float32
    assert weights.tolist() == [[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert bounds.shape == (3, 2, 3) and bounds.is_contiguous()
    assert bounds[0].tolist() == [[-INF, 1.5, -INF], [INF, 1.5, INF]]
    assert bounds[1].tolist() == [[-1.0, -INF, -INF], [INF, INF, 0.5]]
    assert bounds[2].isinf().all()
    assert mix_to_edits([{"joy": 1}], NAMES)[1] is None  # pushes only: no bounds at all
    assert mix_to_edits(torch.ones(2, 3), NAMES)[1] is None


def test_rec_is_the_recipe_a_push_or_a_level():
    recipes = {"joy": Recipe("joy", "level", 2.0, (1,), bank_layers=(1,)),
               "fear": Recipe("fear", "push", 3.0, (1,), bank_layers=(1,))}
    weights, bounds = mix_to_edits([{"joy": "rec", "fear": "rec"}, "fear=rec,fear<=1"], NAMES,
                                   recommended=recipes.__getitem__)
    assert weights.tolist() == [[0.0, 0.0, 3.0], [0.0, 0.0, 3.0]]
    assert bounds[0, :, 0].tolist() == [2.0, 2.0] and bounds[1, :, 2].tolist() == [-INF, 1.0]
    assert normalize_mix("joy=rec", recommended=recipes.__getitem__) == {"joy": {"level": 2.0}}
    # A push weight, as bank.recommended_weight gives, works too.
    assert mix_to_weights([{"joy": "rec"}], NAMES, recommended=lambda n: 4.0)[0, 0] == 4.0
    with pytest.raises(ValueError, match=r"mix\[0\]\['joy'\] is 'rec', and the recipe of "
                                         r"'joy' is a level \(z = 2\), which cannot go with a "
                                         r"floor"):
        mix_to_edits(["joy=rec,joy>=0"], NAMES, recommended=recipes.__getitem__)
    with pytest.raises(ValueError, match=r"target\[0\]\['joy'\] is 'joy@2', a level, bound"):
        mix_to_weights([{"joy": "rec"}], NAMES, "target", recommended=recipes.__getitem__)
    with pytest.raises(ValueError, match="no bank gives recommended weights"):
        mix_to_edits([{"joy": {"weight": "rec", "max": 1}}], NAMES)


def test_scope_text_and_object_forms_round_trip():
    """A scope (layers, positions) rides on an emotion's terms in both forms, is written once
    by format_mix (layer runs as ranges) and reads back the same."""
    text = "anger[12;generated]=1,anger<=2,joy[10-12,14]@1.5,fear=0.5"
    parsed = parse_mix(text)
    assert parsed == {"anger": {"weight": 1.0, "max": 2.0, "layers": [12],
                                "positions": "generated"},
                      "joy": {"level": 1.5, "layers": [10, 11, 12, 14]}, "fear": 0.5}
    assert format_mix(parsed) == text and parse_mix(format_mix(parsed)) == parsed
    # the object form: one layer as an int, positions "all" is the default and dropped
    assert normalize_mix({"anger": {"weight": 1, "layers": 12, "positions": "all"}}) == \
        {"anger": {"weight": 1.0, "layers": [12]}}
    assert format_mix('{"fear": {"level": 0, "positions": "prompt"}}') == "fear[prompt]=erase"
    for bad, message in (("anger[12]=1,anger[13]<=1", "two different scopes"),
                         ("anger[x]=1", "neither a position"), ("anger[3-1]=1", "backwards"),
                         ("anger[1;2]=1", "layers twice"), ("[1]=2", "bad scope"),
                         ("anger[1,1]=1", "twice"), ("joy[1]=1,joy@2", "a level and a push")):
        with pytest.raises(ValueError, match=message):
            parse_mix(bad)
    for bad, message in (({"anger": {"layers": [1]}}, "a scope .* but no edit"),
                         ({"anger": {"weight": 1, "layers": [-1]}}, "indices >= 0"),
                         ({"anger": {"weight": 1, "positions": "some"}}, "must be one of")):
        with pytest.raises(ValueError, match=message):
            normalize_mix(bad)


def test_rec_brings_the_recipes_scope():
    """A recipe off the bank's recommended layers (or on some tokens only) carries its band
    and positions into the mix; a scope written beside 'rec' wins over the recipe's."""
    recipes = {"joy": Recipe("joy", "push", 2.0, (3, 4), "generated", bank_layers=(1,)),
               "fear": Recipe("fear", "level", 1.0, (1,), bank_layers=(1,))}
    assert normalize_mix("joy=rec,fear=rec", recommended=recipes.__getitem__) == {
        "joy": {"weight": 2.0, "layers": [3, 4], "positions": "generated"},
        "fear": {"level": 1.0}}
    assert normalize_mix("joy[all]=rec", recommended=recipes.__getitem__) == {
        "joy": {"weight": 2.0, "layers": [3, 4]}}
    with pytest.raises(ValueError, match="a level, bound or scope"):
        mix_to_weights(["joy=rec"], NAMES, recommended=recipes.__getitem__)


def test_edit_scope_factor_per_position_kind_and_layer():
    """s[b, p, l, k]: 1/|layers| of the term (divide) inside its layers and positions, 0
    outside; unscoped terms spread over the band; None when nothing is scoped."""
    normals = [{"fear": {"weight": 1.0, "layers": [6], "positions": "generated"}, "joy": 2.0},
               {"joy": {"max": 1.0, "layers": [4, 6]}}]
    scope = edit_scope(normals, NAMES, layers=[4, 5, 6], band=[4, 5])
    assert scope.shape == (2, 2, 3, 3)
    assert scope[0, :, :, 2].tolist() == [[0, 0, 0], [0, 0, 1.0]]          # fear: gen., 6
    assert scope[0, :, :, 0].tolist() == [[0.5, 0.5, 0]] * 2                  # joy: the band
    assert scope[1, :, :, 0].tolist() == [[0.5, 0, 0.5]] * 2                  # joy: [4, 6]
    each = edit_scope(normals, NAMES, layers=[4, 5, 6], band=[4, 5], spread="each")
    assert each[1, 0, :, 0].tolist() == [1.0, 0.0, 1.0]
    assert edit_scope([{"joy": 1.0}], NAMES, layers=[4, 5], band=[4]) is None
    with pytest.raises(ValueError, match=r"mix\[0\]\['fear'\] steers layers \[6\], which this "
                                         r"steerer does not steer \(it steers \[4, 5\]\)"):
        edit_scope(normals, NAMES, layers=[4, 5], band=[4, 5])
    with pytest.raises(ValueError, match="steers generated tokens, and this steerer steers "
                                         "only prompt tokens"):
        edit_scope(normals, NAMES, layers=[4, 5, 6], band=[4], positions="prompt")


def test_every_bad_row_names_its_row_emotion_and_field():
    for mix, exc, message in (
            ([{}, {"joy": {"level": math.nan}}], ValueError,
             r"mix\[1\]\['joy'\]\['level'\] must be finite"),
            ([{"joy": {"max": 1e40}}], ValueError, r"mix\[0\]\['joy'\]\['max'\] is 1e\+40, "
                                                  r"outside float32's finite range"),
            ([{"joy": {"min": True}}], TypeError, r"mix\[0\]\['joy'\]\['min'\] must be a "
                                                  r"number, got bool"),
            ([{"joy": "lots"}], TypeError, r"mix\[0\]\['joy'\] must be a number, 'rec', "
                                           r"'erase' or a dict"),
            ([{"joy": [1]}], TypeError, r"mix\[0\]\['joy'\] must be a number"),
            ([{"joy": {"min": 1, "max": 0}}], ValueError, r"mix\[0\]\['joy'\] has a floor "
                                                          r"above its cap"),
            ([{}, "rage=1"], ValueError, r"mix\[1\] names unknown emotion 'rage'"),
            ([{}, "joy=="], ValueError, r"mix\[1\]: weight of 'joy' must be a number"),
            ([5], TypeError, r"mix\[0\] must be a dict"),
            ("joy=1", TypeError, "must be a list with one dict per sequence")):
        with pytest.raises(exc, match=message):
            mix_to_edits(mix, NAMES)


def test_raw_bounds_per_layer():
    z = mix_to_edits(["sadness@1.5,fear<=-1", {}], NAMES)[1]
    mean = torch.tensor([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]])
    std = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    one = raw_bounds(z, mean[1], std[1])
    assert one.shape == (2, 2, 3) and one.dtype == torch.float32
    assert one[0].tolist() == [[-INF, 20.75, -INF], [INF, 20.75, 29.5]]
    assert one[1].isinf().all()
    both = raw_bounds(z, mean, std)
    assert both.shape == (2, 2, 2, 3) and torch.equal(both[1], one)
    assert both[0, 0, :, 1].tolist() == [4.0, 4.0]
    with pytest.raises(ValueError, match=r"mix\[0\]\['sadness'\]: z = 1.5 is .* at layer 7, "
                                         r"outside float32's finite range"):
        raw_bounds(z, mean, torch.tensor([[1.0] * 3, [3e38] * 3]), names=NAMES, layers=[3, 7])
