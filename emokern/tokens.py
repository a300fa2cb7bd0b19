"""Tokenizer plumbing shared by steering, extraction and evaluation: chat prompts, padded
batches, the pad and end-of-sequence ids, a model's device.

Prompt format: a tokenizer with a chat template (SmolLM2-Instruct) gets its prompts wrapped as a
user turn; one without (a base model such as Gemma 3 270M) gets them as plain text with the
tokenizer's own special tokens (Gemma's ``<bos>``). :func:`prompt_format` says which, so
callers can report it; the choice is made here, automatically, and logged once per tokenizer.

Generation appends on the right, so batches that will be continued are padded on the *left*;
``position_ids`` are then 0 at each row's first real token, so that absolute-position models
(GPT-2) see the same positions as without padding. Scoring a finished text pads on the right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PROMPT_FORMATS", "chat_prompt_ids", "encode_prompts", "eos_ids", "model_device",
           "pad_batch", "pad_id", "prompt_format"]

#: What :func:`prompt_format` returns.
PROMPT_FORMATS = ("chat", "plain")

_log = logging.getLogger(__name__)


def prompt_format(tokenizer) -> str:
    """``"chat"`` when the tokenizer has a chat template (prompts become user turns), else
    ``"plain"`` (prompts are tokenized as they are, with the tokenizer's special tokens).

    Examples
    --------
    SmolLM2-135M-Instruct (``"default"``) gives ``"chat"``; Gemma 3 270M base
    (``"gemma3-270m"``) gives ``"plain"``.
    """
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def _note_plain(tokenizer) -> None:
    """Log, once per tokenizer, that chat prompts fall back to plain text."""
    if not getattr(tokenizer, "_emokern_plain_noted", False):
        _log.info("%s has no chat template: prompts are plain text",
                  getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
        try:
            tokenizer._emokern_plain_noted = True
        except AttributeError:  # a tokenizer that refuses attributes is simply noted again
            pass


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a generated sequence: the generation config's EOS (an int or a list)
    and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, *, side: str = "left"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token lists into one batch.

    Parameters
    ----------
    sequences : sequence of sequences of int
        ``B`` token lists (an empty one becomes a row of padding).
    pad_token_id : int
    side : "left" or "right"
        Left for batches that will be continued (generation), right for scoring.

    Returns
    -------
    input_ids, attention_mask, position_ids : LongTensor ``[B, W]``
        ``W`` = the longest length; ``position_ids`` count real tokens from 0 (0 on padding).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in sequences), default=0)
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            input_ids[i, span] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[i, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, ending with the
    assistant's turn header; for a tokenizer without one (:func:`prompt_format` ``"plain"``),
    a plain "Role: text" transcript ending with ``"Assistant:"``, with the tokenizer's special
    tokens (a template writes its own)."""
    if prompt_format(tokenizer) == "chat":
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    _note_plain(tokenizer)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    text += "Assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = True, device=None):
    """Tokenize ``prompts`` as one left-padded batch (``input_ids``, ``attention_mask``).

    With ``chat`` and a tokenizer that has a chat template, each prompt is wrapped as a user
    turn (the template writes the special tokens); otherwise (``chat=False``, or
    :func:`prompt_format` ``"plain"``: a base model) the prompts are plain text with the
    tokenizer's special tokens, e.g. Gemma's ``<bos>``.
    """
    templated = chat and prompt_format(tokenizer) == "chat"
    if templated:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        if chat:
            _note_plain(tokenizer)
        texts = list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    return encoded.to(device) if device is not None else encoded
