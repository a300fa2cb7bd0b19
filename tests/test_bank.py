"""EmotionBank: validation, selection, compatibility, and safe safetensors IO."""

import ast
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import emokern
import emokern.bank as bank_module
from emokern import bankfile
from emokern.bank import EmotionBank
from emokern.bankfile import FORMAT
from emokern.emotions import BASIC_EMOTIONS
from emokern.models import model_fingerprint, tiny_model

NAMES = ["joy", "sadness", "anger", "fear", "disgust", "surprise"]
LAYERS = [0, 1, 3]
DIM = 64


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", num_layers=4, hidden_size=DIM, seed=0)[0]


def make_bank(model=None, *, n_layers=3, names=NAMES, layers=LAYERS, dim=DIM, **meta):
    vectors = torch.randn(len(layers), len(names), dim)
    metadata = {"method": "ev", "source_hash": "abc123", "default_weight": 4.0,
                "recommended_layers": [layers[len(layers) // 2]], "centered": True}
    if model is not None:
        metadata["fingerprint"] = model_fingerprint(model)
    metadata.update(meta)
    hidden = torch.linspace(1.0, 3.0, len(layers))
    return EmotionBank(vectors, names, layers, hidden_norm=hidden, metadata=metadata)


def assert_same_bank(a, b, **tol):
    assert a.names == b.names and a.layers == b.layers
    torch.testing.assert_close(a.vectors.float(), b.vectors.float(), **tol)
    torch.testing.assert_close(a.hidden_norm, b.hidden_norm)


# ------------------------------------------------------------------------------------------
# Construction and accessors
# ------------------------------------------------------------------------------------------

def test_accessors(tiny):
    bank = make_bank(tiny)
    assert len(bank) == bank.n_emotions == 6 and bank.n_layers == 3 and bank.dim == DIM
    assert bank.method == "ev" and bank.default_weight == 4.0
    assert bank.recommended_layers == [1]
    assert bank.fingerprint == model_fingerprint(tiny)
    assert bank.index("anger") == 2 and "fear" in bank and "calm" not in bank
    assert torch.equal(bank.vector("fear", 3), bank.vectors[2, 3])
    assert bank.metadata["centered"] is True
    # Views are copies: editing them does not change the bank.
    bank.metadata["method"] = "x"
    bank.names.append("x")
    assert bank.method == "ev" and len(bank.names) == 6
    torch.testing.assert_close(bank.norms(), bank.vectors.norm(dim=-1))
    cos = bank.cosine(1)
    assert cos.shape == (6, 6)
    torch.testing.assert_close(cos.diagonal(), torch.ones(6))
    v = bank.vectors[1]
    expected = (v[0] @ v[4]) / (v[0].norm() * v[4].norm())
    torch.testing.assert_close(cos[0, 4], expected)
    text = repr(bank)
    assert "joy" in text and "layers=[0, 1, 3]" in text


def test_fallbacks_without_metadata():
    bank = EmotionBank(torch.randn(5, 2, 8), ["a", "b"], [2, 4, 6, 8, 10])
    assert bank.metadata == {} and bank.method is None and bank.fingerprint is None
    assert bank.default_weight == 1.0
    assert bank.recommended_layers == [6]
    assert bank.hidden_norm is None
    assert "hidden" in bank.summary()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"names": ["joy", "joy", "fear"]}, ValueError, r"names must be unique.*joy"),
    ({"names": "joy"}, TypeError, "names must be a list"),
    ({"names": ["joy", 3, "fear"]}, TypeError, "names must be non-empty strings"),
    ({"layers": [0, 0, 1]}, ValueError, r"layers must be unique.*\[0\]"),
    ({"layers": [0, -1, 2]}, ValueError, "non-negative"),
    ({"layers": [0, 1.0, 2]}, TypeError, "list of ints"),
    ({"vectors": torch.randn(3, 2, 4)}, ValueError, r"shape \[3, 2, 4\].*3 names"),
    ({"vectors": torch.randn(3, 4)}, ValueError, r"\[L, K, D\]"),
    ({"vectors": torch.randn(3, 0, 4), "names": []}, ValueError, "at least one emotion"),
    ({"layers": [0, True, 2]}, TypeError, "list of ints"),
    ({"vectors": torch.randn(3, 3, 4).double()}, TypeError, "float32"),
    ({"vectors": [[[1.0]]]}, TypeError, "torch.Tensor"),
    ({"hidden_norm": torch.ones(2)}, ValueError, r"hidden_norm must have shape \[3\]"),
    ({"hidden_norm": torch.tensor([1.0, 0.0, 1.0])}, ValueError, "finite and positive"),
    ({"metadata": {"created": object()}}, TypeError, "JSON"),
    ({"metadata": {"recommended_alpha": "4"}}, TypeError, "recommended_alpha"),
    ({"metadata": {"recommended_alpha": float("nan")}}, ValueError, "JSON"),
    ({"metadata": {"recommended_layers": [5]}}, ValueError, r"subset of the bank's layers"),
    ({"metadata": {"fingerprint": "llama"}}, TypeError, "fingerprint"),
    ({"metadata": ["method"]}, TypeError, "metadata must be a dict"),
])
def test_constructor_rejects_bad_input(kwargs, exc, match):
    args = {"vectors": torch.randn(3, 3, 4), "names": ["joy", "sadness", "fear"],
            "layers": [0, 1, 2], "hidden_norm": None, "metadata": None}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        EmotionBank(args["vectors"], args["names"], args["layers"],
                    hidden_norm=args["hidden_norm"], metadata=args["metadata"])


