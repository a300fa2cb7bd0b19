r"""Emotion-vector extraction by the two published methods.

**Method EV (emotion vectors).** For each everyday query :math:`q` the model answers once
neutrally and once under an instruction to answer with emotion :math:`e`. One forward pass over
prompt + answer reads the residual stream; the vector of emotion :math:`e` at decoder layer
:math:`l` is the difference of the mean hidden states over all *response* tokens:

.. math::
    v_{e,l} = \frac{1}{|R_e|}\sum_{(q,t)\in R_e} h_l(q,t)
            - \frac{1}{|R_0|}\sum_{(q,t)\in R_0} h_l(q,t)

where :math:`R_e` is the set of (query, response-token) pairs of the answers under :math:`e`
(:math:`R_0`: neutral answers; prompt and padding tokens excluded) and :math:`h_l` is
``hidden_states[l + 1]`` of a transformers forward with ``output_hidden_states=True`` (the
output of decoder layer ``l``). With ``center=True`` the component shared by all emotions is
removed, :math:`v_{e,l} \leftarrow v_{e,l} - \frac1K\sum_{e'} v_{e',l}`. The method follows the
emotion-vector papers (e.g. *Controllable Emotion Generation with Emotion Vectors*, and the
EmotionQuery set it introduced); queries and instructions here are written by this project.

**Method concept (emotion-concept sets).** Each category :math:`c` has concept words
:math:`w` placed in neutral carrier sentences :math:`s`; the category's vector is the mean
hidden state at the word's tokens minus the mean over all categories:

.. math::
    u_{c,l} = \operatorname{mean}_{w\in c,\ s} h_l(s[w])\ , \qquad
    v_{c,l} = u_{c,l} - \frac1C\sum_{c'} u_{c',l}

Both return an :class:`emokern.bank.EmotionBank` with per-layer mean hidden-state norms and
metadata (method, source-set hash, model fingerprint, emokern version, recommended weight and
layers). The shipped banks are regenerated with::

    python -m emokern.extract --method ev --out emokern/data/banks/default-ev.safetensors
    python -m emokern.extract --method concept --out emokern/data/banks/default-concept.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
QUERIES_FILE = DATA_DIR / "queries.txt"
INSTRUCTIONS_FILE = DATA_DIR / "instructions.json"
CONCEPTS_FILE = DATA_DIR / "concepts.json"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
CALIBRATION_FILE = DATA_DIR / "calibration.json"
BANKS_DIR = DATA_DIR / "banks"

#: The six basic emotions (Ekman), Method EV's default set.
BASIC_EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
METHODS = ("ev", "concept")

#: Method EV defaults, chosen by measurement on the default model (docs/emotions.md).
DEFAULT_CENTER = True
DEFAULT_MAX_NEW_TOKENS = 48
#: Method concept: read the hidden state at the concept's last token ("last") or average its
#: tokens ("mean"); chosen by measurement (docs/emotions.md).
DEFAULT_CONCEPT_POOLING = "last"
CONCEPT_SLOT = "{concept}"


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------

def text_hash(items: Sequence[str] | str) -> str:
    """SHA-256 (first 16 hex digits) of a text set, joined by newlines: names the source set in
    a bank's metadata, so two banks from the same queries can be recognised."""
    text = items if isinstance(items, str) else "\n".join(items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_text(path, argument: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{argument} {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{argument} {str(path)!r} is not UTF-8 text: {exc}") from exc


def load_queries(path: str | os.PathLike | None = None) -> list[str]:
    """Queries for Method EV, one per line (blank lines and ``#`` comments skipped).

    Parameters
    ----------
    path : path, optional
        A UTF-8 text file; default the project's set ``emokern/data/queries.txt`` (118
        everyday queries written for emokern).

    Raises
    ------
    ValueError
        If the file does not exist or holds no query.
    """
    text = _read_text(QUERIES_FILE if path is None else path, "queries_path")
    queries = [line.strip() for line in text.splitlines()]
    queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        raise ValueError(f"queries_path {str(path or QUERIES_FILE)!r} holds no query (it is "
                         f"empty or only blank/comment lines)")
    return queries


def _load_json(path, default: Path, argument: str) -> dict:
    text = _read_text(default if path is None else path, argument)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{argument} {str(path or default)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{argument} {str(path or default)!r} must hold a JSON object")
    return data


def load_instructions(path: str | os.PathLike | None = None) -> dict:
    """The instruction phrasings of Method EV (``emokern/data/instructions.json``).

    Returns
    -------
    dict
        ``default`` (phrasing id), ``phrasings`` (id -> {system, user, neutral_system,
        neutral_user}; ``{noun}``, ``{adjective}`` and ``{query}`` are filled in) and
        ``emotions`` (name -> {noun, adjective}).
    """
    data = _load_json(path, INSTRUCTIONS_FILE, "instructions_path")
    for key in ("default", "phrasings", "emotions"):
        if key not in data:
            raise ValueError(f"instructions file lacks the key {key!r}")
    return data


def load_concepts(path: str | os.PathLike | None = None) -> dict:
    """The emotion-concept sets (``emokern/data/concepts.json``): ``categories`` (name ->
    concept words/phrases) and ``carriers`` (neutral sentences with one ``{concept}`` slot)."""
    data = _load_json(path, CONCEPTS_FILE, "concepts_path")
    for key in ("categories", "carriers"):
        if key not in data:
            raise ValueError(f"concepts file lacks the key {key!r}")
    return data


def load_heldout(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Held-out emotional sentences ``[(emotion, text), ...]`` (``emokern/data/heldout.jsonl``,
    22 per basic emotion, written for emokern and never used for extraction)."""
    text = _read_text(HELDOUT_FILE if path is None else path, "heldout_path")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            rows.append((str(item["emotion"]), str(item["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"heldout_path line {number} is not a JSON object with 'emotion' "
                             f"and 'text': {exc}") from exc
    if not rows:
        raise ValueError("heldout_path holds no sentence")
    return rows


# --------------------------------------------------------------------------------------------
# Argument checks (all run before any generation)
# --------------------------------------------------------------------------------------------

def _num_layers(model) -> int:
    from emokern.models import decoder_layers

    return len(decoder_layers(model))


def _check_layers(layers, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be None or a sequence of ints, got "
                        f"{type(layers).__name__}") from None
    if not layers:
        raise ValueError("layers must not be empty (None means every layer)")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layers must be in [0, {num_layers}) for this model "
                             f"({num_layers} decoder layers), got {layer}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a layer, got {layers}")
    return sorted(layers)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_names(names, known: Sequence[str], argument: str, what: str) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{argument} must be a sequence of names, not a single str; wrap it in "
                        f"a list, e.g. [{names!r}]")
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{argument} must be a sequence of names, got "
                        f"{type(names).__name__}") from None
    if not names:
        raise ValueError(f"{argument} must not be empty")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument} must hold str names, got {name!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{argument} has unknown {what} {unknown}; known: {', '.join(known)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{argument} repeats {dupes}")
    return names


def _check_queries(queries) -> list[str]:
    if queries is None:
        return load_queries()
    if isinstance(queries, (str, os.PathLike)):
        raise TypeError("queries must be a sequence of query strings; to read a file use "
                        "load_queries(path)")
    queries = list(queries)
    if not queries:
        raise ValueError("queries must not be empty")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"queries[{i}] must be a non-empty str, got {q!r}")
    return [q.strip() for q in queries]


def _check_phrasing(instruction, instructions: dict) -> tuple[str, dict]:
    if isinstance(instruction, Mapping):
        phrasing = dict(instruction)
        name = str(phrasing.pop("id", "custom"))
    elif isinstance(instruction, str):
        if instruction not in instructions["phrasings"]:
            raise ValueError(f"instruction must be one of {sorted(instructions['phrasings'])} or "
                             f"a dict phrasing, got {instruction!r}")
        name, phrasing = instruction, instructions["phrasings"][instruction]
    else:
        raise TypeError(f"instruction must be a phrasing id or a dict, got "
                        f"{type(instruction).__name__}")
    for key in ("user", "neutral_user"):
        if not isinstance(phrasing.get(key), str) or "{query}" not in phrasing[key]:
            raise ValueError(f"instruction {name!r}: {key!r} must be a str containing "
                             f"'{{query}}'")
    return name, phrasing


# --------------------------------------------------------------------------------------------
# Prompting and generation
# --------------------------------------------------------------------------------------------

def ev_messages(query: str, phrasing: Mapping, forms: Mapping[str, str] | None = None
                ) -> list[dict]:
    """Chat messages for one Method-EV prompt.

    Parameters
    ----------
    query : str
    phrasing : mapping
        One entry of ``load_instructions()["phrasings"]``.
    forms : mapping, optional
        ``{"noun": ..., "adjective": ...}`` of the emotion; None builds the neutral prompt.
    """
    prefix = "" if forms is not None else "neutral_"
    fill = dict(forms or {}, query=query)
    messages = []
    system = phrasing.get(prefix + "system")
    if system:
        messages.append({"role": "system", "content": system.format(**fill)})
    messages.append({"role": "user", "content": phrasing[prefix + "user"].format(**fill)})
    return messages


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


def _stop_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """Left-pad token lists into ``input_ids [B, W]``, ``attention_mask [B, W]`` and
    ``position_ids [B, W]`` (0 at each sequence's first real token, so absolute-position
    models such as GPT-2 see the same positions as without padding)."""
    width = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            input_ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[i, width - len(seq):] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


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
        Unpadded prompts (e.g. from :func:`chat_prompt_ids`).
    max_new_tokens, batch_size : int
    do_sample : bool
        Greedy decoding (False) or nucleus sampling with ``temperature`` and ``top_p``; either
        way the result is deterministic for a given ``seed`` and batch order (the global RNG
        state is restored afterwards).
    steer_weights : callable, optional
        ``steer_weights(start, stop)`` is called before each batch of prompts
        ``prompts[start:stop]`` (used by :mod:`emokern.eval.calibrate` to set per-row steering).

    Returns
    -------
    list of list of int
        Each response's token ids, cut before the first end-of-sequence token.
    """
    from tqdm.auto import tqdm

    stop = _stop_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    device = _model_device(model)
    responses: list[list[int]] = []
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, do_sample=do_sample)
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
            input_ids, attention_mask, _ = _left_pad(chunk, pad_id)
            out = model.generate(input_ids=input_ids.to(device),
                                 attention_mask=attention_mask.to(device), **kwargs)
            for row in out[:, input_ids.shape[1]:].tolist():
                cut = next((i for i, tok in enumerate(row) if tok in stop), len(row))
                responses.append(row[:cut])
    return responses


# --------------------------------------------------------------------------------------------
# Reading hidden states over token spans
# --------------------------------------------------------------------------------------------

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
    from emokern.models import decoder_layers

    if len(sequences) != len(spans):
        raise ValueError(f"spans must have one (start, stop) per sequence: {len(spans)} spans "
                         f"for {len(sequences)} sequences")
    for i, ((a, b), seq) in enumerate(zip(spans, sequences, strict=True)):
        if not 0 <= a <= b <= len(seq):
            raise ValueError(f"spans[{i}] = ({a}, {b}) is not within sequence {i} of length "
                             f"{len(seq)}")
    layers = list(layers)
    device = _model_device(model)
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
    from tqdm.auto import tqdm

    n = len(sequences)
    body = getattr(model, "base_model", model)
    with torch.inference_mode():
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            index = order[start:start + batch_size]
            chunk = [sequences[i] for i in index]
            input_ids, attention_mask, position_ids = _left_pad(chunk, pad_token_id)
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


# --------------------------------------------------------------------------------------------
# Bank construction helpers
# --------------------------------------------------------------------------------------------

def center_vectors(vectors: torch.Tensor) -> torch.Tensor:
    r"""Remove the component shared by all emotions: :math:`v_{l,k} - \frac1K\sum_j v_{l,j}`.

    Parameters
    ----------
    vectors : Tensor [L, K, D] with K >= 2

    Returns
    -------
    Tensor [L, K, D], summing to zero over K.
    """
    if vectors.dim() != 3 or vectors.shape[1] < 2:
        raise ValueError(f"vectors must be [L, K, D] with K >= 2 to be centred, got shape "
                         f"{list(vectors.shape)}")
    return vectors - vectors.mean(dim=1, keepdim=True)


def pairwise_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of emotions at every layer: ``[L, K, D] -> [L, K, K]``."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def _emokern_version() -> str:
    import emokern

    return emokern.__version__


def load_calibration(path: str | os.PathLike | None = None) -> dict:
    """The calibration record ``emokern/data/calibration.json`` written by
    ``python -m emokern.eval.calibrate`` ({} when absent)."""
    path = CALIBRATION_FILE if path is None else Path(path)
    if not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def recommend(vectors: torch.Tensor, layers: Sequence[int], hidden_norm: torch.Tensor,
              num_layers: int, method: str, centered: bool, fingerprint: dict) -> dict:
    r"""Recommended steering weight and layers for a new bank, from the calibration record.

    When the calibration was measured on the same model (same fingerprint), method and
    centring, its values are used as they are. Otherwise they are transferred: the layer at the
    same relative depth (nearest extracted layer), and the weight that gives the same relative
    steering strength :math:`\alpha\,\overline{\lVert v_{l}\rVert}/\overline{\lVert h_l\rVert}`
    (mean vector norm over emotions relative to the mean hidden norm). A transferred value is a
    starting point only; calibrate the bank on its own model for real use.

    Returns
    -------
    dict
        ``recommended_alpha`` (float), ``recommended_layers`` (list of int) and
        ``recommendation`` ("calibrated", "transferred" or "heuristic").
    """
    record = load_calibration().get(method, {})
    same = (record.get("fingerprint") == fingerprint
            and record.get("centered") == centered)
    if same and all(layer in layers for layer in record["recommended_layers"]):
        return {"recommended_alpha": float(record["recommended_alpha"]),
                "recommended_layers": list(record["recommended_layers"]),
                "recommendation": "calibrated"}
    depth = float(record.get("relative_depth", 0.4))
    strength = float(record.get("relative_strength", 0.5))
    target = depth * max(num_layers - 1, 1)
    layer = min(layers, key=lambda x: abs(x - target))
    i = list(layers).index(layer)
    ratio = float(vectors[i].norm(dim=-1).mean() / hidden_norm[i].clamp_min(1e-12))
    alpha = strength / ratio if ratio > 0 else 1.0
    return {"recommended_alpha": round(float(alpha), 2), "recommended_layers": [int(layer)],
            "recommendation": "transferred" if record else "heuristic"}


def _make_bank(vectors, names, layers, hidden_norm, metadata):
    from emokern.bank import EmotionBank

    return EmotionBank(vectors.float().contiguous(), list(names), list(layers),
                       hidden_norm=hidden_norm.float(), metadata=metadata)


# --------------------------------------------------------------------------------------------
# Method EV
# --------------------------------------------------------------------------------------------

def extract_ev(
    model,
    tokenizer,
    *,
    emotions: Sequence[str] = BASIC_EMOTIONS,
    queries: Sequence[str] | None = None,
    instruction: str | Mapping | None = None,
    center: bool = DEFAULT_CENTER,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    return_responses: bool = False,
):
    r"""Extract emotion vectors by Method EV (see the module docstring for the math).

    For every query: one neutral answer and one answer per emotion under ``instruction``
    (chat template, batched generation with left padding); then one forward pass over prompt +
    answer; response tokens only (prompt, end-of-sequence and padding excluded) are averaged.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM (eval mode) and its tokenizer.
    emotions : sequence of str
        Names known to ``instructions.json`` (24 are; default the six basic emotions).
    queries : sequence of str, optional
        Default: the project's 118 everyday queries (``emokern/data/queries.txt``).
    instruction : str or dict, optional
        A phrasing id from ``instructions.json`` (default: its measured ``default``) or a dict
        ``{system, user, neutral_system, neutral_user}``.
    center : bool
        Subtract the mean over emotions at each layer (needs >= 2 emotions).
    layers : sequence of int, optional
        Decoder layers to keep; default all.
    max_new_tokens, batch_size : int
    do_sample : bool
        Greedy (default) or seeded nucleus sampling.
    seed : int
    progress : bool
        tqdm progress bars.
    return_responses : bool
        Also return the generated texts ``{"neutral": [...], emotion: [...]}``.

    Returns
    -------
    EmotionBank
        Vectors ``[L, K, D]``, ``hidden_norm [L]`` (mean norm of response-token hidden states,
        all conditions), metadata (method, queries hash, instruction id, centered, model
        fingerprint, emokern version, recommended_alpha, recommended_layers, counts, time).
        With ``return_responses``: ``(bank, responses)``.

    Raises
    ------
    ValueError, TypeError
        Unknown emotion, empty queries, bad layers, ... before any generation.
    """
    from emokern.models import model_fingerprint

    instructions = load_instructions()
    emotions = _check_names(emotions, list(instructions["emotions"]), "emotions", "emotion")
    queries = _check_queries(queries)
    name, phrasing = _check_phrasing(
        instructions["default"] if instruction is None else instruction, instructions)
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    if center and len(emotions) < 2:
        raise ValueError("center=True needs at least 2 emotions (centring one emotion leaves "
                         "a zero vector)")
    num_layers = _num_layers(model)
    layers = _check_layers(layers, num_layers)
    _check_positive_int(max_new_tokens, "max_new_tokens")
    _check_positive_int(batch_size, "batch_size")

    started = time.perf_counter()
    conditions = ["neutral", *emotions]
    prompts, groups = [], []
    for g, condition in enumerate(conditions):
        forms = None if condition == "neutral" else instructions["emotions"][condition]
        for query in queries:
            prompts.append(chat_prompt_ids(tokenizer, ev_messages(query, phrasing, forms)))
            groups.append(g)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, do_sample=do_sample, seed=seed,
                                   progress=progress, desc="EV: generate")
    generated = time.perf_counter()
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)]
    sums, counts, norm_sums = span_hidden_states(
        model, sequences, spans, layers=layers, pad_token_id=_pad_id(tokenizer),
        batch_size=max(1, batch_size // 2), progress=progress, desc="EV: read states")

    group = torch.tensor(groups)
    means = []
    token_counts = {}
    for g, condition in enumerate(conditions):
        rows = group == g
        total = int(counts[rows].sum())
        if total == 0:
            raise ValueError(f"the model produced no response token under {condition!r} for "
                             f"any query (every answer ended at once); try more queries or "
                             f"another instruction")
        token_counts[condition] = total
        means.append(sums[rows].double().sum(dim=0) / total)  # [L, D]
    neutral = means[0]
    raw = torch.stack([m - neutral for m in means[1:]], dim=1).float()  # [L, K, D]
    vectors = center_vectors(raw) if center else raw
    hidden_norm = (norm_sums.double().sum(dim=0) / counts.sum()).float()  # [L]
    fingerprint = model_fingerprint(model)
    metadata = {
        "method": "ev",
        "source_hash": text_hash(queries),
        "source": "queries.txt" if queries == load_queries() else "custom",
        "num_queries": len(queries),
        "instruction": name,
        "instruction_phrasing": phrasing,
        "centered": center,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "seed": seed,
        "response_tokens": token_counts,
        "emokern_version": _emokern_version(),
        "fingerprint": fingerprint,
        "seconds_generate": round(generated - started, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    metadata.update(recommend(vectors, layers, hidden_norm, num_layers, "ev", center,
                              fingerprint))
    bank = _make_bank(vectors, emotions, layers, hidden_norm, metadata)
    if not return_responses:
        return bank
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    by_condition = {c: [t for t, g in zip(texts, groups, strict=True) if g == i]
                    for i, c in enumerate(conditions)}
    return bank, by_condition


# --------------------------------------------------------------------------------------------
# Method concept
# --------------------------------------------------------------------------------------------

def concept_token_span(tokenizer, carrier: str, concept: str) -> tuple[list[int], int, int]:
    """Tokenize ``carrier`` with ``concept`` in its slot; return (ids, start, stop) of the
    tokens that cover the concept's characters.

    Uses the fast tokenizer's character offsets; without them, the tokens past the prefix.
    """
    if carrier.count(CONCEPT_SLOT) != 1:
        raise ValueError(f"carrier {carrier!r} must contain exactly one {CONCEPT_SLOT} slot")
    char_start = carrier.index(CONCEPT_SLOT)
    sentence = carrier.replace(CONCEPT_SLOT, concept)
    char_stop = char_start + len(concept)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"])
                  if b > a and a < char_stop and b > char_start]
        if inside:
            return ids, inside[0], inside[-1] + 1
    ids = list(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    prefix = sentence[:char_start].rstrip(" ")
    start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    suffix = sentence[char_stop:]
    tail = len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
    return ids, start, max(start + 1, len(ids) - tail)


def _check_categories(categories, concepts: dict) -> dict[str, list[str]]:
    known = concepts["categories"]
    if categories is None:
        chosen = dict(known)
    elif isinstance(categories, Mapping):
        chosen = {}
        for name, words in categories.items():
            if not isinstance(name, str):
                raise TypeError(f"categories keys must be str, got {name!r}")
            if isinstance(words, str) or not words:
                raise ValueError(f"categories[{name!r}] must be a non-empty list of concept "
                                 f"words")
            if not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"categories[{name!r}] must hold non-empty strings")
            chosen[name] = [w.strip() for w in words]
    else:
        names = _check_names(categories, list(known), "categories", "category")
        chosen = {name: known[name] for name in names}
    if len(chosen) < 2:
        raise ValueError(f"categories must name at least 2 categories (a vector is a category's "
                         f"mean minus the mean over categories), got {list(chosen)}")
    return chosen


def extract_concept(
    model,
    tokenizer,
    *,
    categories: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    carriers: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    pooling: str = DEFAULT_CONCEPT_POOLING,
    batch_size: int = 32,
    progress: bool = True,
):
    r"""Extract emotion vectors by Method concept (see the module docstring for the math).

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM and its tokenizer.
    categories : sequence of names or mapping name -> words, optional
        Default all 24 categories of ``emokern/data/concepts.json``; a mapping supplies custom
        concept words. At least 2 categories.
    carriers : sequence of str, optional
        Neutral sentences with one ``{concept}`` slot; default the project's six.
    layers : sequence of int, optional
        Decoder layers; default all.
    pooling : {"last", "mean"}
        Hidden state at the concept's last token, or the mean over its tokens.
    batch_size : int
    progress : bool

    Returns
    -------
    EmotionBank
        Vectors ``[L, C, D]`` (summing to zero over C), ``hidden_norm [L]`` (mean norm of the
        pooled concept states), metadata.
    """
    from emokern.models import model_fingerprint

    concepts = load_concepts()
    chosen = _check_categories(categories, concepts)
    carriers = list(concepts["carriers"] if carriers is None else carriers)
    if not carriers or isinstance(carriers, str):
        raise ValueError("carriers must be a non-empty list of sentences")
    for c in carriers:
        if not isinstance(c, str) or c.count(CONCEPT_SLOT) != 1:
            raise ValueError(f"carriers must be strings with exactly one {CONCEPT_SLOT} slot, "
                             f"got {c!r}")
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    num_layers = _num_layers(model)
    layers = _check_layers(layers, num_layers)
    _check_positive_int(batch_size, "batch_size")

    started = time.perf_counter()
    sequences, spans, groups = [], [], []
    for g, words in enumerate(chosen.values()):
        for word in words:
            for carrier in carriers:
                ids, a, b = concept_token_span(tokenizer, carrier, word)
                sequences.append(ids)
                spans.append((b - 1, b) if pooling == "last" else (a, b))
                groups.append(g)
    sums, counts, norm_sums = span_hidden_states(
        model, sequences, spans, layers=layers, pad_token_id=_pad_id(tokenizer),
        batch_size=batch_size, progress=progress, desc="concept: read states")
    pooled = sums / counts[:, None, None].clamp_min(1)  # [N, L, D], one state per occurrence
    group = torch.tensor(groups)
    means = torch.stack([pooled[group == g].double().mean(dim=0)
                         for g in range(len(chosen))], dim=1)  # [L, C, D]
    vectors = center_vectors(means).float()
    hidden_norm = (norm_sums / counts[:, None].clamp_min(1)).double().mean(dim=0).float()
    fingerprint = model_fingerprint(model)
    source = json.dumps({"categories": chosen, "carriers": carriers}, sort_keys=True)
    metadata = {
        "method": "concept",
        "source_hash": text_hash(source),
        "source": "concepts.json" if categories is None and carriers == concepts["carriers"]
        else "custom",
        "pooling": pooling,
        "centered": True,
        "num_carriers": len(carriers),
        "words_per_category": {k: len(v) for k, v in chosen.items()},
        "emokern_version": _emokern_version(),
        "fingerprint": fingerprint,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    metadata.update(recommend(vectors, layers, hidden_norm, num_layers, "concept", True,
                              fingerprint))
    return _make_bank(vectors, list(chosen), layers, hidden_norm, metadata)


# --------------------------------------------------------------------------------------------
# One call for the CLI
# --------------------------------------------------------------------------------------------

def extract_main(
    model_name: str | os.PathLike = "default",
    method: str = "ev",
    emotions: Sequence[str] | None = None,
    queries_path: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
    *,
    layers: Sequence[int] | None = None,
    dtype=torch.float16,
    progress: bool = True,
    **options,
):
    """Check the arguments, load the model, extract a bank and save it (float16 by default).

    Everything that can be checked without the model (method, emotion names, the queries
    file, the output directory) is checked before the model is loaded; the bank is written
    atomically, so a failure never leaves a half-written file.

    Parameters
    ----------
    model_name : "default" or path
    method : {"ev", "concept"}
    emotions : sequence of str, optional
        Emotions (ev) or categories (concept); default the method's set.
    queries_path : path, optional
        Queries file for Method EV (one per line).
    out_path : path, optional
        Where to save the bank (``.safetensors``); None saves nothing.
    layers : sequence of int, optional
    dtype : torch.dtype
        Storage dtype of the saved vectors.
    **options
        Passed to :func:`extract_ev` / :func:`extract_concept`.

    Returns
    -------
    EmotionBank
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ev":
        known = list(load_instructions()["emotions"])
        names = _check_names(BASIC_EMOTIONS if emotions is None else emotions, known,
                             "emotions", "emotion")
        queries = load_queries(queries_path)
    else:
        if queries_path is not None:
            raise ValueError("queries_path applies to method 'ev' only")
        names = None if emotions is None else _check_names(
            emotions, list(load_concepts()["categories"]), "emotions", "category")
    if out_path is not None:
        out_path = Path(out_path).expanduser()
        if out_path.suffix != ".safetensors":
            raise ValueError(f"out_path must end in .safetensors, got {str(out_path)!r}")
        if not out_path.parent.is_dir():
            raise ValueError(f"out_path's directory {str(out_path.parent)!r} does not exist")

    from emokern.models import load_model

    model, tokenizer = load_model(model_name)
    if method == "ev":
        bank = extract_ev(model, tokenizer, emotions=names, queries=queries, layers=layers,
                          progress=progress, **options)
    else:
        bank = extract_concept(model, tokenizer, categories=names, layers=layers,
                               progress=progress, **options)
    if out_path is not None:
        bank.save(out_path, dtype=dtype)
    return bank


def _busy_cpus(interval: float = 0.25) -> float:
    """CPUs in use by other processes right now, from two reads of ``/proc/stat`` (the load
    average lags by a minute and counts our own past work); the load average elsewhere."""
    def read():
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    elapsed = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / elapsed)


def auto_threads() -> int:
    """Use one torch thread when other processes keep a CPU busy, else leave torch's default.

    On a shared machine, torch's OpenMP threads wait for each other at every parallel region;
    when another process holds a core, each wait costs a scheduler slice. Measured on the
    2-core dev machine with two other busy processes: greedy generation of 32 x 24 tokens on
    the default model took 38.6 s with 2 threads and 7.9 s with 1. Returns the thread count.
    """
    if _busy_cpus() >= 0.5:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emokern.extract``: regenerate a bank (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m emokern.extract",
                                     description="Extract an emotion bank from a model.")
    parser.add_argument("--model", default="default")
    parser.add_argument("--method", choices=METHODS, default="ev")
    parser.add_argument("--emotions", help="comma-separated names (default: the method's set)")
    parser.add_argument("--queries", help="queries file, one per line (method ev)")
    parser.add_argument("--layers", help="comma-separated decoder layers (default: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: 1 when the machine is busy, see "
                             "auto_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        auto_threads()
    emotions = [e.strip() for e in args.emotions.split(",")] if args.emotions else None
    layers = [int(x) for x in re.split(r"[,\s]+", args.layers.strip())] if args.layers else None
    bank = extract_main(args.model, args.method, emotions, args.queries, args.out, layers=layers)
    meta = bank.metadata
    print(f"saved {args.out}: {len(bank.names)} emotions x {len(bank.layers)} layers, "
          f"{meta.get('seconds_total', math.nan)} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
