"""Tokenizer plumbing shared by steering, extraction and evaluation: chat prompts, padded
batches, the pad and end-of-sequence ids, a model's device.

Generation appends on the right, so batches that will be continued are padded on the *left*;
``position_ids`` are then 0 at each row's first real token, so that absolute-position models
(GPT-2) see the same positions as without padding. Scoring a finished text pads on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["chat_prompt_ids", "encode_prompts", "eos_ids", "model_device", "pad_batch", "pad_id"]


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
    assistant's turn header (a plain "Role: text" transcript when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        text += "Assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = True, device=None):
    """Tokenize ``prompts`` as one left-padded batch (``input_ids``, ``attention_mask``), each
    wrapped in the chat template as a user turn when ``chat`` and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        texts = list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    return encoded.to(device) if device is not None else encoded