def test_constructor_rejects_nan_and_zero_vectors():
    vectors = torch.randn(2, 3, 4)
    vectors[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"finite.*'c' at layer 7"):
        EmotionBank(vectors, ["a", "b", "c"], [5, 7])
    vectors = torch.randn(2, 3, 4)
    vectors[0, 1] = 0
    with pytest.raises(ValueError, match=r"'b' at layer 5 has zero norm"):
        EmotionBank(vectors, ["a", "b", "c"], [5, 7])


# ------------------------------------------------------------------------------------------
# select / to
# ------------------------------------------------------------------------------------------

def test_select_keeps_the_order_given(tiny):
    bank = make_bank(tiny)
    sub = bank.select(["fear", "joy"], [3, 0])
    assert sub.names == ["fear", "joy"] and sub.layers == [3, 0]
    assert torch.equal(sub.vector("fear", 3), bank.vector("fear", 3))
    assert torch.equal(sub.vector("joy", 0), bank.vector("joy", 0))
    torch.testing.assert_close(sub.hidden_norm, bank.hidden_norm[[2, 0]])
    assert sub.fingerprint == bank.fingerprint
    # The recommended layer (1) is gone, so the fallback (middle kept layer) applies.
    assert "recommended_layers" not in sub.metadata and sub.recommended_layers == [0]
    assert bank.select(layers=[1, 3]).recommended_layers == [1]
    assert bank.select("anger").names == ["anger"]
    assert bank.select(layers=3).layers == [3]
    assert bank.select(layers=np.array([3, 1])).layers == [3, 1]
    assert torch.equal(bank.vector("joy", np.int64(1)), bank.vector("joy", 1))
    # select copies: writing into the selection leaves the bank alone.
    sub.vectors.zero_()
    assert bank.vector("fear", 3).norm() > 0


def test_select_rejects_unknown_names_and_layers(tiny):
    bank = make_bank(tiny)
    with pytest.raises(ValueError, match=r"unknown emotions \['calm'\].*'joy', 'sadness'"):
        bank.select(["joy", "calm"])
    with pytest.raises(ValueError, match=r"unknown layers \[2\].*\[0, 1, 3\]"):
        bank.select(layers=[1, 2])
    with pytest.raises(ValueError, match="unique"):
        bank.select(["joy", "joy"])
    with pytest.raises(ValueError, match="unknown emotion 'calm'"):
        bank.vector("calm", 0)
    with pytest.raises(ValueError, match=r"unknown layer 2.*\[0, 1, 3\]"):
        bank.vector("joy", 2)


