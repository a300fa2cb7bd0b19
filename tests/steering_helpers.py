"""Helpers shared by the steering tests (``tests/steering/``): a padded batch of prompts,
plain forwards and greedy generation, a probe of what a steering hook changed, and the
calibrated bank's neutral baseline."""

from __future__ import annotations

import numpy as np
import torch

from emokern.tokens import encode_prompts

PROMPTS = ["the cat sat on the mat and looked", "hello", "why is the sky blue"]


def encode(tokenizer, prompts=PROMPTS):
    """The prompts as one left-padded batch, without chat template."""
    return encode_prompts(tokenizer, prompts, chat=False)


def logits(model, encoded):
    with torch.inference_mode():
        return model(**encoded).logits


def greedy(model, tokenizer, encoded, new_tokens=6, **options):
    """The ``new_tokens`` greedy tokens after the prompt, ``[B, new_tokens]``."""
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **options)
    return out[:, encoded["input_ids"].shape[1]:]


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


class Capture:
    """Clones a layer's output before and after the steering hook (forward hooks run in
    registration order: ``before`` is registered before the steerer installs, ``after`` after)."""

    def __init__(self, layer):
        self.layer = layer
        self.before, self.after = [], []
        self._handles = [layer.register_forward_hook(self._grab(self.before))]

    def _grab(self, store):
        def hook(module, args, output):
            store.append((output if isinstance(output, torch.Tensor) else output[0]).clone())
        return hook

    def attach_after(self):
        self._handles.append(self.layer.register_forward_hook(self._grab(self.after)))

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def changed(self):
        """Per forward, which token rows the steering modified: list of [B, T] bool."""
        return [(a != b).any(dim=-1) for a, b in zip(self.after, self.before, strict=True)]


def neutral_baseline(n_layers: int, n_emotions: int):
    """The ``calibrated`` bank's neutral baseline, float64 numpy ``(mean, std) [L, K]``: a
    different value at every layer and emotion (``0.3 l - 0.7 k`` and ``1 + 0.5 l + 0.3 k``),
    so a reading standardized against the wrong layer or emotion shows."""
    layer = np.arange(n_layers, dtype=np.float64)[:, None]
    emotion = np.arange(n_emotions, dtype=np.float64)[None, :]
    return 0.3 * layer - 0.7 * emotion, 1.0 + 0.5 * layer + 0.3 * emotion
