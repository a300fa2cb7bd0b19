"""Every place the plugin touches vLLM beyond its public API, in one version-checked module.

vLLM has no public hook for what the plugin needs (a per-request state read inside the model's
forward, a check of the request at the front door, a prefix-cache salt per mix), so the plugin
wraps, in memory, six methods of vLLM's classes and reads a few fields of its objects. They
are all declared here; the rest of :mod:`emokern.vllm` reaches vLLM's private parts only
through this module, and ``tests/vllm/test_internals.py`` checks each one against the
installed vLLM.

**Versions.** :data:`SUPPORTED_VLLM` is the range of vLLM versions these touch points were
checked against (:data:`TESTED_VLLM` the releases actually run). :func:`check_version` refuses
any other version when the plugin loads (:func:`emokern.vllm.plugin.register`), with one message
naming the installed and the supported versions; setting ``EMOKERN_VLLM_ANY_VERSION=1`` skips
the refusal (the wraps then fail, or not, method by method — each names what it missed).

**Wrapped methods** (:data:`WRAPS`; which process runs them in brackets):

* ``InputProcessor._validate_params`` (API server / ``LLM`` front end) — argument ``params``;
* ``Request.__init__`` (engine core) — arguments ``sampling_params`` and ``cache_salt``;
* ``GPUModelRunner.load_model`` and ``CPUModelRunner.load_model`` (workers);
* ``GPUModelRunner._update_states`` (workers) — argument ``scheduler_output``;
* ``GPUModelRunner._prepare_inputs`` (workers) — arguments ``scheduler_output``,
  ``num_scheduled_tokens``.

Arguments are found by name: their position is read from the installed method's signature
when the wrap is made (:class:`Argument`), never hard-coded.

**Fields read**: :data:`BATCH_FIELDS` of the model runner's ``input_batch``,
:data:`RUNNER_FIELDS` of the model runner, :data:`REQUEST_STATE_FIELDS` of its per-request
state, :data:`SCHEDULER_OUTPUT_FIELDS`, and the server side's ``app.state.engine_client`` /
``app.state.args``, ``engine_client.vllm_config`` and vLLM's own API-key check.

**Request ids** (:func:`external_id`, :func:`derived_index`): vLLM's engine gives each request
the internal id ``<id>-<8 hex>``; its OpenAI server derives ``<id>`` from one HTTP response id
``R``: ``R-<i>`` (prompt ``i`` of a completion; ``R_<i>`` in older releases) and ``<j>_...``
(sample ``j`` of ``n``, vLLM's parallel sampling).

vLLM is imported inside functions only: the module imports without it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from emokern.errors import failing

__all__ = ["ANY_VERSION_ENV", "BATCH_FIELDS", "REQUEST_STATE_FIELDS", "RUNNER_FIELDS",
           "SCHEDULER_OUTPUT_FIELDS", "SUPPORTED_VLLM", "TESTED_VLLM", "WRAPS", "Argument",
           "Wrap", "add_worker_method", "additional_config", "api_key_ok", "api_server_main",
           "batch_state", "check_version", "derived_index", "device_type", "engine_sizes",
           "external_id", "finished_ids", "installed_version", "request_extra_args",
           "validation_error", "wrap"]

fail = failing("emokern.vllm")

#: The vLLM versions whose internals this module matches (a PEP 440 specifier).
SUPPORTED_VLLM = ">=0.32,<0.33"
#: The vLLM releases the plugin's tests ran against.
TESTED_VLLM = ("0.32.0",)
#: Set to 1 to load the plugin on a vLLM outside :data:`SUPPORTED_VLLM` anyway.
ANY_VERSION_ENV = "EMOKERN_VLLM_ANY_VERSION"


# ---------------------------------------------------------------------------- version


def installed_version() -> str:
    """The installed vLLM's version string."""
    import vllm

    return vllm.__version__


