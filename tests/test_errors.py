"""emokern.errors: one message format for every entry point."""

import pytest

from emokern.errors import fail, failing


def test_fail_prefixes_the_entry_point():
    with pytest.raises(ValueError, match=r"^emokern\.steer: weights must be finite$"):
        fail(ValueError, "weights must be finite", "emokern.steer")


def test_failing_binds_the_entry_point_and_keeps_the_type():
    bank_fail = failing("EmotionBank")
    with pytest.raises(TypeError, match=r"^EmotionBank: layers must be ints$"):
        bank_fail(TypeError, "layers must be ints")
    with pytest.raises(KeyError):
        bank_fail(KeyError, "no such emotion")


def test_a_bound_helper_can_still_name_another_caller():
    with pytest.raises(ValueError, match=r"^emokern\.vllm: layers"):
        failing("emokern.steer")(ValueError, "layers", "emokern.vllm")
