"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it
starts (front end, engine core, workers). It changes nothing on disk and nothing for engines
that do not set ``additional_config={"emokern": {...}}``; it refuses a vLLM outside the
supported versions (:func:`emokern.vllm.internals.check_version`), adds the worker methods
``emokern_readings`` (what :func:`emokern.vllm.readings` calls) and ``emokern_slots`` (slot
counts for ``/metrics``, :mod:`emokern.vllm.metrics`) and wraps, in memory, the
methods :data:`emokern.vllm.internals.WRAPS` declares:

* the model runners' ``load_model`` — after the model loads (before compilation), an engine
  with emokern enabled wraps its steered decoder layers (:mod:`emokern.vllm.runner`);
* ``_update_states`` — frees the slots of finished requests, restarts resumed ones;
* ``_prepare_inputs`` — after vLLM packs the step's tokens, fills the token → slot index;
* ``InputProcessor._validate_params`` (front end) — the front door: a request whose mix names
  an unknown emotion, a non-finite weight or is malformed, has a level or bound while the
  engine's ``levels`` is off, or any mix sent to an engine without emokern, is refused there
  (vLLM's ``VLLMValidationError``: HTTP 400 with the message), before it can reach a worker;
  an accepted mix is written back in normal form (:func:`emokern.vllm.config.check_mix`), the
  only form the engine core and workers read;
* ``Request.__init__`` (engine core) — gives a steered request a prefix-cache salt per mix
  (pushes, levels and bounds), so KV computed under a mix is reused only by requests with the
  same mix.

Tested in ``tests/vllm/test_internals.py`` (the wraps) and ``tests/vllm/test_engine.py``.
"""

from __future__ import annotations

from emokern.vllm import internals
from emokern.vllm import runner as _runner
from emokern.vllm.config import EXTRA_KEY, EmokernConfig, cache_salt, check_mix, with_mix
from emokern.vllm.metrics import SLOTS_METHOD

__all__ = ["READINGS_METHOD", "register", "steering_of"]

_ATTR = "_emokern_steering"
READINGS_METHOD = "emokern_readings"


def _after_load(load_model, arguments):
    def wrapped(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        setattr(self, _ATTR, _runner.make(self))
        return result

    return wrapped


def _before_update(update_states, arguments):
    scheduler_output = arguments["scheduler_output"]

    def wrapped(self, *args, **kwargs):
        steering = getattr(self, _ATTR, None)
        if steering is not None:
            steering.on_update(scheduler_output.get(args, kwargs))
        return update_states(self, *args, **kwargs)

    return wrapped


def _after_prepare(prepare_inputs, arguments):
    num_scheduled_tokens = arguments["num_scheduled_tokens"]

    def wrapped(self, *args, **kwargs):
        result = prepare_inputs(self, *args, **kwargs)
        steering = getattr(self, _ATTR, None)
        if steering is not None:
            steering.before_forward(self, num_scheduled_tokens.get(args, kwargs))
        return result

    return wrapped


def _salted(init, arguments):
    sampling_params, salt_arg = arguments["sampling_params"], arguments["cache_salt"]

    def wrapped(self, *args, **kwargs):
        params = sampling_params.get(args, kwargs)
        salt = cache_salt(getattr(params, "extra_args", None))
        if salt is not None:
            old = salt_arg.get(args, kwargs)
            args, kwargs = salt_arg.put(args, kwargs, salt if not old else f"{old}|{salt}")
        return init(self, *args, **kwargs)

    return wrapped


_PARAMETER = f"vllm_xargs.{EXTRA_KEY}"


def _checked(validate_params, arguments):
    params = arguments["params"]

    def wrapped(self, *args, **kwargs):
        result = validate_params(self, *args, **kwargs)
        request = params.get(args, kwargs)
        extra = getattr(request, "extra_args", None)
        config = EmokernConfig.from_additional_config(internals.additional_config(self))
        try:
            mix = check_mix(extra, config)
        except (TypeError, ValueError) as exc:
            raise internals.validation_error(str(exc), _PARAMETER) from exc
        if extra and EXTRA_KEY in extra:
            # a new dict: the caller's may be shared by other requests (vLLM clones the
            # parameters only after this check)
            request.extra_args = with_mix(extra, mix)
        return result

    return wrapped


def register() -> None:
    """Check the vLLM version and install the plugin's wrappers in this process
    (idempotent)."""
    internals.check_version()
    internals.add_worker_method(READINGS_METHOD, _worker_readings)
    internals.add_worker_method(SLOTS_METHOD, _worker_slots)
    internals.wrap("validate_params", _checked)
    internals.wrap("request_init", _salted)
    internals.wrap("load_model", _after_load)
    internals.wrap("cpu_load_model", _after_load)
    internals.wrap("update_states", _before_update)
    internals.wrap("prepare_inputs", _after_prepare)


def _worker_readings(worker, req_ids=None, family: bool = False) -> dict:
    """A worker's readings (added to vLLM's ``WorkerBase`` as ``emokern_readings``, so
    ``collective_rpc("emokern_readings")`` reaches it without pickling a function)."""
    steering = steering_of(getattr(worker, "model_runner", None))
    return {} if steering is None else steering.readings(req_ids, family)


def _worker_slots(worker) -> dict | None:
    """A worker's slot counts, ``{"in_use": n, "capacity": m}`` (None when steering is off):
    ``collective_rpc("emokern_slots")``, asked when ``/metrics`` is scraped."""
    steering = steering_of(getattr(worker, "model_runner", None))
    if steering is None:
        return None
    return {"in_use": steering.table.in_use, "capacity": steering.table.capacity}


def steering_of(model_runner):
    """The :class:`~emokern.vllm.runner.EngineSteering` of a model runner (None if off)."""
    return getattr(model_runner, _ATTR, None)