def test_to_converts_and_copies(tiny):
    bank = make_bank(tiny)
    half = bank.to(dtype=torch.bfloat16)
    assert half.vectors.dtype == torch.bfloat16 and half.hidden_norm.dtype == torch.float32
    assert half.metadata == bank.metadata
    torch.testing.assert_close(half.vectors.float(), bank.vectors, rtol=1e-2, atol=1e-2)
    same = bank.to("cpu")
    same.vectors.zero_()
    assert bank.vectors.norm() > 0
    with pytest.raises(TypeError, match="dtype"):
        bank.to(dtype=torch.int32)


# ------------------------------------------------------------------------------------------
# Compatibility with a model
# ------------------------------------------------------------------------------------------

def test_check_compatible_accepts_its_model_in_any_dtype(tiny):
    bank = make_bank(tiny)
    bank.check_compatible(tiny)
    bank.check_compatible(tiny_model(seed=0)[0].to(torch.bfloat16))


def test_check_compatible_names_every_difference(tiny):
    bank = make_bank(tiny)
    smaller, _ = tiny_model("llama", num_layers=2, hidden_size=32, seed=0)
    with pytest.raises(ValueError) as info:
        bank.check_compatible(smaller)
    message = str(info.value)
    for part in ("hidden size: bank 64, model 32", "layer count: bank 4, model 2",
                 "layers [3] do not exist"):
        assert part in message, message
    gpt2, _ = tiny_model("gpt2", num_layers=4, hidden_size=DIM)
    with pytest.raises(ValueError, match="architecture: bank 'llama', model 'gpt2'"):
        bank.check_compatible(gpt2)


def test_check_compatible_tells_same_shaped_models_apart(tiny):
    bank = make_bank(tiny)
    other, _ = tiny_model(seed=1)
    with pytest.raises(ValueError, match="input-embedding hash"):
        bank.check_compatible(other)
    bank.check_compatible(other, strict=False)


def test_check_compatible_without_fingerprint_still_checks_shape_and_layers(tiny):
    bank = make_bank(None, layers=[0, 5], dim=DIM)
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist.*4 decoder layers"):
        bank.check_compatible(tiny)
    with pytest.raises(ValueError, match="D = 32"):
        make_bank(None, dim=32).check_compatible(tiny)


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, {"rtol": 0, "atol": 0}),
                                        (torch.float16, {"rtol": 1e-3, "atol": 1e-3}),
                                        (torch.bfloat16, {"rtol": 1e-2, "atol": 1e-2})])
def test_round_trip(tmp_path, tiny, dtype, tol):
    bank = make_bank(tiny)
    path = bank.save(tmp_path / "bank.safetensors", dtype=dtype)
    assert load_file(path)["vectors"].dtype == dtype
    loaded = EmotionBank.load(path)
    assert loaded.vectors.dtype == torch.float32
    assert_same_bank(loaded, bank, **tol)
    meta = loaded.metadata
    assert meta.pop("emokern_version") == emokern.__version__
    assert meta.pop("created")
    assert meta == bank.metadata
    loaded.check_compatible(tiny)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


def test_round_trip_without_hidden_norm(tmp_path):
    bank = EmotionBank(torch.randn(1, 2, 3), ["a", "b"], [4])
    loaded = EmotionBank.load(bank.save(tmp_path / "b.safetensors"))
    assert loaded.hidden_norm is None and torch.equal(loaded.vectors, bank.vectors)


def test_header_is_plain_json(tmp_path, tiny):
    path = make_bank(tiny).save(tmp_path / "bank.safetensors")
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header["__metadata__"]
    assert meta["format"] == FORMAT
    assert json.loads(meta["names"]) == NAMES and json.loads(meta["layers"]) == LAYERS
    assert json.loads(meta["metadata"])["fingerprint"] == model_fingerprint(tiny)


