"""Files: the cache directory and atomic writes, the one place each is written.

Every file emokern writes (banks, benchmark and evaluation results, plots, the model cache)
goes through :func:`atomic_write` or :func:`atomic_directory`: the bytes land in a temporary
sibling, are flushed, and replace the target with one ``os.replace``, so an interrupted or
failing write never leaves a half-written file nor clobbers the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_write", "cache_root", "write_json", "write_text"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The emokern cache directory: ``cache_dir``, else ``$EMOKERN_CACHE``, else
    ``~/.cache/emokern``. Dequantized models, tokenizers and JIT kernel builds live under it."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EMOKERN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emokern"


def _default_mode() -> int:
    """``0o666`` less the process umask: what ``open()`` would have given the file
    (``mkstemp`` makes it ``0o600``, wrong for a results file or a shared cache)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling + fsync + ``os.replace``).

    Parameters
    ----------
    path : str or PathLike
        The target file; its parent directories are created.
    data : bytes or str
        The whole content (``str`` is encoded as UTF-8).
    mode : int, optional
        Permission bits of the written file; default ``0o666`` less the umask.

    Returns
    -------
    Path
        ``path``. On any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` for text (UTF-8)."""
    return atomic_write(path, text)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN rejected: it is not JSON), atomically."""
    return atomic_write(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path, *, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``final``; rename it to ``final`` on success.

    Parameters
    ----------
    final : Path
        The directory to create.
    is_complete : callable
        Tells whether an existing ``final`` was completely written (e.g. holds its marker
        file). An incomplete one is replaced; a complete one written meanwhile by another
        process wins the race and ours is discarded (renaming a directory onto a non-empty one
        fails).

    On any error the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    # mkdtemp makes a private (0700) directory; a shared cache should be world-readable.
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # not written by us (a rename is all or nothing): replace it
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
