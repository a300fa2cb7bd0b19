"""emokern.vllm.internals: each touch point on vLLM's internals against the installed vLLM
(skipped without it), the version check, the request-id formats (no vLLM needed)."""

import inspect

import pytest

from emokern.vllm import internals
from emokern.vllm.internals import Argument, check_version, derived_index, external_id

try:
    import vllm
    import vllm.sampling_params  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM (make test-vllm)")


# ---------------------------------------------------------------------------- version


def test_version_check_accepts_the_supported_and_refuses_others(monkeypatch):
    monkeypatch.delenv(internals.ANY_VERSION_ENV, raising=False)
    for version in (*internals.TESTED_VLLM, "0.32.9", "0.32.0+cpu"):
        assert check_version(version) == version
    for version in ("0.31.2", "0.33.0", "1.0.0", "not-a-version"):
        with pytest.raises(RuntimeError) as info:
            check_version(version)
        message = str(info.value)
        assert message.startswith("emokern.vllm: the installed vLLM is " + version)
        assert internals.SUPPORTED_VLLM in message and internals.ANY_VERSION_ENV in message
    monkeypatch.setenv(internals.ANY_VERSION_ENV, "1")  # the escape hatch
    assert check_version("0.33.0") == "0.33.0"


@needs_vllm
def test_the_installed_vllm_is_supported(monkeypatch):
    monkeypatch.delenv(internals.ANY_VERSION_ENV, raising=False)
    assert check_version() == vllm.__version__


# ---------------------------------------------------------------------------- arguments


def _method(self, a, b=3, *, c=None):
    return a, b, c


def test_arguments_are_found_by_name_wherever_passed():
    a, b, c = (Argument(_method, n) for n in "abc")
    assert (a.index, b.index, c.index) == (0, 1, None)
    assert a.get((1, 2), {}) == 1 and b.get((1, 2), {}) == 2 and b.get((1,), {}) == 3
    assert b.get((1,), {"b": 5}) == 5 and c.get((1,), {"c": 7}) == 7 and c.get((1,), {}) is None
    assert b.put((1, 2), {}, 9) == ((1, 9), {}) and b.put((1,), {}, 9) == ((1,), {"b": 9})
    assert c.put((1,), {}, 4) == ((1,), {"c": 4})
    with pytest.raises(RuntimeError, match="has no parameter 'd'"):
        Argument(_method, "d")


# ---------------------------------------------------------------------------- wrapped methods


@needs_vllm
@pytest.mark.parametrize("name", sorted(internals.WRAPS))
def test_each_wrapped_method_exists_with_its_arguments(name):
    spec = internals.WRAPS[name]
    owner = spec.owner()
    if owner is None:
        assert spec.optional
        pytest.skip(f"this vLLM build has no {spec.cls}")
    method = owner.__dict__.get(spec.method)
    assert callable(method), f"{spec.cls}.{spec.method}"
    original = getattr(method, "__wrapped__", method)  # wrapped when the plugin loaded
    params = list(inspect.signature(original).parameters)
    assert params[0] == "self"
    for arg in spec.arguments:
        assert arg in params, f"{spec.cls}.{spec.method} lost {arg!r}"
        Argument(original, arg)


@needs_vllm
def test_wrapping_is_idempotent_and_keeps_the_signature():
    from emokern.vllm.plugin import register

    register()
    register()
    for spec in internals.WRAPS.values():
        owner = spec.owner()
        if owner is None:
            continue
        method = owner.__dict__[spec.method]
        assert getattr(method, "_emokern", False)
        assert not getattr(method.__wrapped__, "_emokern", False)  # wrapped once
        assert inspect.signature(method) == inspect.signature(method.__wrapped__)


@needs_vllm
def test_request_init_salt_argument_by_name():
    from vllm.v1.request import Request

    init = getattr(Request.__init__, "__wrapped__", Request.__init__)
    salt = Argument(init, "cache_salt")
    params = Argument(init, "sampling_params")
    names = list(inspect.signature(init).parameters)
    assert salt.index == names.index("cache_salt") - 1
    assert params.index == names.index("sampling_params") - 1


