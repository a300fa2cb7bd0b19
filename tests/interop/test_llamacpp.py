"""emokern.interop.llamacpp: llama.cpp control vectors out and in, their layer convention, bad
files, atomic writes, the export command."""

import argparse
import os
import pickle

import gguf
import numpy as np
import pytest
import torch
from helpers import random_bank

import emokern
from emokern.interop import llamacpp
from emokern.interop.llamacpp import (
    bank_from_control_vectors,
    bank_from_directions,
    export_main,
    mix_directions,
    read_control_vector,
    write_control_vector,
)


def _write_gguf(path, *, arch="controlvector", layer_count=None, tensors=(), hint="llama",
                count_type="int32"):
    """A GGUF file written field by field with the gguf package, as llama.cpp's tools do."""
    writer = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        writer.add_string(f"{arch}.model_hint", hint)
    if layer_count is not None:
        getattr(writer, f"add_{count_type}")(f"{arch}.layer_count", layer_count)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _generator_file(path, vectors_by_block_output):
    """A control vector laid out exactly as llama.cpp's ``llama-cvector-generator`` writes one
    for a model of ``n_layer`` blocks: int32 ``layer_count = n_layer - 1`` and tensors
    ``direction.1 .. direction.{n_layer - 1}``, where ``direction.{i + 1}`` holds what was
    measured at ``l_out-i`` (the output of block ``i``)."""
    tensors = [(f"direction.{i + 1}", np.asarray(v, dtype=np.float32))
               for i, v in enumerate(vectors_by_block_output)]
    return _write_gguf(path, layer_count=len(tensors), tensors=tensors)


def test_export_import_round_trip_is_bit_identical(small_llama, tmp_path):
    model, _ = small_llama
    bank = random_bank(model)
    mix = {"joy": 2.0, "fear": -0.5}
    path = write_control_vector(bank, mix, tmp_path / "joy.gguf", layers=[1, 2])
    read = read_control_vector(path)
    expected = mix_directions(bank, mix, layers=[1, 2])
    assert list(read) == [1, 2]
    for layer in (1, 2):
        assert read[layer].dtype == np.float32
        assert read[layer].tobytes() == expected[layer].tobytes()
        folded = (2.0 * bank.vector("joy", layer) - 0.5 * bank.vector("fear", layer)) / 2
        np.testing.assert_allclose(read[layer], folded.numpy(), rtol=1e-6, atol=1e-7)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}

    # One emotion at weight 1, spread "each": the bank read back holds the bank's own vectors.
    single = write_control_vector(bank, {"joy": 1}, tmp_path / "single.gguf", layers=[1, 2],
                                  spread="each")
    back = bank_from_control_vectors({"joy": single})
    assert back.names == ["joy"] and back.layers == [1, 2]
    for layer in (1, 2):
        assert torch.equal(back.vector("joy", layer), bank.vector("joy", layer))


def test_direction_n_is_emokern_layer_n_as_llamacpp_applies_it(tiny_llama, tmp_path,
                                                                one_thread):
    """llama.cpp adds ``direction.N`` to the output of block N; steering the imported bank at
    layer N must change ``hidden_states[N + 1]`` (the output of decoder layer N) by exactly that
    vector and leave ``hidden_states[N]`` alone."""
    model, tokenizer = tiny_llama
    n_layer, dim = 4, model.config.hidden_size
    rng = np.random.default_rng(0)
    measured = [rng.standard_normal(dim).astype(np.float32) for _ in range(n_layer - 1)]
    path = _generator_file(tmp_path / "control_vector.gguf", measured)
    directions = read_control_vector(path, num_layers=n_layer)
    assert list(directions) == [1, 2, 3]  # block 0 is never steered
    for n, vector in directions.items():
        assert np.array_equal(vector, measured[n - 1])
    bank = bank_from_control_vectors([path], num_layers=n_layer)
    assert bank.names == ["control_vector"] and bank.layers == [1, 2, 3]
    assert bank.metadata["model_hints"] == {"control_vector": "llama"}

    enc = tokenizer(["The weather today"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc, output_hidden_states=True).hidden_states
        for n in (1, 2):
            with emokern.steer(model, bank, [{"control_vector": 1.0}], layers=[n],
                               spread="each", monitor=False):
                steered = model(**enc, output_hidden_states=True).hidden_states
            assert torch.equal(steered[n], plain[n])
            delta = steered[n + 1] - plain[n + 1]
            expected = torch.from_numpy(directions[n]).expand_as(delta)
            torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5)


