"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it
starts (front end, engine core, workers). It changes nothing on disk and nothing for engines
that do not set ``additional_config={"emokern": {...}}``; it adds the worker method
``emokern_readings`` (what :func:`emokern.vllm.readings` calls) and wraps, in memory, five
methods:

* the model runners' ``load_model`` — after the model loads (before compilation), an engine
  with emokern enabled wraps its steered decoder layers (:mod:`emokern.vllm.runner`);
* ``_update_states`` — frees the slots of finished requests, restarts resumed ones;
* ``_prepare_inputs`` — after vLLM packs the step's tokens, fills the token → slot index;
* ``InputProcessor._validate_params`` (front end) — a request whose mix names an unknown
  emotion, a non-finite weight or is malformed, or any mix sent to an engine without
  emokern, is refused there (vLLM's ``VLLMValidationError``: HTTP 400 with the message),
  before it can reach a worker;
* ``Request.__init__`` (engine core) — gives a steered request a prefix-cache salt per mix, so
  KV computed under a mix is reused only by requests with the same mix.
"""

from __future__ import annotations

import functools

from emokern.vllm import runner as _runner
from emokern.vllm.config import EmokernConfig, cache_salt, check_mix

__all__ = ["register"]

_ATTR = "_emokern_steering"
# Position of ``cache_salt`` among Request.__init__'s arguments after ``self`` (vLLM 0.32).
_SALT_POSITION = 10


def _after_load(load_model):
    @functools.wraps(load_model)
    def wrapped(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        setattr(self, _ATTR, _runner.make(self))
        return result

    wrapped._emokern = True
    return wrapped


def _before_update(update_states):
    @functools.wraps(update_states)
    def wrapped(self, scheduler_output, *args, **kwargs):
        steering = getattr(self, _ATTR, None)
        if steering is not None:
            steering.on_update(scheduler_output)
        return update_states(self, scheduler_output, *args, **kwargs)

    wrapped._emokern = True
    return wrapped


def _after_prepare(prepare_inputs):
    @functools.wraps(prepare_inputs)
    def wrapped(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        steering = getattr(self, _ATTR, None)
        if steering is not None:
            steering.before_forward(self, num_scheduled_tokens)
        return result

    wrapped._emokern = True
    return wrapped


def _salted(init):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        params = kwargs.get("sampling_params", args[2] if len(args) > 2 else None)
        salt = cache_salt(getattr(params, "extra_args", None))
        if salt is not None:
            if len(args) > _SALT_POSITION:  # cache_salt passed positionally
                args = list(args)
                old = args[_SALT_POSITION]
                args[_SALT_POSITION] = salt if not old else f"{old}|{salt}"
            else:
                old = kwargs.get("cache_salt")
                kwargs["cache_salt"] = salt if not old else f"{old}|{salt}"
        return init(self, *args, **kwargs)

    wrapped._emokern = True
    return wrapped


def _checked(validate_params):
    @functools.wraps(validate_params)
    def wrapped(self, params, *args, **kwargs):
        result = validate_params(self, params, *args, **kwargs)
        config = EmokernConfig.from_additional_config(self.vllm_config.additional_config)
        try:
            check_mix(getattr(params, "extra_args", None), config)
        except (TypeError, ValueError) as exc:
            # vLLM's client-error type: the OpenAI server answers 400 with the message
            # (a plain ValueError here becomes a 500 without one).
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(exc), parameter="vllm_xargs.emotion") from exc
        return result

    wrapped._emokern = True
    return wrapped


def _patch(cls, name: str, wrapper) -> None:
    current = cls.__dict__.get(name)
    if current is None or getattr(current, "_emokern", False):
        return
    setattr(cls, name, wrapper(current))


def register() -> None:
    """Install the plugin's wrappers in this process (idempotent)."""
    # vLLM is imported here, not at module level: it is an optional dependency, and importing
    # it costs seconds; only vLLM itself calls this function.
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, READINGS_METHOD):
        setattr(WorkerBase, READINGS_METHOD, _worker_readings)
    from vllm.v1.engine.input_processor import InputProcessor

    _patch(InputProcessor, "_validate_params", _checked)
    _patch(Request, "__init__", _salted)
    _patch(GPUModelRunner, "load_model", _after_load)
    _patch(GPUModelRunner, "_update_states", _before_update)
    _patch(GPUModelRunner, "_prepare_inputs", _after_prepare)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a vLLM build without the CPU runner
        return
    _patch(CPUModelRunner, "load_model", _after_load)


READINGS_METHOD = "emokern_readings"


def _worker_readings(worker, req_ids=None, family: bool = False) -> dict:
    """A worker's readings (added to vLLM's ``WorkerBase`` as ``emokern_readings``, so
    ``collective_rpc("emokern_readings")`` reaches it without pickling a function)."""
    steering = steering_of(getattr(worker, "model_runner", None))
    return {} if steering is None else steering.readings(req_ids, family)


def steering_of(model_runner):
    """The :class:`~emokern.vllm.runner.EngineSteering` of a model runner (None if off)."""
    return getattr(model_runner, _ATTR, None)
