"""Hugging Face model plumbing for the steerer: which module runs the decoder layers, what a
forward was given, how long the past is, where a layer lives.

Everything here reads shapes and signatures only (no device sync), so the steerer's pre-hook
can call it at every decode step. The decoder layers themselves are found by
:func:`emokern.models.decoder_layers`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from emokern.errors import failing

fail = failing("emokern.steer")

__all__ = ["ForwardInputs", "layers_owner", "module_device", "past_length"]


def layers_owner(model: nn.Module, layer_list: nn.ModuleList) -> nn.Module:
    """The module whose forward runs ``layer_list`` (``LlamaModel``, ``GPT2Model``, ...).

    A forward pre-hook on it sees every forward of the decoder stack, from ``generate`` or a
    plain ``model(**enc)``.

    Raises
    ------
    ValueError
        When no submodule of ``model`` holds ``layer_list`` as a direct child.
    """
    for module in model.modules():
        for child in module.children():
            if child is layer_list:
                return module
    fail(ValueError, "could not find the module that owns the decoder layers")


def module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of ``module``'s first parameter (``fallback`` when it has none); with a model
    split over devices, each decoder layer's own device."""
    for parameter in module.parameters():
        return parameter.device
    return fallback


class ForwardInputs:
    """Reads ``input_ids`` / ``inputs_embeds`` / ``attention_mask`` / ``past_key_values`` from
    a forward's ``(args, kwargs)`` whatever the model's positional order (GPT-2 and Llama
    differ).

    Parameters
    ----------
    forward : callable
        The forward whose arguments will be read (its signature gives the positions).
    """

    NAMES = ("input_ids", "inputs_embeds", "attention_mask", "past_key_values")
    #: Other names of an argument across transformers versions (5.24 calls the cache
    #: ``cache``; ``past_key_values`` is still accepted as a deprecated keyword).
    ALIASES = {"past_key_values": ("cache",)}

    def __init__(self, forward) -> None:
        try:
            parameters = list(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            parameters = []
        self.position = {}
        for name in self.NAMES:
            for spelling in (name, *self.ALIASES.get(name, ())):
                if spelling in parameters:
                    self.position.setdefault(name, parameters.index(spelling))

    def _spellings(self, name: str) -> tuple[str, ...]:
        return (name, *self.ALIASES.get(name, ()))

    def get(self, name: str, args: tuple, kwargs: dict):
        """The argument ``name`` (keyword first, then positional), or None."""
        value = None
        for spelling in self._spellings(name):
            value = kwargs.get(spelling)
            if value is not None:
                break
        if value is None:
            pos = self.position.get(name)
            if pos is not None and pos < len(args):
                value = args[pos]
        return value


def past_length(cache) -> int:
    """Tokens already in ``cache``: a transformers ``Cache`` (``get_seq_length()``), a legacy
    tuple of ``(keys [B, H, P, d], values)`` per layer, or None (0)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples cache: keys [B, H, P, d]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0