def test_float16_overflow_is_refused_before_writing(tmp_path):
    bank = EmotionBank(torch.full((1, 1, 4), 1e6), ["a"], [0])
    with pytest.raises(ValueError, match="overflow"):
        bank.save(tmp_path / "b.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="dtype"):
        bank.save(tmp_path / "b.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match="directory"):
        bank.save(tmp_path)


def test_failed_save_keeps_the_old_bank_and_leaves_no_temp_file(tmp_path, tiny, monkeypatch):
    path = tmp_path / "bank.safetensors"
    old = make_bank(tiny)
    old.save(path)
    before = path.read_bytes()
    new = make_bank(tiny, names=["calm"])

    # Fail midway: the temporary file is half written when the disk "fills up".
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
    assert EmotionBank.load(path).names == NAMES
    # A later save succeeds and replaces the file.
    new.save(path)
    assert EmotionBank.load(path).names == ["calm"]


def test_load_rejects_a_truncated_file(tmp_path, tiny):
    path = make_bank(tiny).save(tmp_path / "bank.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"bank\.safetensors.*not a valid emotion bank"):
            EmotionBank.load(path)


def test_load_rejects_garbage_and_missing_files(tmp_path):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"\x80\x04pickle? no thanks" * 10)
    with pytest.raises(ValueError, match="bank.safetensors.*cannot read it as safetensors"):
        EmotionBank.load(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        EmotionBank.load(tmp_path / "nope.safetensors")


def _write(path, tensors, header):
    save_file(tensors, str(path), metadata=header)
    return path


def _header(names=("a", "b"), layers=(0, 1), metadata=None):
    return {"format": FORMAT, "names": json.dumps(list(names)), "layers": json.dumps(list(layers)),
            "metadata": json.dumps(metadata if metadata is not None else {"method": "ev"})}


@pytest.mark.parametrize("tensors, header, match", [
    ({"vectors": torch.randn(2, 3, 4)}, _header(), r"shape \[2, 3, 4\].*2 names"),
    ({"vectors": torch.randn(3, 2, 4)}, _header(), r"shape \[3, 2, 4\].*2 layers"),
    ({"vectors": torch.randn(2, 2, 4), "hidden_norm": torch.ones(3)}, _header(),
     r"hidden_norm must have shape \[2\]"),
    ({"other": torch.randn(2, 2, 4)}, _header(), "no 'vectors' tensor"),
    ({"vectors": torch.randn(2, 2, 4), "extra": torch.ones(1)}, _header(), "unexpected tensors"),
    ({"vectors": torch.randn(2, 2, 4)}, {k: v for k, v in _header().items() if k != "metadata"},
     r"header lacks \['metadata'\]"),
    ({"vectors": torch.randn(2, 2, 4)}, {k: v for k, v in _header().items() if k != "names"},
     r"header lacks \['names'\]"),
    ({"vectors": torch.randn(2, 2, 4)}, {**_header(), "format": "other/1"}, "format"),
    ({"vectors": torch.randn(2, 2, 4)}, {**_header(), "metadata": "{oops"}, "does not parse"),
    ({"vectors": torch.randn(2, 2, 4)}, {**_header(), "metadata": "[1]"}, "JSON object"),
    ({"vectors": torch.randn(2, 2, 4)}, _header(names=("a", "a")), "names must be unique"),
    ({"vectors": torch.full((2, 2, 4), float("nan"))}, _header(), "finite"),
    ({"vectors": torch.ones(2, 2, 4, dtype=torch.int32)}, _header(), "dtype torch.int32"),
])
def test_load_rejects_malformed_banks(tmp_path, tensors, header, match):
    path = _write(tmp_path / "weird.safetensors", tensors, header)
    with pytest.raises(ValueError, match=r"weird\.safetensors") as info:
        EmotionBank.load(path)
    assert info.match(match)


class _Tripwire:
    """Unpickling this touches a marker file: proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "bank.safetensors"
    torch.save({"vectors": torch.randn(1, 1, 4), "trap": _Tripwire(marker)}, path)
    with pytest.raises(ValueError, match="cannot read it as safetensors"):
        EmotionBank.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("module", [bank_module, bankfile], ids=["bank", "bankfile"])
def test_load_reads_safetensors_only(module):
    source = inspect.getsource(module)
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "pickle" not in imported and "pickle" not in modules
    assert "torch.load" not in source and "np.load" not in source
    # EmotionBank.load reads through the file module, which opens safetensors only.
    assert "bankfile.read" in inspect.getsource(EmotionBank.load)
    assert "safe_open" in inspect.getsource(bankfile.read)


# ------------------------------------------------------------------------------------------
# Shipped banks
# ------------------------------------------------------------------------------------------

def test_load_default_rejects_unknown_methods():
    with pytest.raises(ValueError, match=r"method must be one of \('ev', 'concept'\)"):
        EmotionBank.load_default("pca")


@pytest.mark.parametrize("method", ["ev", "concept"])
def test_load_default(method):
    path = EmotionBank.default_path(method)
    assert path.name == f"default-{method}.safetensors"
    assert Path(bank_module.__file__).parent / "data" / "banks" == path.parent
    if not path.exists():
        with pytest.raises(FileNotFoundError, match="emokern prepare --model default"):
            EmotionBank.load_default(method)
        pytest.skip(f"{path.name} is not built yet (written by the extraction step)")
    bank = EmotionBank.load_default(method)
    assert bank.method == method and bank.dim == 576
    fp = bank.fingerprint
    assert (fp["architecture"], fp["num_layers"], fp["vocab_size"]) == ("llama", 30, 49152)
    assert set(bank.recommended_layers) <= set(bank.layers)


def test_shipped_banks_of_the_second_model():
    path = EmotionBank.default_path("ev", model="gemma3-270m")
    assert path.name == "gemma3-270m-ev.safetensors"
    bank = EmotionBank.load_default("ev", model="gemma3-270m")
    fp = bank.fingerprint
    assert (fp["architecture"], fp["num_layers"], bank.dim) == ("gemma3_text", 18, 640)
    assert bank.calibrated and bank.names[:6] == list(BASIC_EMOTIONS)
    with pytest.raises(ValueError, match="model must be one of"):
        EmotionBank.default_path("ev", model="llama-7b")


def test_a_bank_is_named_as_every_command_names_it(tmp_path):
    assert EmotionBank.named("default").method == "ev"
    assert EmotionBank.named("ev").method == "ev" and EmotionBank.named("concept").method == \
        "concept"
    assert EmotionBank.named("gemma3-270m-ev").dim == 640
    EmotionBank.named("concept").save(tmp_path / "b.safetensors")
    assert EmotionBank.named(tmp_path / "b.safetensors").method == "concept"
    for bad in ("gemma3-270m", "default-pca", str(tmp_path / "missing.safetensors")):
        with pytest.raises(ValueError, match=r"'gemma3-270m-concept'\) or a bank file"):
            EmotionBank.named(bad)


# ------------------------------------------------------- per-emotion weights, neutral baseline


def _calibrated(bank, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (bank.n_layers, bank.n_emotions)
    return bank.replace(neutral_mean=torch.randn(shape, generator=g),
                        neutral_std=torch.rand(shape, generator=g) + 0.5)


def test_recommended_weight_per_emotion_falls_back_to_the_bank_wide_one():
    bank = make_bank(default_weight=2.0, recommended_weights={
        NAMES[0]: {"weight": 4.0, "layers": [LAYERS[0]], "gain": 0.2}})
    assert bank.recommended_weight(NAMES[0]) == 4.0
    assert bank.recommended_weight(NAMES[1]) == 2.0
    assert bank.recommended_weights[NAMES[0]]["gain"] == 0.2
    with pytest.raises(ValueError, match="unknown emotion"):
        bank.recommended_weight("boredom")
    for bad in ({NAMES[0]: {"weight": float("inf")}}, {NAMES[0]: 3.0},
                {NAMES[0]: {"weight": 1.0, "layers": [99]}}):
        with pytest.raises((TypeError, ValueError), match="recommended_weights"):
            make_bank(recommended_weights=bad)
    # select keeps the kept emotions' records only.
    kept = bank.select([NAMES[1], NAMES[0]], layers=[LAYERS[1]])
    assert list(kept.recommended_weights) == [NAMES[0]]
    assert "layers" not in kept.recommended_weights[NAMES[0]]


def test_neutral_baseline_round_trip_and_standard_scores(tmp_path):
    bank = _calibrated(make_bank(detection_layers=[LAYERS[-1]]))
    assert bank.calibrated and bank.detection_layers == [LAYERS[-1]]
    path = bank.save(tmp_path / "b.safetensors", dtype=torch.float16)
    loaded = EmotionBank.load(path)
    assert loaded.calibrated
    torch.testing.assert_close(loaded.neutral_mean, bank.neutral_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.neutral_std, bank.neutral_std, rtol=0, atol=0)
    # Expected values by hand (float64), from the baseline as given, rows picked by position:
    # bank layers [LAYERS[2], LAYERS[0]] are rows 2 and 0 of the baseline.
    mu = bank.neutral_mean.double().numpy()
    sigma = bank.neutral_std.double().numpy()
    raw = np.random.default_rng(1).normal(size=(4, 2, len(NAMES))) * 3  # [B, L', K]
    expected = (raw - mu[[2, 0]][None]) / sigma[[2, 0]][None]
    z = bank.standardize(torch.tensor(raw, dtype=torch.float32), [LAYERS[2], LAYERS[0]])
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-5, atol=1e-5)
    two = mu[[2, 0]] + 2.0 * sigma[[2, 0]]  # two neutral spreads above the neutral mean
    z2 = bank.standardize(torch.tensor(two[None], dtype=torch.float32), [LAYERS[2], LAYERS[0]])
    torch.testing.assert_close(z2, torch.full_like(z2, 2.0))
    # One emotion (column 1 of the baseline) and the layers reversed.
    z1 = bank.standardize(torch.tensor(raw[:, ::-1, [1]].copy(), dtype=torch.float32),
                          [LAYERS[0], LAYERS[2]], names=[NAMES[1]])
    np.testing.assert_allclose(z1.numpy(), (raw[:, ::-1, [1]] - mu[[0, 2]][None, :, [1]])
                               / sigma[[0, 2]][None, :, [1]], rtol=1e-5, atol=1e-5)
    mean, std = bank.neutral_stats([LAYERS[2], LAYERS[0]])
    np.testing.assert_array_equal(mean.numpy(), mu[[2, 0]].astype(np.float32))
    np.testing.assert_array_equal(std.numpy(), sigma[[2, 0]].astype(np.float32))
    sub = bank.select([NAMES[2]], layers=[LAYERS[1]])
    assert sub.neutral_mean.shape == (1, 1)
    assert float(sub.neutral_mean[0, 0]) == float(bank.neutral_mean[1, 2])
    assert bank.to(dtype=torch.float16).calibrated
    with pytest.raises(ValueError, match="must end in"):
        bank.standardize(torch.zeros(2, 3), [LAYERS[0]])


def test_banks_without_a_baseline_still_load_and_say_so(tmp_path):
    bank = make_bank()
    path = bank.save(tmp_path / "old.safetensors")
    assert set(load_file(str(path))) == {"vectors", "hidden_norm"}
    loaded = EmotionBank.load(path)
    assert not loaded.calibrated and loaded.detection_layers == loaded.recommended_layers
    with pytest.raises(ValueError, match="no neutral baseline"):
        loaded.neutral_stats([LAYERS[0]])
    for shipped in ("ev", "concept"):
        assert EmotionBank.load_default(shipped).n_emotions >= 6


def test_neutral_baseline_is_checked():
    bank = make_bank()
    shape = (bank.n_layers, bank.n_emotions)
    cases = [({"neutral_mean": torch.zeros(shape)}, "both or neither"),
             ({"neutral_mean": torch.zeros(shape), "neutral_std": torch.zeros(shape)},
              "positive"),
             ({"neutral_mean": torch.zeros(2, 2), "neutral_std": torch.ones(2, 2)}, "shape"),
             ({"neutral_mean": torch.full(shape, float("nan")), "neutral_std": torch.ones(shape)},
              "finite")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            EmotionBank(bank.vectors, bank.names, bank.layers, **kwargs)