def check_version(version: str | None = None) -> str:
    """Refuse a vLLM outside :data:`SUPPORTED_VLLM` (unless ``EMOKERN_VLLM_ANY_VERSION=1``).

    Parameters
    ----------
    version : str, optional
        The version to check (default: the installed vLLM's).

    Returns
    -------
    str
        The version checked.

    Raises
    ------
    RuntimeError
        One message naming the installed and the supported versions and the way out.
    """
    from packaging.specifiers import SpecifierSet  # a dependency of vLLM
    from packaging.version import InvalidVersion, Version

    version = installed_version() if version is None else version
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_VLLM)
    except InvalidVersion:
        ok = False
    if not ok and os.environ.get(ANY_VERSION_ENV) != "1":
        fail(RuntimeError, f"the installed vLLM is {version}, but the plugin wraps vLLM "
                           f"internals checked only on vLLM {SUPPORTED_VLLM} (tested: "
                           f"{', '.join(TESTED_VLLM)}); install a supported vLLM (pip install "
                           f"'emokern[vllm]'), or set {ANY_VERSION_ENV}=1 to try anyway")
    return version


# ---------------------------------------------------------------------------- wrapped methods


class Argument:
    """How a wrapper finds one argument of a wrapped method: by name, at the position the
    installed method's signature gives it (``self`` excluded), or among the keywords.

    Parameters
    ----------
    method : callable
        The method as found on its class (``self`` first).
    name : str
        The parameter's name.
    """

    def __init__(self, method: Callable, name: str) -> None:
        params = list(inspect.signature(method).parameters.values())
        names = [p.name for p in params]
        if name not in names:
            fail(RuntimeError, f"{method.__qualname__} has no parameter {name!r} in this vLLM "
                               f"(parameters: {names[1:]}); the plugin supports vLLM "
                               f"{SUPPORTED_VLLM}")
        param = params[names.index(name)]
        self.name = name
        # None where the parameter cannot be passed by position
        self.index = names.index(name) - 1 if param.kind in (
            param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) else None
        self.default = None if param.default is param.empty else param.default

    def get(self, args: tuple, kwargs: dict):
        """The argument's value in one call (``args`` without ``self``)."""
        if self.index is not None and self.index < len(args):
            return args[self.index]
        return kwargs.get(self.name, self.default)

    def put(self, args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the argument set to ``value``, where the call passed it."""
        if self.index is not None and self.index < len(args):
            args = (*args[:self.index], value, *args[self.index + 1:])
        else:
            kwargs = {**kwargs, self.name: value}
        return args, kwargs


@dataclass(frozen=True)
class Wrap:
    """One wrapped vLLM method: ``module.cls.method``, the arguments its wrapper reads by name,
    the process that runs it, and whether a vLLM build may lack the class."""

    module: str
    cls: str
    method: str
    arguments: tuple[str, ...] = ()
    process: str = "worker"
    optional: bool = False

    def owner(self) -> type | None:
        """The class (None when ``optional`` and this vLLM build lacks it)."""
        try:
            return getattr(importlib.import_module(self.module), self.cls)
        except (ImportError, AttributeError):
            if self.optional:
                return None
            fail(RuntimeError, f"this vLLM has no {self.module}.{self.cls}; the plugin "
                               f"supports vLLM {SUPPORTED_VLLM}")


#: Every vLLM method the plugin wraps, by the name :mod:`emokern.vllm.plugin` uses.
WRAPS: dict[str, Wrap] = {
    "validate_params": Wrap("vllm.v1.engine.input_processor", "InputProcessor",
                            "_validate_params", ("params",), process="front end"),
    "request_init": Wrap("vllm.v1.request", "Request", "__init__",
                         ("sampling_params", "cache_salt"), process="engine core"),
    "load_model": Wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "load_model"),
    "cpu_load_model": Wrap("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "load_model",
                           optional=True),
    "update_states": Wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner",
                          "_update_states", ("scheduler_output",)),
    "prepare_inputs": Wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner",
                           "_prepare_inputs", ("scheduler_output", "num_scheduled_tokens")),
}

_MARK = "_emokern"


def wrap(name: str, make: Callable[..., Callable]) -> None:
    """Replace :data:`WRAPS` ``[name]``'s method by ``make(original, arguments)``
    (``arguments``: one :class:`Argument` per declared argument name); idempotent, and a
    no-op for an optional class this vLLM lacks."""
    spec = WRAPS[name]
    owner = spec.owner()
    if owner is None:
        return
    current = owner.__dict__.get(spec.method)
    if current is None:
        fail(RuntimeError, f"this vLLM's {spec.cls} defines no {spec.method}; the plugin "
                           f"supports vLLM {SUPPORTED_VLLM}")
    if getattr(current, _MARK, False):
        return
    found = {a: Argument(current, a) for a in spec.arguments}
    wrapped = functools.wraps(current)(make(current, found))
    setattr(wrapped, _MARK, True)
    setattr(owner, spec.method, wrapped)


def add_worker_method(name: str, method: Callable) -> None:
    """Add ``method`` to vLLM's ``WorkerBase`` as ``name`` (so ``collective_rpc(name)``
    reaches it without pickling a function)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, name):
        setattr(WorkerBase, name, method)


