"""``emokern serve``: vLLM's OpenAI-compatible server with emotion steering on.

The command builds the argument list of vLLM's API server — the model (the default model's
safetensors copy unless ``--model``), ``--additional-config`` with the emokern settings (merged
into one the user passes), ``--middleware emokern.vllm.http.EmotionMiddleware`` (readings in
the answers, ``GET /v1/emotions``), ``--dtype float32`` on a machine without CUDA (vLLM would
run bfloat16) — and runs that server in this process, exactly as ``python -m
vllm.entrypoints.openai.api_server`` would; every flag it does not know goes to vLLM.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from emokern.vllm.config import CONFIG_KEY, EmokernConfig

__all__ = ["MIDDLEWARE", "serve", "vllm_argv"]

MIDDLEWARE = "emokern.vllm.http.EmotionMiddleware"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def _given(extra: list[str], flag: str) -> int | None:
    """The position of ``flag`` (``--flag value`` or ``--flag=value``) in ``extra``."""
    for i, arg in enumerate(extra):
        if arg == flag or arg.startswith(flag + "="):
            return i
    return None


def _pop(extra: list[str], flag: str) -> str | None:
    """Remove ``flag`` and its value from ``extra``; return the value (None if absent)."""
    i = _given(extra, flag)
    if i is None:
        return None
    arg = extra.pop(i)
    if "=" in arg:
        return arg.split("=", 1)[1]
    if i >= len(extra):
        raise ValueError(f"{flag} needs a value")
    return extra.pop(i)


def vllm_argv(*, model: str | None, bank: str, layers: str, host: str, port: int,
              extra: list[str], cuda: bool, levels: bool = False) -> list[str]:
    """The API server's arguments for ``emokern serve``.

    Parameters
    ----------
    model : str or None
        A checkpoint directory (or a name vLLM resolves); None for the default model.
    bank : str
        ``"default"``, ``"ev"``, ``"concept"`` or a bank file.
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

    Raises
    ------
    ValueError
        On a bad ``layers``, ``port``, ``bank`` or ``--additional-config``.
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
    additional[CONFIG_KEY] = settings
    EmokernConfig.from_additional_config(additional)  # refuse bad settings before vLLM starts
    if model is None:
        from emokern.vllm import default_model_dir

        model = str(default_model_dir())
        if _given(extra, "--served-model-name") is None:
            extra += ["--served-model-name", DEFAULT_NAME]
    argv = ["--model", model, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(additional), "--middleware", MIDDLEWARE]
    if not cuda and _given(extra, "--dtype") is None:
        argv += ["--dtype", "float32"]
    return argv + extra


def serve(argv: list[str], *, cuda: bool) -> int:
    """Run vLLM's OpenAI-compatible server with ``argv`` (see :func:`vllm_argv`) in this
    process, until it is stopped."""
    # vLLM is imported here: it is an optional dependency (the caller checked it is there).
    from emokern.vllm.internals import api_server_main

    vllm_main = api_server_main()

    if not cuda:
        # vLLM on CPU sizes its KV cache from this (GiB); without it the engine may not start.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    saved = sys.argv
    sys.argv = ["emokern serve", *argv]
    try:
        vllm_main()
    finally:
        sys.argv = saved
    return 0
