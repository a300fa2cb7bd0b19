"""Loading the compiled backends: ahead-of-time builds first, else a cached JIT compile.

* :func:`load_cpu` — the fused C++ CPU kernel (``csrc/cpu/steer_cpu.cpp``): ``emokern._C`` when
  ``setup.py`` built it (``EMOKERN_BUILD_EXT=1``), else compiled once with
  :func:`torch.utils.cpp_extension.load` into a persistent cache and reused by later runs.
* :func:`load_cuda` — the CUDA kernel (``csrc/cuda``) when torch is a CUDA build with a GPU and
  ``nvcc`` is on the machine.
* :func:`triton_usable` — whether the Triton kernel can run here.
* :func:`build_info` — what ``emokern info`` prints about all of this.

Loading registers the kernels with the dispatcher (``TORCH_LIBRARY_IMPL(emokern, CPU/CUDA)``),
where they take precedence over the reference. When a build is impossible (no compiler,
compile error) the loaders warn once, naming the cause, and return False: the op keeps
running on the reference backend.

The cache lives in ``$TORCH_EXTENSIONS_DIR`` if set, else ``$EMOKERN_CACHE/torch_extensions``
(``EMOKERN_CACHE`` defaults to ``~/.cache/emokern``). A build's name carries the machine and a
hash of the torch version, the CPU's instruction-set features, the flags and the sources, so
a cache shared between machines never serves a binary built for another CPU or from other
sources, and a finished build loads without a compiler. torch's lock file in the build
directory serialises concurrent compiles of the same build.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from emokern.files import cache_root
from emokern.ops.compile_flags import CPU_CFLAGS, CPU_LDFLAGS, CUDA_CFLAGS, CUDA_NVCC_FLAGS

# The flags live in emokern.ops.compile_flags, shared with setup.py: CPU_CFLAGS (-march=native
# is why builds are per CPU; $EMOKERN_CPU_MARCH replaces native, see cpu_cflags), CPU_LDFLAGS,
# CUDA_CFLAGS, CUDA_NVCC_FLAGS.

_state: dict[str, dict] = {}


def csrc_dir() -> Path | None:
    """The kernel sources: ``emokern/csrc`` in an installed wheel, ``<repo>/csrc`` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "steer.h").is_file():
            return candidate
    return None


def extensions_dir() -> Path:
    """Where JIT builds are kept between runs: ``$TORCH_EXTENSIONS_DIR``, else
    ``torch_extensions`` under :func:`emokern.files.cache_root`."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return cache_root() / "torch_extensions"


def _cpu_fingerprint() -> str:
    """The CPU's instruction-set features (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_name(prefix: str, sources: list[Path], *flag_groups) -> str:
    """``<prefix>_<machine>_<hash>``: the hash covers the torch version, the CPU's features, the
    flags and the sources' contents, so a cached binary is immutable and always matches."""
    digest = hashlib.sha256()
    for part in (torch.__version__, _cpu_fingerprint(), *(" ".join(g) for g in flag_groups)):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(Path(source).read_bytes() + b"\0")
    machine = "".join(c if c.isalnum() else "_" for c in platform.machine().lower()) or "cpu"
    return f"{prefix}_{machine}_{digest.hexdigest()[:12]}"


def _compiler() -> str:
    """The C++ compiler torch's extension builder will call (``$CXX`` or ``c++``)."""
    return os.environ.get("CXX", "c++")


def _missing_tools(built: Path) -> str | None:
    """Why a build cannot even start (no compiler, no ninja), or None. A finished build in the
    cache loads without them."""
    if built.exists():
        return None
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: {_compiler()!r} not found (install g++ or set CXX)"
    if shutil.which("ninja") is None:
        return "ninja not found (pip install ninja)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # A compile error's useful part is the compiler's first "error:" line.
    for ln in lines:
        if "error:" in ln and not ln.lstrip().startswith(("[", "FAILED")):
            return ln.strip()[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


#: A build lock older than this belongs to a build that died; it would block every later load.
STALE_LOCK_SECONDS = 900


def _jit_load(name: str, sources: list[str], build_dir: Path, what: str, **kwargs) -> None:
    """Load the cached binary, or compile it first (under torch's lock in ``build_dir``:
    concurrent processes wait for one build instead of racing)."""
    built = build_dir / f"{name}.so"
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    if built.exists() and not lock.exists():
        # Content-addressed name: an existing binary is the right one; no compiler, ninja or
        # ninja run needed.
        torch.ops.load_library(str(built))
        return
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    if not built.exists():
        # The CPU build compiles the kernel core once per instruction set: 30-160 s on 2 cores.
        print(f"emokern: compiling the {what} into {build_dir} (a minute or two, once)",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir),
                       is_python_module=False, verbose=False, **kwargs)


