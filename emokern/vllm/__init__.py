"""Steered generation inside vLLM: per-request emotion mixes and readings, with the packed op
inside vLLM's compiled graph.

Install with ``pip install "emokern[vllm]"``; vLLM finds the plugin through the
``vllm.general_plugins`` entry point (:func:`emokern.vllm.plugin.register`) in every process
it starts. It is off unless an engine enables it::

    from vllm import LLM, SamplingParams
    import emokern.vllm

    llm = LLM(model=PATH, dtype="float32",
              additional_config={"emokern": {"bank": "default", "layers": "auto",
                                             "monitor": True}})
    params = SamplingParams(max_tokens=32, extra_args={"emotion": "joy=2,fear=0.5"})
    out = llm.generate(["Tell me about your day."], params)
    emokern.vllm.readings(llm, out)   # {request_id: {"mean": [L][K], ...}}

Over HTTP: ``emokern serve`` (``make serve``) runs vLLM's OpenAI-compatible server with the
plugin, the default model and bank (``--model PATH --bank PATH --host --port``, other flags go
to vLLM). A request carries its mix as ``extra_body={"vllm_xargs": {"emotion":
"joy=2,fear=0.5"}}`` (JSON: ``"vllm_xargs": {"emotion": "joy=2"}``); the answer of
``/v1/completions`` and ``/v1/chat/completions`` (and the last chunk of a stream) carries
``emotion_readings``; ``GET /v1/emotions`` lists names, layers and recommended weights; a bad
mix is a 400 (:mod:`emokern.vllm.http`, an ASGI middleware added through vLLM's
``--middleware``).
Operators' presets (``--preset calm="joy=1,anger=-0.5"``, ``--presets FILE.json``;
``additional_config["emokern"]["presets"]``): a request sends a preset's name alone as its mix
(``{"emotion": "calm"}``); ``--steering-api-key`` (``EMOKERN_STEERING_API_KEY``) reserves
steering, readings and ``/v1/emotions`` for key holders (403 otherwise). Limits
(``--max-weight X``, ``--max-level Z``; ``additional_config["emokern"]["max_weight"/
"max_level"]``): the largest ``|push weight|`` and ``|z|`` (level, cap, floor) a request or
preset may ask for, ``rec`` included; by default 4 × the furthest the bank's recipes go
(:func:`~emokern.vllm.config.default_limits`), reported by ``/v1/emotions``; beyond them, or
beyond float32, is a 400 naming the field.

Settings (``additional_config["emokern"]``, :class:`~emokern.vllm.config.EmokernConfig`):
``bank`` (``"default"`` | ``"ev"`` | ``"concept"`` | path), ``layers`` (``"auto"`` | list),
``monitor``, ``spread`` (``"divide"`` | ``"each"``), ``norm_preserving``, ``max_requests``,
``levels`` (default false), ``presets`` (name → mix), ``max_weight``, ``max_level`` (default
null: the bank's :func:`~emokern.vllm.config.default_limits`). A mix is in the grammar of
:mod:`emokern.steering.mix`
(``"joy=2"``, ``"anger=rec"``, ``"sadness@1.5"``, ``"fear=erase"``, ``"anger<=0.5"``,
``"joy>=1"``, or the object form). Weights are in the bank's units and spread over layers as
in :func:`emokern.steer` (``docs/design.md`` §3); levels, caps and floors are standard scores
against the bank's neutral baseline and are accepted only by an engine started with
``"levels": true`` (otherwise a 400 naming the field: the default engine's compiled graph has
no bounds). A mix of all zeros is no steering. Steered requests get a prefix-cache salt per
mix (pushes, levels and bounds), so their KV is never reused by another mix or by unsteered
requests.

The plugin runs on the vLLM versions :data:`emokern.vllm.internals.SUPPORTED_VLLM` names and
refuses others when it loads (``EMOKERN_VLLM_ANY_VERSION=1`` tries anyway): it wraps a few
private vLLM methods, all declared in :mod:`~emokern.vllm.internals`.

Modules: :mod:`~emokern.vllm.config` (settings, mix parsing, cache salt),
:mod:`~emokern.vllm.slots` (persistent buffers and request → slot bookkeeping),
:mod:`~emokern.vllm.runner` (the layer wrapping inside a worker), :mod:`~emokern.vllm.plugin`
(the entry point), :mod:`~emokern.vllm.http` (readings over HTTP, ``/v1/emotions``),
:mod:`~emokern.vllm.serve` (``emokern serve``), :mod:`~emokern.vllm.internals` (every touch
point on vLLM's internals, the version check, the request-id formats). Only internals imports
vLLM, inside functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from emokern.models import DEFAULT_MODEL, model_dir
from emokern.vllm.config import CONFIG_KEY, EXTRA_KEY, EmokernConfig, cache_salt, request_mix
from emokern.vllm.slots import SlotTable

__all__ = ["CONFIG_KEY", "EXTRA_KEY", "EmokernConfig", "SlotTable", "cache_salt",
           "default_model_dir", "readings", "request_mix"]


def default_model_dir(cache_dir=None) -> Path:
    """The directory of the default model's safetensors copy (``config.json``,
    ``model.safetensors``, tokenizer files) that vLLM loads: ``emokern.models.model_dir("default")``
    (made on first use, ``$EMOKERN_CACHE/models/<gguf stem>-<key>``). Any built-in model:
    :func:`emokern.models.model_dir`."""
    return model_dir(DEFAULT_MODEL, cache_dir=cache_dir)


def readings(llm, requests: Iterable | None = None) -> dict[str, dict]:
    """Readings of steered requests of a ``vllm.LLM`` with emokern enabled.

    Parameters
    ----------
    llm : vllm.LLM
    requests : iterable of RequestOutput or request ids, optional
        Which requests (all that the workers remember when None; finished requests are kept,
        the oldest dropped beyond 4096).

    Returns
    -------
    dict
        ``{request_id: {"layers": [L], "names": [K], "mean": [L][K], "last": [L][K],
        "count": n, "prompt_mean": [L][K], "prompt_count": m, "readings": {name: value},
        "standardized": bool}}``: ``mean[l][k]`` is the mean over the request's generated
        tokens fed to the model (``n`` = generated tokens − 1: the last one is never fed) of
        ``<x, v_k> / ||v_k||``, ``x`` the output of steered layer ``layers[l]`` before
        steering — what ``emokern.steer(..., monitor="generated").monitor.mean()`` gives;
        ``prompt_mean`` the same over the ``m`` prompt tokens this request computed (those
        served from the prefix cache are not read again); ``readings`` averages ``mean`` over
        layers, in standard scores against the bank's neutral baseline when it has one
        (``standardized``). NaN is None. With ``monitor`` on, unsteered requests are read too
        (their slots weigh zero); with it off the result is empty.
    """
    ids = None
    if requests is not None:
        ids = [getattr(r, "request_id", r) for r in requests]
    merged: dict[str, dict] = {}
    # By name: vLLM refuses to send a function to its workers unless pickling is allowed.
    for part in llm.collective_rpc("emokern_readings", args=(ids,)):
        merged.update(part)
    return merged
