"""extract_main (what ``emokern extract`` runs): every argument is checked before the model is
loaded, and nothing is written on failure."""

import pytest

from emokern.extract import METHODS, extract_main


def test_extract_main_checks_everything_before_loading_the_model(tmp_path):
    out = tmp_path / "bank.safetensors"
    missing_model = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="unknown emotion"):
        extract_main(missing_model, "ev", ["joy", "happyness"], None, out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no query"):
        extract_main(missing_model, "ev", None, empty, out)
    with pytest.raises(ValueError, match="does not exist"):
        extract_main(missing_model, "ev", None, tmp_path / "nope.txt", out)
    with pytest.raises(ValueError, match="method must be one of"):
        extract_main(missing_model, "pca", None, None, out)
    with pytest.raises(ValueError, match="unknown category"):
        extract_main(missing_model, "concept", ["joy", "glee"], None, out)
    with pytest.raises(ValueError, match="out_path's directory"):
        extract_main(missing_model, "ev", None, None, tmp_path / "no" / "b.safetensors")
    # Only once every argument is fine does the (missing) model fail to load.
    with pytest.raises(FileNotFoundError, match="neither 'default' nor an existing path"):
        extract_main(missing_model, "ev", None, None, out)
    assert list(tmp_path.iterdir()) == [empty]


def test_extract_main_rejects_options_of_the_other_method(tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("A query?\n")
    with pytest.raises(ValueError, match="queries_path applies to method 'ev' only"):
        extract_main(str(tmp_path / "no-model"), "concept", None, queries, None)
    with pytest.raises(ValueError, match="out_path must end in .safetensors"):
        extract_main(str(tmp_path / "no-model"), "ev", None, None, tmp_path / "bank.pt")
    assert METHODS == ("ev", "concept")
