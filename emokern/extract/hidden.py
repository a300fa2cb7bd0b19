r"""Reading a model: batched generation of answers, and hidden states summed over token spans.

Both batch with left padding and explicit position ids (:func:`emokern.tokens.pad_batch`), so
that every row sees what it would see alone; hidden states are read at the output of decoder
layer :math:`l` (the residual stream where steering adds its vectors, see ``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from emokern.models import decoder_layers
from emokern.tokens import eos_ids, model_device, pad_batch, pad_id

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "generate_responses", "span_hidden_states"]

#: Answer length of Method EV (and the default of :func:`generate_responses`), chosen by
#: measurement on the default model (docs/emotions.md).
DEFAULT_MAX_NEW_TOKENS = 48


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    steer_weights=None,
) -> list[list[int]]:
    """Generate one response per prompt, batched with left padding.

    Parameters
    ----------
    prompts : sequence of token-id lists
        Unpadded prompts (e.g. from :func:`emokern.tokens.chat_prompt_ids`).
    max_new_tokens, batch_size : int
    do_sample : bool
        Greedy decoding (False) or nucleus sampling with ``temperature`` and ``top_p``; either
        way the result is deterministic for a given ``seed`` and batch order (the global RNG
        state is restored afterwards).
    steer_weights : callable, optional
        ``steer_weights(start, stop)`` is called before each batch of prompts
        ``prompts[start:stop]`` (used by :mod:`emokern.eval.calibration_sweep` to set per-row
        steering).

    Returns
    -------
    list of list of int
        Each response's token ids, cut before the first end-of-sequence token.
    """
    stop = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    device = model_device(model)
    responses: list[list[int]] = []
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        # Clear sampling defaults a checkpoint may carry so greedy decoding does not warn.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            chunk = prompts[start:start + batch_size]
            if steer_weights is not None:
                steer_weights(start, start + len(chunk))
            input_ids, attention_mask, _ = pad_batch(chunk, pad)
            out = model.generate(input_ids=input_ids.to(device),
                                 attention_mask=attention_mask.to(device), **kwargs)
            for row in out[:, input_ids.shape[1]:].tolist():
                cut = next((i for i, tok in enumerate(row) if tok in stop), len(row))
                responses.append(row[:cut])
    return responses


class _StopForward(Exception):
    """Raised by the capture hook of the deepest requested layer to end a forward early."""


def span_hidden_states(
    model,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    *,
    layers: Sequence[int],
    pad_token_id: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "forward",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Sum the hidden states of each sequence over a token span, at chosen layers.

    For sequence :math:`i` with span :math:`[a_i, b_i)` (indices into the *unpadded* sequence):

    .. math::
        S_{i,l} = \sum_{t=a_i}^{b_i-1} h_l(i, t), \qquad
        N_{i,l} = \sum_{t=a_i}^{b_i-1} \lVert h_l(i, t)\rVert

    with :math:`h_l` the output of decoder layer :math:`l`, read by a forward hook: the
    residual stream where steering adds its vectors. It equals ``hidden_states[l + 1]`` of a
    forward with ``output_hidden_states=True`` except at the last layer, where transformers
    reports the state after the final norm. Sequences are batched with left padding and
    explicit position ids, so the result equals a per-sequence unpadded forward (up to float
    rounding); padding is never counted.

    Parameters
    ----------
    model : transformers causal LM
    sequences : sequence of token-id lists
    spans : sequence of (start, stop)
        ``0 <= start <= stop <= len(sequence)``; an empty span contributes nothing.
    layers : sequence of int
        Decoder-layer indices.

    Returns
    -------
    sums : Tensor [N, L, D] float32
    counts : Tensor [N] int64
        Span lengths.
    norm_sums : Tensor [N, L] float32
    """
    if len(sequences) != len(spans):
        raise ValueError(f"spans must have one (start, stop) per sequence: {len(spans)} spans "
                         f"for {len(sequences)} sequences")
    for i, ((a, b), seq) in enumerate(zip(spans, sequences, strict=True)):
        if not 0 <= a <= b <= len(seq):
            raise ValueError(f"spans[{i}] = ({a}, {b}) is not within sequence {i} of length "
                             f"{len(seq)}")
    layers = list(layers)
    device = model_device(model)
    dim = model.get_input_embeddings().weight.shape[1]
    n = len(sequences)
    sums = torch.zeros((n, len(layers), dim), dtype=torch.float32)
    norm_sums = torch.zeros((n, len(layers)), dtype=torch.float32)
    counts = torch.tensor([b - a for a, b in spans], dtype=torch.int64)
    # Longest first keeps padding low within a batch; results are put back in input order.
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(layer):
        def hook(module, args, output):
            # transformers 5 returns a Tensor from a decoder layer, 4.x a tuple.
            captured[layer] = output if isinstance(output, torch.Tensor) else output[0]
            if layer == deepest:
                # Nothing above the deepest requested layer is read: skip the rest.
                raise _StopForward
        return hook

    blocks = decoder_layers(model)
    handles = [blocks[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        _read_spans(model, sequences, spans, layers, order, pad_token_id, batch_size, device,
                    captured, sums, norm_sums, progress, desc)
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts, norm_sums


def _read_spans(model, sequences, spans, layers, order, pad_token_id, batch_size, device,
                captured, sums, norm_sums, progress, desc) -> None:
    n = len(sequences)
    body = getattr(model, "base_model", model)
    with torch.inference_mode():
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            index = order[start:start + batch_size]
            chunk = [sequences[i] for i in index]
            input_ids, attention_mask, position_ids = pad_batch(chunk, pad_token_id)
            width = input_ids.shape[1]
            select = torch.zeros((len(index), width), dtype=torch.float32)
            for row, i in enumerate(index):
                a, b = spans[i]
                offset = width - len(sequences[i])
                select[row, offset + a:offset + b] = 1.0
            if not bool(select.any()):
                continue
            captured.clear()
            # The base model skips the LM head, whose logits nobody reads here.
            try:
                body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     position_ids=position_ids.to(device), use_cache=False)
            except _StopForward:
                pass
            hidden = torch.stack([captured[layer] for layer in layers], dim=1)
            hidden = hidden.float().cpu()  # [B, L, W, D]
            # Padding rows may hold garbage (even NaN) in some attention implementations:
            # zero them instead of multiplying, since 0 * NaN is NaN.
            keep = select.bool()[:, None, :, None]
            hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype))
            sums[index] = hidden.sum(dim=2)
            norm_sums[index] = hidden.norm(dim=-1).sum(dim=2)
