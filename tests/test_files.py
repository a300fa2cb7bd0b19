"""emokern.files: the cache root and atomic writes."""

import json
import os
import stat

import pytest

from emokern.files import atomic_directory, atomic_write, cache_root, write_json, write_text


def test_cache_root_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOKERN_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("EMOKERN_CACHE")
    assert cache_root() == cache_root("~/.cache/emokern")


def test_atomic_write_creates_parents_and_default_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert write_text(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    atomic_write(target, b"\x00\x01", mode=0o600)
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_write_json_rejects_nan_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failed_write_leaves_no_temporary_and_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_write_to_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        write_text(tmp_path, "x")


def _complete(path):
    return (path / "DONE").is_file()


def test_interrupted_directory_write_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "entry"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final, is_complete=_complete) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_directory_write_replaces_a_stale_entry_and_yields_to_a_complete_one(tmp_path):
    final = tmp_path / "models" / "entry"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"left over by something else")
    with atomic_directory(final, is_complete=_complete) as tmp:
        (tmp / "DONE").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"ours")
    assert (final / "model.safetensors").read_bytes() == b"ours"
    # Another process finished first: its complete entry stays, ours is discarded.
    with atomic_directory(final, is_complete=_complete) as tmp:
        (tmp / "DONE").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"late")
    assert (final / "model.safetensors").read_bytes() == b"ours"
    assert [p.name for p in final.parent.iterdir()] == ["entry"]
