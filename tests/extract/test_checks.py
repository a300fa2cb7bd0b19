"""Argument checks shared by the extraction methods."""

import pytest

from emokern.extract.checks import check_layers, check_names, check_positive_int


def test_check_layers():
    assert check_layers(None, 3) == [0, 1, 2]
    assert check_layers(2, 3) == [2]
    assert check_layers((2, 0), 3) == [0, 2]
    with pytest.raises(TypeError, match="None or a sequence of ints"):
        check_layers(1.5, 3)
    with pytest.raises(ValueError, match="must not be empty"):
        check_layers([], 3)
    with pytest.raises(TypeError, match="must hold ints, got True"):
        check_layers([True], 3)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 3\)"):
        check_layers([-1], 3)
    with pytest.raises(ValueError, match="must not repeat"):
        check_layers([1, 1], 3)


def test_check_names_and_positive_ints():
    assert check_names(("b", "a"), ["a", "b"], "emotions", "emotion") == ["b", "a"]
    with pytest.raises(TypeError, match=r"e.g. \['a'\]"):
        check_names("a", ["a"], "emotions", "emotion")
    with pytest.raises(TypeError, match="got int"):
        check_names(3, ["a"], "emotions", "emotion")
    with pytest.raises(TypeError, match="must hold str names"):
        check_names(["a", 1], ["a"], "emotions", "emotion")
    with pytest.raises(ValueError, match="emotions must not be empty"):
        check_names([], ["a"], "emotions", "emotion")
    with pytest.raises(ValueError, match=r"categories has unknown category \['c'\]; known: a, b"):
        check_names(["c"], ["a", "b"], "categories", "category")
    assert check_positive_int(2, "batch_size") == 2
    with pytest.raises(TypeError, match="batch_size must be an int, got bool"):
        check_positive_int(True, "batch_size")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        check_positive_int(0, "batch_size")
