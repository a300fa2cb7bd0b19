"""One call from prompts and mixes to texts and emotion readings: :func:`generate`.

Tokenizes the prompts as one left-padded batch (:func:`emokern.tokens.encode_prompts`), steers
each row with its own mix through :func:`~emokern.steering.steer` with the trajectory on, runs
``model.generate`` once, and cuts every row at its end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emokern.errors import failing
from emokern.steering.mix import normalize_mix, parse_mix
from emokern.steering.steerer import steer
from emokern.tokens import encode_prompts, eos_ids, model_device

fail = failing("emokern.steer")

__all__ = ["generate"]


def _broadcast(prompts, mixes) -> tuple[list[str], list[dict[str, float | str]]]:
    """One prompt and one mix per row: a single prompt (or mix) is repeated for every row."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(mixes, (str, Mapping)):
        mixes = [mixes]
    prompts, mixes = list(prompts), list(mixes)
    if not prompts:
        fail(ValueError, "prompts must not be empty")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            fail(TypeError, f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    if not mixes:
        mixes = [{}]
    mixes = [parse_mix(m) if isinstance(m, str) else m for m in mixes]
    if len(prompts) == 1 and len(mixes) > 1:
        prompts = prompts * len(mixes)
    elif len(mixes) == 1 and len(prompts) > 1:
        mixes = mixes * len(prompts)
    if len(prompts) != len(mixes):
        fail(ValueError, f"got {len(prompts)} prompts and {len(mixes)} mixes; give one mix per "
                         f"prompt, or one prompt (or one mix) for all rows")
    return prompts, mixes


def generate(
    model: nn.Module,
    tokenizer,
    bank,
    prompts,
    mixes=None,
    *,
    target=None,
    monitor_layers: str | Sequence[int] | None = "auto",
    control=None,
    max_new_tokens: int = 64,
    layers: str | Sequence[int] = "auto",
    band: Sequence[int] | None = None,
    positions: str = "all",
    norm_preserving: bool = False,
    do_sample: bool = False,
    seed: int = 0,
    chat: bool = True,
    spread: str = "divide",
    temperature: float | None = None,
) -> list[dict[str, Any]]:
    """Generate one batch, each row with its own mix; return texts and emotion readings.

    Parameters
    ----------
    prompts : str or list of str
        One prompt per row, or one prompt for every mix.
    mixes : list of (dict or str)
        One mix per row (a dict or a :func:`parse_mix` string in the grammar of
        :mod:`emokern.steering.mix`: ``"joy=2"``, ``"anger=rec"``, ``"sadness@1.5"``,
        ``"fear=erase"``, ``"anger<=0.5"``, ``"joy>=1"``, combined with commas), or one mix
        for every prompt. Levels and bounds need a calibrated bank.
    target : list of dict, optional
        Instead of ``mixes``: closed-loop levels per row in calibrated units (see
        :func:`~emokern.steering.steer`), with ``control`` its settings.
    monitor_layers : "auto", None or list of int
        Where the readings are taken (default the bank's detection layers; None = the
        steered layers).
    max_new_tokens, do_sample, temperature
        Passed to ``model.generate``; sampling is seeded with ``seed`` without touching the
        global RNG state.
    layers, band, positions, norm_preserving, spread
        As for :func:`~emokern.steering.steer`.
    chat : bool
        Wrap each prompt in the tokenizer's chat template (as a user turn).

    Returns
    -------
    list of dict
        One per row: ``prompt``, ``mix`` (the row's mix in normal form,
        :func:`~emokern.steering.mix.normalize_mix`: emotion → push weight, or a dict of
        ``weight``/``level``/``min``/``max`` with levels in standard scores; ``rec`` resolved
        to the emotion's recipe; :func:`~emokern.steering.mix.format_mix` writes it as
        text), ``text`` (the generated continuation, up to
        its end-of-sequence token), ``n_tokens`` (generated tokens, EOS included) and
        ``projections`` (emotion → mean projection of the states that chose the row's
        ``n_tokens`` tokens, from :meth:`Monitor.trajectory`, averaged over the monitored
        layers: what the model carried while writing the text; tokens after a row's EOS, which
        ``generate`` keeps feeding while other rows run, are left out), ``readings`` (the same
        as standard scores against the bank's neutral baseline, averaged over the monitored
        layers; None for a bank without one) and, with ``target``, ``target`` and
        ``weights`` (each emotion's weight averaged over the steps).
    """
    if target is not None:
        if mixes is not None:
            fail(ValueError, "give either mixes or target, not both")
        if isinstance(target, Mapping):
            target = [target]
        prompts, target = _broadcast(prompts, list(target))
        mixes = [{} for _ in prompts]
    else:
        prompts, mixes = _broadcast(prompts, [{}] if mixes is None else mixes)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        fail(ValueError, f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    device = model_device(model)
    steerer = steer(model, bank, None if target is not None else mixes, layers=layers,
                    band=band, positions=positions, norm_preserving=norm_preserving, monitor=False,
                    trajectory=True, spread=spread, monitor_layers=monitor_layers,
                    target=target, control=control)
    encoded = encode_prompts(tokenizer, prompts, chat=chat, device=device)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                               "pad_token_id": tokenizer.pad_token_id}
    if do_sample and temperature is not None:
        options["temperature"] = temperature
    if not do_sample:
        options.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), steerer:
        torch.manual_seed(seed)
        output = model.generate(**encoded, **options)
    prompt_length = encoded["input_ids"].shape[1]
    trajectory = steerer.monitor.trajectory()  # [S, B, L, K]
    stops = eos_ids(model, tokenizer)
    names = list(steerer.names)
    weights = steerer.controller.mean_weights() if steerer.controller is not None else None
    rows = []
    for b, (prompt, mix) in enumerate(zip(prompts, mixes, strict=True)):
        new_tokens = output[b, prompt_length:].cpu()
        ended = [i for i, token in enumerate(new_tokens.tolist()) if token in stops]
        n_tokens = ended[0] + 1 if ended else int(new_tokens.numel())
        per_layer = trajectory[:n_tokens, b].mean(dim=0)  # [L, K]
        raw = per_layer.mean(dim=0)
        row = {
            "prompt": prompt,
            "mix": normalize_mix(mix, names=bank.names, recommended=bank.recommended),
            "text": tokenizer.decode(new_tokens[:n_tokens], skip_special_tokens=True),
            "n_tokens": n_tokens,
            "projections": {name: float(raw[k]) for k, name in enumerate(names)},
            "readings": None,
        }
        if bank.calibrated:
            z = bank.standardize(per_layer, list(steerer.monitor_layers), names=names)
            row["readings"] = {name: float(v) for name, v in zip(names, z.mean(dim=0).tolist(),
                                                                 strict=True)}
        if weights is not None:
            row["target"] = {k: float(v) for k, v in target[b].items()}
            row["weights"] = {name: float(weights[b, k]) for k, name in enumerate(names)
                              if name in target[b]}
        rows.append(row)
    return rows