@needs_vllm
def test_worker_method_is_added():
    from vllm.v1.worker.worker_base import WorkerBase

    from emokern.vllm.plugin import READINGS_METHOD, register

    register()
    assert callable(getattr(WorkerBase, READINGS_METHOD))


# ---------------------------------------------------------------------------- fields read


def _assigned_in_init(cls) -> set[str]:
    source = inspect.getsource(cls.__init__)
    return {f for f in dir(cls)} | {line.split("self.", 1)[1].split()[0].split(":")[0]
                                    .split("=")[0].split(".")[0]
                                    for line in source.splitlines() if "self." in line}


@needs_vllm
def test_batch_fields_exist():
    from vllm.v1.worker.gpu_input_batch import InputBatch

    found = _assigned_in_init(InputBatch)
    for field in internals.BATCH_FIELDS:
        assert field in found, f"InputBatch.{field}"


@needs_vllm
def test_runner_fields_exist():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    found = _assigned_in_init(GPUModelRunner)
    for field in internals.RUNNER_FIELDS:
        assert field in found, f"GPUModelRunner.{field}"


@needs_vllm
def test_request_state_and_scheduler_output_fields_exist():
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    for cls, fields in ((CachedRequestState, internals.REQUEST_STATE_FIELDS),
                        (SchedulerOutput, internals.SCHEDULER_OUTPUT_FIELDS)):
        names = {f.name for f in dataclasses.fields(cls)}
        for field in fields:
            assert field in names, f"{cls.__name__}.{field}"


@needs_vllm
def test_config_fields_exist():
    import dataclasses

    from vllm.config import SchedulerConfig, VllmConfig

    assert "additional_config" in {f.name for f in dataclasses.fields(VllmConfig)}
    assert "scheduler_config" in {f.name for f in dataclasses.fields(VllmConfig)}
    from vllm.config import DeviceConfig

    assert "device_config" in {f.name for f in dataclasses.fields(VllmConfig)}
    assert DeviceConfig(device="cpu").device_type == "cpu"  # internals.device_type reads it
    sched = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert {"max_num_seqs", "max_num_batched_tokens"} <= sched


@needs_vllm
def test_server_side_touch_points():
    from vllm.exceptions import VLLMValidationError

    error = internals.validation_error("bad", "vllm_xargs.emotion")
    assert isinstance(error, VLLMValidationError) and "bad" in str(error)
    assert callable(internals.api_server_main())
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer k1")], "path": "/v1/x",
             "method": "POST"}
    assert internals.api_key_ok(scope, ["k1"])
    assert not internals.api_key_ok(scope, ["k2"])


# ---------------------------------------------------------------------------- request ids


def test_external_id_strips_the_engine_suffix():
    assert external_id("cmpl-1-0-0a1b2c3d") == "cmpl-1-0"
    assert external_id("7") == "7" and external_id("x-0A1B2C3D") == "x-0A1B2C3D"


@pytest.mark.parametrize("request_id, expected", [
    ("cmpl-1", (0, 0)), ("cmpl-1-3", (0, 3)), ("cmpl-1_3", (0, 3)), ("2_cmpl-1", (2, 0)),
    ("2_cmpl-1-3", (2, 3)), ("cmpl-10", None), ("x_cmpl-1", None), ("cmpl-1-", None)])
def test_derived_ids_decode(request_id, expected):
    assert derived_index(request_id, "cmpl-1") == expected


def test_request_id_round_trip():
    base = "chatcmpl-a.b+c"  # regex characters are literal
    for sample in range(3):
        for prompt in range(3):
            external = f"{sample}_{base}-{prompt}"
            internal = f"{external}-deadbeef"
            assert derived_index(external_id(internal), base) == (sample, prompt)


def test_additional_config_of_any_holder():
    from types import SimpleNamespace

    holder = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={"emokern": {}}))
    assert internals.additional_config(holder) == {"emokern": {}}
    assert internals.additional_config(None) is None