def cpu_cflags() -> tuple[str, ...]:
    """The JIT build's compiler flags: :data:`CPU_CFLAGS`, with ``-march=$EMOKERN_CPU_MARCH``
    when that is set (e.g. ``x86-64-v3``: AVX2 without AVX-512, to build on an AVX-512 machine
    what an AVX2-only CPU runs; the build name hashes the flags, so each -march keeps its own
    build)."""
    march = os.environ.get("EMOKERN_CPU_MARCH")
    if not march:
        return CPU_CFLAGS
    return tuple(f"-march={march}" if f == "-march=native" else f for f in CPU_CFLAGS)


def _cpu_target() -> tuple[str, Path, list[str]] | None:
    """``(build name, build directory, sources)`` of the JIT CPU build, or None without csrc.
    The name hashes every file under ``csrc/cpu`` (its subfolders too: the kernel's layers in
    ``csrc/cpu/kernel``) and the shared headers ``csrc/*.h``; the sources are the
    ``csrc/cpu/*.cpp``."""
    src = csrc_dir()
    if src is None:
        return None
    files = sorted(p for p in (src / "cpu").rglob("*") if p.is_file())
    name = _build_name("emokern_cpu", [*files, *sorted(src.glob("*.h"))], cpu_cflags(),
                       CPU_LDFLAGS)
    return name, extensions_dir() / name, [str(p) for p in files
                                           if p.suffix == ".cpp" and p.parent == src / "cpu"]


def cpu_ready() -> bool:
    """Whether the CPU kernel is loaded or loads without compiling (an ahead-of-time
    ``emokern._C`` or a finished JIT build in the cache). Compiles nothing."""
    if _state.get("cpu", {}).get("loaded"):
        return True
    if importlib.util.find_spec("emokern._C") is not None:
        return True
    target = _cpu_target()
    return target is not None and (target[1] / f"{target[0]}.so").exists()


def cuda_ready() -> bool:
    """Whether the CUDA kernel is loaded or loads without compiling. Compiles nothing."""
    if _state.get("cuda", {}).get("loaded"):
        return True
    if not (torch.version.cuda and torch.cuda.is_available()):
        return False
    if importlib.util.find_spec("emokern._C_cuda") is not None:
        return True
    target = _cuda_target()
    return target is not None and (target[1] / f"{target[0]}.so").exists()


@functools.cache
def load_cpu() -> bool:
    """Load the fused CPU kernel (ahead-of-time ``emokern._C``, else a cached JIT build).

    Returns
    -------
    bool
        True when ``torch.ops.emokern.steer_`` now runs the C++ kernel on CPU tensors; False
        (after one warning naming the cause) when it keeps running the reference.
    """
    # The schemas exist before the kernel: importing emokern.ops (this module's package)
    # defined them.
    info = _state.setdefault("cpu", {"loaded": False, "source": None, "error": None,
                                     "name": None, "path": None})
    try:
        if importlib.util.find_spec("emokern._C") is not None:
            import emokern._C as aot

            info.update(loaded=True, source="aot", path=getattr(aot, "__file__", None))
            return True
    except ImportError as exc:  # a stale or foreign AOT build: fall through to the JIT build
        info["error"] = f"emokern._C failed to import ({exc}); trying the JIT build"
    target = _cpu_target()
    if target is None:
        return _give_up(info, "the C++ sources (csrc/) are not part of this installation")
    name, build_dir, sources = target
    info.update(name=name, path=str(build_dir / f"{name}.so"))
    missing = _missing_tools(build_dir / f"{name}.so")
    if missing:
        return _give_up(info, missing)
    try:
        _jit_load(name, sources, build_dir, "CPU kernel",
                  extra_cflags=list(cpu_cflags()), extra_ldflags=list(CPU_LDFLAGS))
    except Exception as exc:  # noqa: BLE001  (any build failure means: fall back)
        return _give_up(info, f"{_first_line(exc)} (compiler: {_compiler()})")
    info.update(loaded=True, source="jit", error=None)
    return True


def _give_up(info: dict, cause: str) -> bool:
    info.update(loaded=False, source=None, error=cause)
    warnings.warn(f"emokern: could not build the C++ CPU kernel: {cause}; using the reference "
                  f"backend (correct, slower). See `emokern info`.", RuntimeWarning, stacklevel=3)
    return False


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_target() -> tuple[str, Path, list[str]] | None:
    """``(build name, build directory, sources)`` of the JIT CUDA build, or None. The name
    hashes every file under ``csrc/cuda`` and the shared headers ``csrc/*.h``."""
    src = csrc_dir()
    sources = sorted(glob.glob(str(src / "cuda" / "*.cu")) + glob.glob(str(src / "cuda" / "*.cpp"))
                     ) if src is not None else []
    if not sources:
        return None
    hashed = sorted(p for p in (src / "cuda").rglob("*") if p.is_file())
    name = _build_name("emokern_cuda", [*hashed, *sorted(src.glob("*.h"))], CUDA_CFLAGS,
                       CUDA_NVCC_FLAGS, (str(torch.version.cuda),))
    return name, extensions_dir() / name, sources