def test_a_generator_file_with_uint32_layer_count_reads_too(tmp_path):
    # repeng and others write the count as uint32; llama.cpp itself ignores its type.
    vec = np.ones(8, dtype=np.float32)
    path = _write_gguf(tmp_path / "u.gguf", layer_count=1, count_type="uint32",
                       tensors=[("direction.5", vec)])
    assert list(read_control_vector(path)) == [5]


@pytest.mark.parametrize("case, match", [
    ("architecture", "general.architecture is 'llama', expected 'controlvector'"),
    ("no_layer_count", "has no controlvector.layer_count"),
    ("float16", "is F16; control vector directions must be F32"),
    ("layer_zero", "direction.0 is out of range"),
    ("layer_beyond", "direction.7 is out of range for a model of 4 decoder layers"),
    ("two_d", "must be 1-D"),
    ("name", "'bias.1' is not named direction.N"),
    ("lengths", "has 4 values, the other directions 8"),
    ("nan", "has NaN or inf"),
    ("empty", "holds no direction tensors"),
    ("pickle", "is not a GGUF file"),
    ("truncated", "is not a readable GGUF file"),
])
def test_bad_files_give_one_clear_error(tmp_path, case, match):
    path = tmp_path / f"{case}.gguf"
    vec = np.ones(8, dtype=np.float32)
    if case == "pickle":
        path.write_bytes(pickle.dumps({1: vec}))
    elif case == "truncated":
        _write_gguf(path, layer_count=1, tensors=[("direction.1", vec)])
        path.write_bytes(path.read_bytes()[:40])
    else:
        arch = "llama" if case == "architecture" else "controlvector"
        tensors = {
            "float16": [("direction.1", vec.astype(np.float16))],
            "layer_zero": [("direction.0", vec)],
            "layer_beyond": [("direction.7", vec)],
            "two_d": [("direction.1", np.ones((2, 4), dtype=np.float32))],
            "name": [("bias.1", vec)],
            "lengths": [("direction.1", vec), ("direction.2", vec[:4])],
            "nan": [("direction.1", np.full(8, np.nan, dtype=np.float32))],
            "empty": [],
        }.get(case, [("direction.1", vec)])
        _write_gguf(path, arch=arch, tensors=tensors,
                    layer_count=None if case == "no_layer_count" else len(tensors))
    with pytest.raises(ValueError, match=match) as info:
        read_control_vector(path, num_layers=4)
    assert str(info.value).startswith("emokern.interop: ")
    assert str(path) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no control vector file"):
        read_control_vector(tmp_path / "absent.gguf")


def test_bad_mixes_and_layers_are_refused(small_llama, tmp_path):
    model, _ = small_llama
    bank = random_bank(model)
    out = tmp_path / "x.gguf"
    for kwargs, exc, match in (
        ({"mix": {}}, ValueError, "non-empty dict"),
        ({"mix": {"awe": 1.0}}, ValueError, "unknown emotion 'awe'"),
        ({"mix": {"joy": float("nan")}}, ValueError, "must be finite"),
        ({"mix": {"joy": 1.0}, "layers": [0, 1]}, ValueError, "layer 0 cannot be exported"),
        ({"mix": {"joy": 1.0}, "layers": [5]}, ValueError, "outside the model"),
        ({"mix": {"joy": 1.0}, "layers": ["1"]}, TypeError, "must hold ints"),
        ({"mix": {"joy": 1.0}, "spread": "all"}, ValueError, "spread must be one of"),
    ):
        mix = kwargs.pop("mix")
        with pytest.raises(exc, match=match):
            write_control_vector(bank, mix, out, **kwargs)
    assert not out.exists()
    with pytest.raises(TypeError, match="must be an EmotionBank"):
        write_control_vector(object(), {"joy": 1.0}, out)