# ---------------------------------------------------------------------------- fields read

#: ``model_runner.input_batch`` fields read each step (set in ``InputBatch.__init__``).
BATCH_FIELDS = ("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens")
#: Model-runner fields read (``vllm_config``: its ``additional_config``, ``scheduler_config``).
RUNNER_FIELDS = ("input_batch", "requests", "vllm_config", "model")
#: Fields of ``model_runner.requests[id]`` (``CachedRequestState``).
REQUEST_STATE_FIELDS = ("sampling_params",)
#: Fields of the ``SchedulerOutput`` handed to ``_update_states``.
SCHEDULER_OUTPUT_FIELDS = ("finished_req_ids",)


def batch_state(runner):
    """``(req_ids, num_computed, num_prompt)`` of the runner's batch this step: the ids of its
    ``num_reqs`` requests in batch order, and numpy arrays of tokens computed before this step
    and prompt lengths (rows beyond ``num_reqs`` are stale)."""
    batch = runner.input_batch
    return (batch.req_ids[:batch.num_reqs], batch.num_computed_tokens_cpu,
            batch.num_prompt_tokens)


def request_extra_args(runner, req_id: str):
    """The ``SamplingParams.extra_args`` of a request the runner holds (None if none)."""
    params = runner.requests[req_id].sampling_params
    return getattr(params, "extra_args", None) if params is not None else None


def finished_ids(scheduler_output):
    """The ids of the requests that finished since the last step."""
    return scheduler_output.finished_req_ids


def engine_sizes(runner) -> tuple[object, int, int]:
    """``(additional_config, max_num_seqs, max_num_batched_tokens)`` of a model runner's
    engine."""
    config = runner.vllm_config
    sched = config.scheduler_config
    return config.additional_config, sched.max_num_seqs, sched.max_num_batched_tokens


def additional_config(holder):
    """The ``additional_config`` of the engine behind ``holder`` (vLLM's ``InputProcessor``,
    a model runner, or the server's ``engine_client``: each has a ``vllm_config``); None when
    it has none."""
    return getattr(getattr(holder, "vllm_config", None), "additional_config", None)


def device_type(holder) -> str | None:
    """The device type (``"cpu"``, ``"cuda"``, ...) of the engine behind ``holder`` (anything
    with a ``vllm_config``, as :func:`additional_config`); None when it has none."""
    device = getattr(getattr(holder, "vllm_config", None), "device_config", None)
    return getattr(device, "device_type", None)


def validation_error(message: str, parameter: str) -> Exception:
    """vLLM's client-error type (the OpenAI server answers it with HTTP 400 and the message; a
    plain ValueError would be a 500 without one)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def api_key_ok(scope, tokens: list[str]) -> bool:
    """Whether an HTTP exchange passes vLLM's own API-key check for ``tokens``."""
    from starlette.datastructures import Headers
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    return AuthenticationMiddleware(None, tokens).verify_token(Headers(scope=scope))


def api_server_main() -> Callable[[], None]:
    """vLLM's OpenAI-compatible server's entry point (reads ``sys.argv``)."""
    from vllm.entrypoints.launchers.api_server.entry import main

    return main


# ---------------------------------------------------------------------------- request ids

_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(internal: str) -> str:
    """The id a request was given, from vLLM's internal id (``<id>-<8 hex chars>``)."""
    return _INTERNAL_SUFFIX.sub("", internal)


@functools.lru_cache(maxsize=256)
def _family(base: str) -> re.Pattern:
    return re.compile(r"(?:(\d+)_)?" + re.escape(base) + r"(?:[-_](\d+))?")


def derived_index(request_id: str, base: str) -> tuple[int, int] | None:
    """``(sample j, prompt i)`` when ``request_id`` (an external id) is ``base`` or one the
    OpenAI server derives from response id ``base`` — ``[<j>_]<base>[-<i>]`` (also
    ``_<i>``) — else None. Missing parts are 0."""
    match = _family(base).fullmatch(request_id)
    if match is None:
        return None
    return int(match.group(1) or 0), int(match.group(2) or 0)