@functools.cache
def load_cuda() -> bool:
    """Load the CUDA kernel: the ahead-of-time ``emokern._C_cuda``, else a cached JIT build of
    every ``csrc/cuda/*.cu`` and ``*.cpp``.

    Returns
    -------
    bool
        False unless torch is a CUDA build, a GPU is visible and the kernel loaded.
    """
    info = _state.setdefault("cuda", {"loaded": False, "source": None, "error": None,
                                      "name": None, "path": None})
    if not (torch.version.cuda and torch.cuda.is_available()):
        info["error"] = "no CUDA torch or no GPU"
        return False
    spec = importlib.util.find_spec("emokern._C_cuda")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
            info.update(loaded=True, source="aot", path=spec.origin)
            return True
        except OSError as exc:
            info["error"] = f"emokern._C_cuda failed to load ({exc}); trying the JIT build"
    if _nvcc() is None:
        info["error"] = "nvcc not found (set CUDA_HOME)"
        warnings.warn("emokern: nvcc not found, so the CUDA kernel cannot be built; using the "
                      "Triton or reference backend.", RuntimeWarning, stacklevel=2)
        return False
    target = _cuda_target()
    if target is None:
        info["error"] = "no CUDA sources (csrc/cuda) in this installation"
        return False
    name, build_dir, sources = target
    info.update(name=name, path=str(build_dir / f"{name}.so"))
    try:
        _jit_load(name, sources, build_dir, "CUDA kernel", extra_cflags=list(CUDA_CFLAGS),
                  extra_cuda_cflags=list(CUDA_NVCC_FLAGS))
    except Exception as exc:  # noqa: BLE001
        info.update(loaded=False, error=_first_line(exc))
        warnings.warn(f"emokern: could not build the CUDA kernel: {_first_line(exc)}; using the "
                      f"Triton or reference backend.", RuntimeWarning, stacklevel=2)
        return False
    info.update(loaded=True, source="jit", error=None)
    return True


def cpu_isa() -> str | None:
    """The instruction set the loaded CPU kernel runs: ``"avx512"``, ``"avx2"``, ``"sve256"``,
    ``"neon"`` or ``"default"`` (the widest the CPU and the build have, capped by
    ``$EMOKERN_CPU_CAPABILITY`` as it was when the kernel first ran), or None when the kernel
    is not loaded or predates the report. Loads nothing, compiles nothing."""
    info = _state.get("cpu", {})
    if not info.get("loaded"):
        return None
    try:
        if info.get("source") == "aot":
            return importlib.import_module("emokern._C").isa()
        lib = ctypes.CDLL(info["path"])  # already loaded: the same handle
        lib.emokern_cpu_isa.restype = ctypes.c_char_p
        return lib.emokern_cpu_isa().decode()
    except (OSError, AttributeError, ImportError, TypeError):  # a kernel older than the report
        return None


def triton_usable() -> bool:
    """Whether the Triton kernel can run: Triton importable, and a GPU or the interpreter
    (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def build_info() -> dict:
    """What ``emokern info`` reports about the compiled backends (does not trigger a build).

    Returns
    -------
    dict
        ``compiler`` (path or None), ``ninja`` (path or None), ``nvcc`` (path or None),
        ``cache_dir``, ``csrc``, ``cpu_flags``, and per backend (``cpu``, ``cuda``) whether it
        is loaded, from where (``"aot"`` or ``"jit"``), the build name and path, and the last
        error; ``cpu`` also names the instruction set the kernel runs (``isa``, see
        :func:`cpu_isa`).
    """
    cpu = dict(_state.get("cpu", {"loaded": False, "source": None}))
    cpu["isa"] = cpu_isa()
    return {
        "compiler": shutil.which(_compiler()),
        "ninja": shutil.which("ninja"),
        "nvcc": _nvcc() if torch.version.cuda else None,
        "cache_dir": str(extensions_dir()),
        "csrc": str(csrc_dir()) if csrc_dir() else None,
        "cpu_flags": " ".join(cpu_cflags()),
        "aot_cpu_available": importlib.util.find_spec("emokern._C") is not None,
        "cpu": cpu,
        "cuda": dict(_state.get("cuda", {"loaded": False, "source": None})),
    }