def test_rec_weights_and_default_layers_follow_the_bank(small_llama, tmp_path):
    model, _ = small_llama
    bank = random_bank(model, recommended_alpha=3.0)  # recommended layers [1, 2]
    path = write_control_vector(bank, {"joy": "rec"}, tmp_path / "rec.gguf", spread="each")
    read = read_control_vector(path)
    assert list(read) == [1, 2]
    np.testing.assert_allclose(read[1], (3.0 * bank.vector("joy", 1)).numpy(), rtol=1e-6)


def test_writes_are_atomic(small_llama, tmp_path, monkeypatch):
    model, _ = small_llama
    bank = random_bank(model)
    path = tmp_path / "joy.gguf"
    path.write_bytes(b"previous")
    calls = []
    real = llamacpp.atomic_write
    monkeypatch.setattr(llamacpp, "atomic_write",
                        lambda p, data: calls.append(p) or real(p, data))
    write_control_vector(bank, {"joy": 1.0}, path, layers=[1])
    assert calls == [path] and path.read_bytes()[:4] == b"GGUF"

    def boom(*args):
        raise OSError("disk full")

    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_control_vector(bank, {"joy": 2.0}, path, layers=[1])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joy.gguf"]


def test_banks_from_several_files_need_the_same_layers(small_llama, tmp_path):
    model, _ = small_llama
    bank = random_bank(model)
    joy = write_control_vector(bank, {"joy": 1.0}, tmp_path / "joy.gguf", layers=[1, 2])
    fear = write_control_vector(bank, {"fear": 1.0}, tmp_path / "fear.gguf", layers=[1, 2])
    both = bank_from_control_vectors([joy, fear])
    assert both.names == ["joy", "fear"] and both.layers == [1, 2]
    assert both.metadata["source"] == "llama.cpp control vector"
    one = write_control_vector(bank, {"fear": 1.0}, tmp_path / "one.gguf", layers=[1])
    with pytest.raises(ValueError, match="every emotion needs the same layers"):
        bank_from_control_vectors({"joy": joy, "fear": one})
    with pytest.raises(ValueError, match="non-empty dict"):
        bank_from_directions({})


def test_export_command(small_llama, tmp_path, capsys):
    model, _ = small_llama
    bank = random_bank(model)
    bank_path = bank.save(tmp_path / "bank.safetensors")
    out = tmp_path / "joy.gguf"
    args = argparse.Namespace(bank=str(bank_path), mix={"joy": 2.0, "fear": 0.5}, out=str(out),
                              layers="1,2", spread=None, model_hint=None)
    assert export_main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "--control-vector" in printed and "layers [1, 2]" in printed
    read = read_control_vector(out)
    expected = mix_directions(bank, {"joy": 2.0, "fear": 0.5}, layers=[1, 2])
    assert all(read[n].tobytes() == expected[n].tobytes() for n in (1, 2))
    args.layers, args.model_hint, args.spread = "auto", "gemma3", "each"
    export_main(args)
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("controlvector.model_hint").contents() == "gemma3"
    args.layers = "1,x"
    with pytest.raises(ValueError, match="comma-separated ints"):
        export_main(args)


def test_model_hint_names_llamacpp_architectures(small_llama):
    model, _ = small_llama
    assert llamacpp.model_hint_for(random_bank(model)) == "llama"
    assert llamacpp.model_hint_for(random_bank(model, fingerprint=False)) == "unknown"
    gemma = random_bank(model, fingerprint=False)
    gemma = gemma.replace(metadata={**gemma.metadata,
                                    "fingerprint": {"architecture": "gemma3_text"}})
    assert llamacpp.model_hint_for(gemma) == "gemma3"
