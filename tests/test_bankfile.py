"""The bank's file (emokern.bankfile): layout, metadata schema, the renamed default weight, and
safe reading and writing (the rest of the file behaviour is covered through EmotionBank in
tests/test_bank.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from emokern import bankfile
from emokern.bank import EmotionBank
from emokern.bankfile import FORMAT, RENAMED_KEYS, check_metadata


def _old_file(path, metadata):
    """A bank file as versions before ``default_weight`` wrote it."""
    header = {"format": FORMAT, "names": json.dumps(["a", "b"]), "layers": json.dumps([0, 1]),
              "metadata": json.dumps(metadata)}
    save_file({"vectors": torch.randn(2, 2, 4)}, str(path), metadata=header)
    return path


def test_older_files_read_recommended_alpha_as_the_default_weight(tmp_path):
    path = _old_file(tmp_path / "old.safetensors", {"method": "ev", "recommended_alpha": 6.0})
    bank = EmotionBank.load(path)
    assert bank.default_weight == 6.0 and bank.recommended_alpha == 6.0
    assert bank.recommended_weight("a") == 6.0
    assert "recommended_alpha" not in bank.metadata and bank.metadata["default_weight"] == 6.0
    # Saving again writes the current name only.
    saved = bank.save(tmp_path / "new.safetensors")
    raw = bankfile.read(saved)["metadata"]
    assert raw["default_weight"] == 6.0 and "recommended_alpha" not in raw


def test_shipped_banks_load_with_a_default_weight():
    for method in ("ev", "concept"):
        path = EmotionBank.default_path(method)
        if not path.exists():
            continue
        stored = bankfile.read(path)["metadata"]
        bank = EmotionBank.load(path)
        expected = stored.get("default_weight", stored.get("recommended_alpha", 1.0))
        assert bank.default_weight == float(expected) > 0


def test_metadata_schema_renames_and_checks():
    assert RENAMED_KEYS == {"recommended_alpha": "default_weight"}
    assert check_metadata({"recommended_alpha": 2}, [0]) == {"default_weight": 2}
    assert check_metadata({"default_weight": 2.5, "recommended_alpha": 2.5}, [0]) == \
        {"default_weight": 2.5}
    with pytest.raises(ValueError, match="both 'default_weight' .*'recommended_alpha'"):
        check_metadata({"default_weight": 2.0, "recommended_alpha": 3.0}, [0])
    with pytest.raises(TypeError, match=r"metadata\['default_weight'\] must be int or float"):
        check_metadata({"default_weight": "2"}, [0])
    with pytest.raises(ValueError, match=r"EmotionBank: metadata\['default_weight'\] is not "
                                         r"JSON-serialisable"):
        check_metadata({"default_weight": float("inf")}, [0])
    assert check_metadata(None, [0]) == {}


def test_write_and_read_round_trip(tmp_path):
    vectors = torch.randn(2, 3, 4)
    mean, std = torch.randn(2, 3), torch.rand(2, 3) + 0.5
    path = bankfile.write(tmp_path / "b.safetensors", vectors, ["x", "y", "z"], [3, 5],
                          {"method": "concept"}, hidden_norm=torch.ones(2), neutral_mean=mean,
                          neutral_std=std, dtype=torch.float16)
    fields = bankfile.read(path)
    assert fields["names"] == ["x", "y", "z"] and fields["layers"] == [3, 5]
    assert fields["vectors"].dtype == torch.float32
    torch.testing.assert_close(fields["vectors"], vectors.half().float())
    torch.testing.assert_close(fields["neutral_mean"], mean)
    torch.testing.assert_close(fields["neutral_std"], std)
    assert fields["metadata"]["method"] == "concept"
    assert {"emokern_version", "created"} <= set(fields["metadata"])
    with pytest.raises(FileNotFoundError, match="no bank file"):
        bankfile.read(tmp_path / "missing.safetensors")
    assert str(bankfile.invalid(path, "why")).startswith(
        f"EmotionBank.load: {str(path)!r} is not a valid emotion bank: why")
