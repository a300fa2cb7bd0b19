"""The optional ``steering-vectors`` comparison: absent is "not available", broken is an error
(a broad ``except`` would turn a broken import into a silently skipped comparison)."""

from __future__ import annotations

import sys

import pytest

from emokern.benchmarks.hook_baselines import steering_vectors_available, steering_vectors_version


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """``write(source)``: a ``steering_vectors`` package with ``source`` as its ``__init__``,
    found before any installed copy; the real module (if imported) comes back afterwards."""
    saved = {name: mod for name, mod in sys.modules.items()
             if name == "steering_vectors" or name.startswith("steering_vectors.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> None:
        package = tmp_path / "steering_vectors"
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text(source)

    yield write
    for name in [n for n in sys.modules
                 if n == "steering_vectors" or n.startswith("steering_vectors.")]:
        del sys.modules[name]  # the fake, if it imported; monkeypatch restores the real one


def test_absent_package_is_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_vectors", None)  # import raises, name given
    assert steering_vectors_available() is False
    assert steering_vectors_version() is None


def test_a_package_that_imports_is_available(fake_package):
    fake_package("VALUE = 1\n")
    assert steering_vectors_available() is True
    assert sys.modules["steering_vectors"].VALUE == 1  # the fake was the one imported


@pytest.mark.parametrize("source,error,match", [
    ("import emokern_no_such_dependency\n", ModuleNotFoundError, "emokern_no_such_dependency"),
    ("from steering_vectors import missing_part\n", ImportError, "missing_part"),
    ("raise RuntimeError('needs transformers<5')\n", RuntimeError, "transformers<5"),
], ids=["missing dependency", "broken inside", "incompatible"])
def test_an_installed_package_that_fails_to_import_is_an_error(fake_package, source, error,
                                                               match):
    fake_package(source)
    with pytest.raises(error, match=match):
        steering_vectors_available()
