"""The CUDA kernel of ``emokern::steer_`` and ``emokern::steer_packed_`` (one kernel, two
layouts) on a machine without a GPU.

1. ``nvcc`` compiles ``csrc/cuda/steer_cuda.cu`` on its own (no torch headers) for sm_90 with
   the flags of the JIT build; ptxas reports no register spills; the object defines both
   launchers.
2. ``g++`` compiles the torch binding against the installed torch and CUDA headers, and the
   launcher symbols it needs are exactly the ones the kernel object defines (so they link).
   The binding's argument checks of the packed op, compiled alone against the CPU torch, raise
   the Python wrapper's exception types and messages.
3. The kernel source runs on the CPU under a small emulation of the CUDA runtime
   (``tests/ops/cuda_emulation/``: each CUDA thread of a block is a fiber, ``__syncthreads`` and
   warp shuffles are barriers, shared memory starts as NaN, blocks run in a scrambled order)
   and is compared with the reference by the harness the Triton kernel's tests use
   (``tests/kernel_cases.py``), in both layouts; with projection bounds (the leveled
   instantiations), by a comparison of its own below.
4. On a machine with a GPU and a CUDA torch, the compiled kernel itself is compared with the
   reference through the public API, and both ops are captured in CUDA graphs.

Each compile is skipped, with the reason, when its compiler or headers are missing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    DTYPE_MASK_CASES,
    PACKED_CASES,
    PACKED_SHAPES,
    VIEWS,
    assert_flash_close,
    case_seed,
    check_against_reference,
    check_packed_against_reference,
    check_packed_graph_replays,
    gpu,
    make_mask,
    make_token_slot,
    packed_case,
    packed_inputs,
    random_inputs,
)

import emokern
from emokern.ops import build
from emokern.ops.reference import ref_steer_, ref_steer_packed_, unit_gram

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "csrc" / "cuda" / "steer_cuda.cu"
BINDING = REPO / "csrc" / "cuda" / "steer_cuda_binding.cpp"
#: The launchers the binding calls and the kernel object defines.
LAUNCHERS = ("emokern::cuda::launch_steer(", "emokern::cuda::launch_steer_packed(")
#: The emulated CUDA runtime (``include/``) and the C entry point compiled against it.
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")


def _defined_symbols(obj: Path, kind: str) -> list[str]:
    """Demangled symbols of ``kind`` ("T" defined, "U" undefined) in an object file."""
    out = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True)
    pattern = re.compile(rf"^\s*(?:[0-9a-f]+\s+)?{kind}\s+(.+)$")
    return [m.group(1) for m in map(pattern.match, out.stdout.splitlines()) if m]


@pytest.fixture(scope="module")
def kernel_object(tmp_path_factory) -> tuple[Path, str]:
    if NVCC is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    obj = tmp_path_factory.mktemp("nvcc") / "steer_cuda.o"
    cmd = [NVCC, "-c", "-arch=sm_90", *build.CUDA_NVCC_FLAGS, "-Xptxas", "-v", "-o", str(obj),
           str(KERNEL)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return obj, result.stdout + result.stderr


@needs_nvcc
def test_nvcc_compiles_kernel_standalone(kernel_object):
    obj, _ = kernel_object
    assert obj.stat().st_size > 0
    defined = _defined_symbols(obj, "T")
    for launcher in LAUNCHERS:
        assert any(s.startswith(launcher) for s in defined), \
            f"the object does not define {launcher[:-1]}"


@needs_nvcc
def test_kernel_does_not_spill(kernel_object):
    _, log = kernel_object
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    # float, bfloat16 and float16 instantiations, each unbounded and leveled
    assert len(spills) == 6, log
    assert all(s == ("0", "0") for s in spills), log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert registers and max(registers) <= 64, log  # __launch_bounds__(512, 2)


@needs_nvcc
def test_kernel_has_leveled_and_unbounded_instantiations(kernel_object):
    """Projection bounds are a template parameter: three storage dtypes, each compiled with and
    without the levels (the unbounded kernel carries none of their code)."""
    _, log = kernel_object
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    leveled = [e for e in entries if re.search(r"steer_kernelI\w+Lb1E", e)]
    unbounded = [e for e in entries if re.search(r"steer_kernelI\w+Lb0E", e)]
    assert len(leveled) == 3 and len(unbounded) == 3, entries


def _nvcc_include_dirs() -> list[str]:
    """The include directories nvcc itself uses (``nvcc`` may be a wrapper script)."""
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if "INCLUDES=" in ln), "")
    return [d for d in re.findall(r'-I"?([^"\s]+)', line) if Path(d).is_dir()]


def _torch_cuda_headers() -> tuple[list[str], str | None]:
    from torch.utils.cpp_extension import include_paths

    paths = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAStream.h").exists() for p in paths):
        return paths, "this torch install has no c10/cuda headers"
    if NVCC is None:
        return paths, "nvcc not found (set CUDA_HOME), so no CUDA headers"
    cuda_includes = _nvcc_include_dirs()
    if not any((Path(d) / "cuda_runtime_api.h").exists() for d in cuda_includes):
        return paths, f"nvcc's include directories {cuda_includes} have no cuda_runtime_api.h"
    if shutil.which("g++") is None:
        return paths, "g++ not found"
    return [*paths, *cuda_includes], None


def test_binding_compiles_and_matches_the_kernel_symbol(kernel_object, tmp_path):
    includes, missing = _torch_cuda_headers()
    if missing:
        pytest.skip(missing)
    obj = tmp_path / "binding.o"
    # A CPU wheel of torch ships the c10/cuda headers but not their generated config header,
    # which only sets an export macro; this documented switch skips it.
    cmd = ["g++", "-c", "-fPIC", *build.CUDA_CFLAGS, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-Wno-c++20-extensions", *(f"-I{p}" for p in includes), "-o", str(obj), str(BINDING)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    for launcher in LAUNCHERS:
        needed = [s for s in _defined_symbols(obj, "U") if s.startswith(launcher)]
        defined = [s for s in _defined_symbols(kernel_object[0], "T") if s.startswith(launcher)]
        assert len(needed) == 1 and needed == defined, (needed, defined)


@pytest.fixture(scope="module")
def packed_checks(tmp_path_factory):
    """``check_steer_packed_args`` of csrc/steer.h — the checks the CUDA binding runs before
    launching the packed kernel — and the binding's size check of bounds
    (csrc/cuda/steer_cuda_checks.h), compiled against the CPU torch as the ops
    ``emokern_cuda_checks::check_steer_packed`` and ``::check_cuda_bounds_size``
    (tests/ops/cuda_emulation/checks.cpp)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import load

    load(name="emokern_cuda_checks", sources=[str(EMULATION / "checks.cpp")],
         extra_cflags=["-O0", f"-I{REPO / 'csrc'}", f"-I{EMULATION / 'include'}"],
         is_python_module=False,
         build_directory=str(tmp_path_factory.mktemp("cuda_checks")))
    return torch.ops.emokern_cuda_checks


def _packed_args():
    return dict(hidden=torch.randn(4, 8), residual=torch.randn(4, 8), vectors=torch.randn(2, 8),
                slot_weights=torch.randn(3, 2), token_slot=torch.zeros(6, dtype=torch.int32),
                proj_out=torch.zeros(6, 2), run_sum=torch.zeros(3, 2),
                run_count=torch.zeros(3, dtype=torch.int64), run_last=torch.zeros(3, 2))


#: Bad metadata of steer_packed_'s arguments (one change each to valid arguments).
BAD_PACKED_METADATA = {
    "hidden 3-d": ("hidden", torch.randn(2, 4, 8)),
    "hidden float64": ("hidden", torch.randn(4, 8).double()),
    "hidden strided last dim": ("hidden", torch.randn(4, 16)[:, ::2]),
    "hidden rows overlap": ("hidden", torch.randn(1, 8).expand(4, 8)),
    "residual shape": ("residual", torch.randn(3, 8)),
    "residual dtype": ("residual", torch.randn(4, 8).half()),
    "residual device": ("residual", torch.empty(4, 8, device="meta")),
    "residual strided last dim": ("residual", torch.randn(4, 16)[:, ::2]),
    "vectors int": ("vectors", torch.zeros(2, 8, dtype=torch.int32)),
    "vectors D": ("vectors", torch.randn(2, 7)),
    "vectors empty": ("vectors", torch.randn(0, 8)),
    "slot_weights 1-d": ("slot_weights", torch.randn(3)),
    "slot_weights K": ("slot_weights", torch.randn(3, 5)),
    "slot_weights float64": ("slot_weights", torch.randn(3, 2).double()),
    "token_slot int64": ("token_slot", torch.zeros(6, dtype=torch.int64)),
    "token_slot short": ("token_slot", torch.zeros(3, dtype=torch.int32)),
    "token_slot 2-d": ("token_slot", torch.zeros(6, 1, dtype=torch.int32)),
    "proj_out short": ("proj_out", torch.zeros(3, 2)),
    "proj_out K": ("proj_out", torch.zeros(6, 3)),
    "proj_out float64": ("proj_out", torch.zeros(6, 2).double()),
    "proj_out strided": ("proj_out", torch.zeros(6, 4)[:, ::2]),
    "running.sum shape": ("run_sum", torch.zeros(2, 2)),
    "running.count dtype": ("run_count", torch.zeros(3, dtype=torch.int32)),
    "running.last shape": ("run_last", torch.zeros(3, 3)),
}


@pytest.mark.parametrize("case", list(BAD_PACKED_METADATA))
def test_packed_binding_checks_match_the_python_wrapper(packed_checks, case):
    """The CUDA binding rejects bad metadata with the Python wrapper's exception type and
    message (the data checks are the wrapper's alone: they would sync the device)."""
    from emokern.ops.steer_packed import validate_steer_packed_args

    name, value = BAD_PACKED_METADATA[case]
    args = _packed_args()
    args[name] = value
    running = emokern.RunningProjections(3, 2)
    running.sum, running.count, running.last = args["run_sum"], args["run_count"], \
        args["run_last"]
    with pytest.raises((TypeError, ValueError)) as python_error:
        validate_steer_packed_args(args["hidden"], args["residual"], args["vectors"],
                                   args["slot_weights"], args["token_slot"], args["proj_out"],
                                   running, check_values=False)
    with pytest.raises((TypeError, ValueError)) as cpp_error:
        packed_checks.check_steer_packed(*args.values())
    assert cpp_error.type is python_error.type, (cpp_error.value, python_error.value)
    assert str(cpp_error.value) == str(python_error.value)


def test_packed_binding_checks_accept_valid_arguments(packed_checks):
    args = _packed_args()
    packed_checks.check_steer_packed(*args.values())
    args["residual"] = args["proj_out"] = None
    args["run_sum"] = args["run_count"] = args["run_last"] = None
    packed_checks.check_steer_packed(*args.values())


def test_binding_rejects_bounds_with_too_many_vectors(packed_checks):
    """With bounds the CUDA kernel takes at most 128 vectors (each row's solve lives in shared
    memory): the binding raises a ValueError beyond, before launching anything."""
    check = packed_checks.check_cuda_bounds_size
    check(True, 128)
    check(False, 4096)  # without bounds, any K
    with pytest.raises(ValueError, match=r"emokern.steer_packed_: projection bounds on the CUDA "
                                         r"kernel take at most 128 vectors, got K = 129"):
        check(True, 129)


# --- the kernel on the CPU under an emulated CUDA runtime -------------------------------------

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory) -> ctypes.CDLL:
    """steer_cuda.cu compiled for the CPU against the emulated CUDA runtime."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ on x86-64 (its fibers switch in x86-64 asm)")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "libsteer_emulated.so"
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           f"-I{EMULATION / 'include'}", f"-I{KERNEL.parent}", "-o", str(lib),
           str(EMULATION / "harness.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    return ctypes.CDLL(str(lib))


def _address(t):
    return None if t is None else t.data_ptr()


@pytest.fixture(scope="module")
def emulated_steer_(emulation_library):
    """``emulated_steer_(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum,
    run_count, run_last)``: ``launch_steer`` of steer_cuda.cu run on CPU tensors."""
    launch = emulation_library.emokern_emulated_steer
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    launch.restype = ctypes.c_int
    launch.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr,
                       ctypes.c_bool, ptr, ptr, ptr, ptr, ptr, ptr]

    def steer(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum, run_count,
              run_last, bounds=None, gram=None, expect_status=0):
        batch, seq_len, dim = hidden.shape
        status = launch(hidden.data_ptr(), _DTYPE_CODE[hidden.dtype], batch, seq_len, dim,
                        hidden.stride(0), hidden.stride(1), vectors.data_ptr(), vectors.shape[0],
                        weights.data_ptr(), _address(mask), norm_preserving, _address(proj_out),
                        _address(run_sum), _address(run_count), _address(run_last),
                        _address(bounds), _address(gram))
        assert status == expect_status, f"launch_steer returned cudaError {status}"

    return steer


@pytest.fixture(scope="module")
def emulated_steer_packed_(emulation_library):
    """``emulated_steer_packed_(hidden, residual, vectors, slot_weights, token_slot,
    norm_preserving, proj_out, run_sum, run_count, run_last)``: ``launch_steer_packed`` of
    steer_cuda.cu run on CPU tensors."""
    launch = emulation_library.emokern_emulated_steer_packed
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    launch.restype = ctypes.c_int
    launch.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr,
                       ctypes.c_bool, ptr, ptr, ptr, ptr, ptr, ptr]

    def steer(hidden, residual, vectors, slot_weights, token_slot, norm_preserving, proj_out,
              run_sum, run_count, run_last, bounds=None, gram=None, expect_status=0):
        n_tokens, dim = hidden.shape
        status = launch(hidden.data_ptr(), _address(residual), _DTYPE_CODE[hidden.dtype],
                        n_tokens, dim, hidden.stride(0),
                        0 if residual is None else residual.stride(0), vectors.data_ptr(),
                        vectors.shape[0], slot_weights.data_ptr(), slot_weights.shape[0],
                        token_slot.data_ptr(), norm_preserving, _address(proj_out),
                        _address(run_sum), _address(run_count), _address(run_last),
                        _address(bounds), _address(gram))
        assert status == expect_status, f"launch_steer_packed returned cudaError {status}"

    return steer


# (B, T, D, K): decode; D = 1, 7, 200, 577 and 4099 (64 to 512 threads, ragged columns);
# K = 1, 33 (several K tiles, the last one partial); T >= 64 (16-row chunks: atomics, and
# run_last from an earlier chunk).
SHAPES = {
    "decode-1x1": (1, 1, 1, 1),
    "decode-D64": (3, 1, 64, 6),
    "D7-K33": (2, 5, 7, 33),
    "D577-K17": (2, 3, 577, 17),
    "D4099-K3": (2, 2, 4099, 3),
    "chunks-D200": (2, 66, 200, 5),
    "chunks-D40-K20": (1, 100, 40, 20),
}


@pytest.mark.parametrize("dtype,mask_kind", DTYPE_MASK_CASES,
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("norm", [False, True], ids=["add", "norm"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_emulated_kernel_matches_reference(emulated_steer_, case, norm, dtype, mask_kind):
    shape = SHAPES[case]
    gen = torch.Generator().manual_seed(case_seed(case, mask_kind))
    hidden, vectors, weights = random_inputs(shape, dtype, gen)
    mask = make_mask(mask_kind, shape[0], shape[1], gen)
    check_against_reference(emulated_steer_, hidden, vectors, weights, mask, norm)


@pytest.mark.parametrize("view", VIEWS, ids=repr)
@pytest.mark.parametrize("shape", [(3, 4, 33, 3), (2, 66, 70, 4)], ids=["rows", "chunks"])
def test_emulated_kernel_non_contiguous_hidden(emulated_steer_, shape, view):
    gen = torch.Generator().manual_seed(1)
    hidden, vectors, weights = random_inputs(shape, torch.bfloat16, gen)
    mask = make_mask("random", shape[0], shape[1], gen)
    check_against_reference(emulated_steer_, hidden, vectors, weights, mask, True,
                            make_view=view)


@pytest.mark.parametrize("with_proj,with_run", [(False, False), (True, False), (False, True)])
def test_emulated_kernel_optional_outputs(emulated_steer_, with_proj, with_run):
    gen = torch.Generator().manual_seed(2)
    hidden, vectors, weights = random_inputs((2, 70, 48, 3), torch.bfloat16, gen)
    mask = make_mask("random", 2, 70, gen)
    check_against_reference(emulated_steer_, hidden, vectors, weights, mask, False,
                            with_proj=with_proj, with_run=with_run)


def test_emulated_kernel_reads_no_uninitialised_shared_memory(emulated_steer_):
    """Shared memory starts as NaN in the emulation: any read before a write would surface as
    NaN in the outputs (here with every optional output and both code paths)."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((2, 3, 100, 9), (1, 80, 100, 9)):
        hidden, vectors, weights = random_inputs(shape, torch.float32, gen)
        run = emokern.RunningProjections(shape[0], shape[3])
        proj = torch.empty(shape[0], shape[1], shape[3])
        emulated_steer_(hidden, vectors, weights, None, True, proj, *run.tensors())
        for t in (hidden, proj, *run.tensors()):
            assert not t.isnan().any()


# --- the packed-token layout, emulated ------------------------------------------------------

@pytest.mark.parametrize("dtype,residual,norm,layout", PACKED_CASES,
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("case", list(PACKED_SHAPES))
def test_emulated_packed_matches_reference(emulated_steer_packed_, case, dtype, residual, norm,
                                           layout):
    hidden, res, vectors, slot_weights, token_slot = packed_case(case, dtype, residual, layout)
    check_packed_against_reference(emulated_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, norm)


@pytest.mark.parametrize("layout", ["none", "one"])
@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "chunks"])
def test_emulated_packed_all_or_no_tokens_steered(emulated_steer_packed_, n_tokens, layout):
    gen = torch.Generator().manual_seed(case_seed("all-or-none", layout, str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 40, 3, 2, torch.bfloat16, True,
                                                       gen)
    token_slot = make_token_slot(layout, n_tokens, n_tokens + 3, 2, gen)
    check_packed_against_reference(emulated_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, True)


@pytest.mark.parametrize("n_tokens", [7, 66], ids=["rows", "chunks"])
def test_emulated_packed_strided_rows_and_optional_outputs(emulated_steer_packed_, n_tokens):
    gen = torch.Generator().manual_seed(case_seed("packed-strided", str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 48, 4, 5, torch.float16, True,
                                                       gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens + 4, 5, gen)
    check_packed_against_reference(emulated_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, True, row_stride=53)
    for with_proj, with_run in ((False, False), (True, False), (False, True)):
        check_packed_against_reference(emulated_steer_packed_, hidden, None, vectors,
                                       slot_weights, token_slot, False, with_proj=with_proj,
                                       with_run=with_run)


@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "chunks"])
def test_emulated_packed_out_of_range_slots_are_untouched(emulated_steer_packed_, n_tokens):
    """A slot outside [-1, S) leaves its token untouched and uncounted (no out-of-bounds
    access): what the kernel does under graph capture, where values cannot be validated."""
    gen = torch.Generator().manual_seed(case_seed("packed-out-of-range", str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 32, 3, 4, torch.float32, True,
                                                       gen)
    bad = make_token_slot("random", n_tokens, n_tokens, 4, gen)
    bad[::3] = torch.tensor([4, -2, 1 << 30], dtype=torch.int32).repeat(n_tokens)[:len(bad[::3])]
    sane = torch.where((bad >= -1) & (bad < 4), bad, -1)
    want, want_proj = hidden.clone(), torch.empty(n_tokens, 3)
    want_run = emokern.RunningProjections(4, 3)
    ref_steer_packed_(want, res, vectors, slot_weights, sane, True, want_proj,
                      *want_run.tensors())
    proj, run = torch.empty(n_tokens, 3), emokern.RunningProjections(4, 3)
    emulated_steer_packed_(hidden, res, vectors, slot_weights, bad, True, proj, *run.tensors())
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj, want_proj, rtol=1e-5, atol=1e-4)
    assert torch.equal(run.count, want_run.count)
    torch.testing.assert_close(run.last, want_run.last, equal_nan=True, rtol=1e-5, atol=1e-4)


def test_emulated_packed_reads_no_uninitialised_shared_memory(emulated_steer_packed_):
    """With a split residual and every output, rows of changing slots (the steering vector is
    rebuilt in shared memory) and both block sizes: nothing reads shared memory before writing
    it (it starts as NaN in the emulation)."""
    gen = torch.Generator().manual_seed(3)
    for n_tokens in (3, 80):
        hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 100, 9, 5, torch.float32,
                                                           True, gen)
        token_slot = make_token_slot("random", n_tokens, n_tokens, 5, gen)
        token_slot[:2] = torch.tensor([-1, 2], dtype=torch.int32)  # a block starting unsteered
        run = emokern.RunningProjections(5, 9)
        proj = torch.empty(n_tokens, 9)
        emulated_steer_packed_(hidden, res, vectors, slot_weights, token_slot, True, proj,
                               *run.tensors())
        for t in (hidden, proj, run.sum, run.count):
            assert not t.isnan().any()


# --- projection levels and bounds, emulated ---------------------------------------------------

INF = float("inf")


def make_bounds(gen, slots, n_vec, levels_only=False):
    """``bounds [slots, 2, K]``: per slot and emotion open, a level, a cap, a floor or both
    sides, at values on the scale of the cases' projections (hidden ~ 3 randn)."""
    bounds = torch.empty(slots, 2, n_vec)
    bounds[:, 0], bounds[:, 1] = -INF, INF
    kind = torch.ones(slots, n_vec, dtype=torch.int64) if levels_only else \
        torch.randint(0, 5, (slots, n_vec), generator=gen)
    value = torch.randn(slots, n_vec, generator=gen) * 3
    width = torch.rand(slots, n_vec, generator=gen) * 2
    bounds[:, 0] = torch.where((kind == 1) | (kind == 3) | (kind == 4), value, bounds[:, 0])
    bounds[:, 1] = torch.where((kind == 1) | (kind == 2), value, bounds[:, 1])
    bounds[:, 1] = torch.where(kind == 4, value + width, bounds[:, 1])
    return bounds


def check_leveled_against_reference(fn, hidden, residual, vectors, weights, slots, norm,
                                    bounds, gram=None, *, packed, rtol=1e-5):
    """One leveled call of the emulated kernel (``fn``: ``emulated_steer_`` when not ``packed``,
    else ``emulated_steer_packed_``; ``slots`` is the mask or the token slots) against the
    reference in float32 and in the storage dtype, flash-attention's rule: the steered rows,
    the projections and the running statistics. Unsteered rows must stay bit-identical.
    Returns the kernel's output."""
    gram = unit_gram(vectors) if gram is None else gram
    n_vec, n_slots = vectors.shape[0], weights.shape[0]
    rows = hidden.shape[:-1]
    n_max = slots.shape[0] if packed else None

    def run(f, h, r):
        proj = torch.full((n_max, n_vec) if packed else (*rows, n_vec), -7.0)
        stats = emokern.RunningProjections(n_slots, n_vec)
        if packed:
            f(h, r, vectors, weights, slots, norm, proj, *stats.tensors(), bounds, gram)
        else:
            f(h, vectors, weights, slots, norm, proj, *stats.tensors(), bounds, gram)
        return h, proj, stats

    out, proj, stats = run(fn, hidden.clone(), residual)
    ref = ref_steer_packed_ if packed else ref_steer_
    low, proj_low, stats_low = run(ref, hidden.clone(), residual)
    f32, proj32, stats32 = run(ref, hidden.float(), None if residual is None else residual.float())
    if packed:
        steered = slots[:rows[0]] >= 0
        assert bool((proj[rows[0]:] == -7.0).all()), "proj_out past N written"
        proj, proj32, proj_low = proj[:rows[0]], proj32[:rows[0]], proj_low[:rows[0]]
    else:
        steered = torch.ones(rows, dtype=torch.bool) if slots is None else slots
    assert torch.equal(out[~steered], hidden[~steered]), "unsteered rows changed"
    assert_flash_close("hidden", out[steered], f32[steered], low[steered], rtol=rtol)
    assert_flash_close("proj_out", proj, proj32, proj_low)
    assert torch.equal(stats.count, stats32.count)
    assert_flash_close("running.sum", stats.sum, stats32.sum, stats_low.sum)
    assert_flash_close("running.last", stats.last, stats32.last, stats_low.last)
    return out


def _moved_rows(fn_plain, out, hidden):
    """How many rows the bounds moved: the leveled output against the same call without them
    (``fn_plain(h)`` steers ``h`` in place)."""
    plain = hidden.clone()
    fn_plain(plain)
    return int((out != plain).flatten(0, -2).any(dim=-1).sum())


#: Batched cases of the leveled comparisons, ``(shape, dtype, mask kind)``, each with and
#: without norm preservation. Shapes with K well below D (independent directions): decode and
#: 16-row chunks with D = 200 in every dtype; K = 20 of D = 40 in chunks and D = 577 with
#: K = 17 (several K tiles) in bfloat16, their other dtypes in the slow suite.
LEVELED_DTYPE_MASKS = [(torch.bfloat16, "random"), (torch.float16, "none"),
                       (torch.float32, "random")]
#: Shapes whose leveled comparisons run partly in the slow suite (long rows, or K = 20).
LEVELED_SLOW_SHAPES = ("chunks-D40-K20", "D577-K17", "dot-D31-K20", "rows-D577-K17")
LEVELED_CASES = [
    pytest.param(case, dtype, mask_kind, marks=[pytest.mark.slow]
                 if case in LEVELED_SLOW_SHAPES and dtype != torch.bfloat16 else [])
    for case in ("decode-D64", "chunks-D200", "chunks-D40-K20", "D577-K17")
    for dtype, mask_kind in LEVELED_DTYPE_MASKS]


@pytest.mark.parametrize("norm", [False, True], ids=["add", "norm"])
@pytest.mark.parametrize("case,dtype,mask_kind", LEVELED_CASES,
                         ids=lambda v: str(v).split(".")[-1])
def test_emulated_leveled_kernel_matches_reference(emulated_steer_, case, dtype, mask_kind,
                                                   norm):
    shape = SHAPES[case]
    gen = torch.Generator().manual_seed(case_seed("leveled", case, mask_kind))
    hidden, vectors, weights = random_inputs(shape, dtype, gen)
    mask = make_mask(mask_kind, shape[0], shape[1], gen)
    bounds = make_bounds(gen, shape[0], shape[3])
    out = check_leveled_against_reference(emulated_steer_, hidden, None, vectors, weights, mask,
                                          norm, bounds, packed=False)
    moved = _moved_rows(lambda h: emulated_steer_(h, vectors, weights, mask, norm, None, None,
                                                  None, None), out, hidden)
    assert moved > 0, "no row reached a bound: the case tests nothing"


#: Packed cases of the leveled comparisons: the shapes of kernel_cases with K below D, each in
#: every ``(dtype, residual, norm_preserving, slot layout)`` of PACKED_CASES; of K = 20 and of
#: D = 577 the first and the float32 case, the others in the slow suite.
LEVELED_PACKED_CASES = [
    pytest.param(case, *rest, marks=[pytest.mark.slow]
                 if case in LEVELED_SLOW_SHAPES and i not in (0, 4) else [])
    for case in ("decode-N5", "dot-D200", "dot-D31-K20", "rows-D577-K17")
    for i, rest in enumerate(PACKED_CASES)]


@pytest.mark.parametrize("case,dtype,residual,norm,layout", LEVELED_PACKED_CASES,
                         ids=lambda v: str(v).split(".")[-1])
def test_emulated_leveled_packed_matches_reference(emulated_steer_packed_, case, dtype,
                                                   residual, norm, layout):
    hidden, res, vectors, slot_weights, token_slot = packed_case(case, dtype, residual, layout)
    gen = torch.Generator().manual_seed(case_seed("leveled-packed", case, layout))
    bounds = make_bounds(gen, slot_weights.shape[0], vectors.shape[0])
    check_leveled_against_reference(emulated_steer_packed_, hidden, res, vectors, slot_weights,
                                    token_slot, norm, bounds, packed=True)


@pytest.mark.parametrize("n_tokens", [7, 70], ids=["rows", "chunks"])
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_emulated_levels_are_met(emulated_steer_, emulated_steer_packed_, packed, n_tokens):
    """The defining property: re-reading a leveled row (float32) on each direction gives its
    level, whatever the push, the norm preservation and the angles between the directions."""
    gen = torch.Generator().manual_seed(case_seed("levels-met", str(packed), str(n_tokens)))
    dim, n_vec, n_slots = 48, 4, 3
    vectors = torch.randn(n_vec, dim, generator=gen)
    vectors[1] += 0.8 * vectors[0]  # correlated directions
    hidden = torch.randn(n_tokens, dim, generator=gen) * 3
    weights = torch.randn(n_slots, n_vec, generator=gen)
    bounds = make_bounds(gen, n_slots, n_vec, levels_only=True)
    token_slot = make_token_slot("random", n_tokens, n_tokens, n_slots, gen)
    if packed:
        residual = torch.randn(n_tokens, dim, generator=gen)
        out = hidden.clone()
        emulated_steer_packed_(out, residual, vectors, weights, token_slot, True, None, None,
                               None, None, bounds, unit_gram(vectors))
        y, slots = out + residual, token_slot.long()
    else:
        hidden = hidden[:n_tokens // n_slots * n_slots].view(n_slots, -1, dim)
        out = hidden.clone()
        emulated_steer_(out, vectors, weights, None, True, None, None, None, None,
                        bounds, unit_gram(vectors))
        y = out.view(-1, dim)
        slots = torch.arange(n_slots).repeat_interleave(hidden.shape[1])
    u = vectors / vectors.norm(dim=1, keepdim=True)
    steered = slots >= 0
    want = bounds[slots[steered], 0]
    torch.testing.assert_close(y[steered] @ u.T, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "chunks"])
def test_emulated_rows_inside_bounds_are_written_as_without(emulated_steer_,
                                                            emulated_steer_packed_, n_tokens,
                                                            dtype):
    """Bounds never reached: the leveled kernel writes every row bit for bit as the unbounded
    one (no solve, the same arithmetic), in both layouts, with norm preservation and a residual.
    A cap reached by some rows leaves the others bit-identical too."""
    gen = torch.Generator().manual_seed(case_seed("inside", str(n_tokens), str(dtype)))
    hidden, res, vectors, weights = packed_inputs(n_tokens, 40, 3, 4, dtype, True, gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens + 2, 4, gen)
    far = torch.empty(4, 2, 3)
    far[:, 0], far[:, 1] = -1e30, 1e30
    gram = unit_gram(vectors)
    plain, bounded = hidden.clone(), hidden.clone()
    emulated_steer_packed_(plain, res, vectors, weights, token_slot, True, None, None, None,
                           None)
    emulated_steer_packed_(bounded, res, vectors, weights, token_slot, True, None, None, None,
                           None, far, gram)
    assert torch.equal(plain, bounded)
    batched = hidden.view(2, n_tokens // 2, 40)
    plain, bounded = batched.clone(), batched.clone()
    emulated_steer_(plain, vectors, weights[:2], None, True, None, None, None, None)
    emulated_steer_(bounded, vectors, weights[:2], None, True, None, None, None, None, far[:2],
                    gram)
    assert torch.equal(plain, bounded)
    # A cap on emotion 0 at its median projection, no push: the rows below it are untouched.
    zero = torch.zeros(2, 3)
    x = batched.float()
    before = x @ (vectors[0] / vectors[0].norm())
    cap = float(before.median())
    caps = torch.tensor([[-INF] * 3, [cap, INF, INF]]).expand(2, 2, 3).contiguous()
    got = batched.clone()
    emulated_steer_(got, vectors, zero, None, False, None, None, None, None, caps, gram)
    below = before <= cap
    assert torch.equal(got[below], batched[below])
    assert not torch.equal(got[~below], batched[~below])


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_emulated_dependent_directions(emulated_steer_, emulated_steer_packed_, packed):
    """A third direction in the span of the first two (and a fourth repeating the first): their
    coefficients are dropped, the independent levels are still met, and the kernel agrees with
    the reference."""
    gen = torch.Generator().manual_seed(case_seed("dependent", str(packed)))
    dim, n_tokens = 32, 66
    vectors = torch.randn(4, dim, generator=gen)
    vectors[2] = 0.6 * vectors[0] + 0.8 * vectors[1]
    vectors[3] = 2.0 * vectors[0]
    weights = torch.randn(2, 4, generator=gen) * 0.5
    levels = torch.tensor([1.0, -2.0, 0.5, 4.0])
    bounds = torch.stack([levels, levels]).expand(2, 2, 4).contiguous()
    hidden = torch.randn(n_tokens, dim, generator=gen) * 3
    u = vectors / vectors.norm(dim=1, keepdim=True)
    if packed:
        token_slot = make_token_slot("random", n_tokens, n_tokens, 2, gen)
        out = check_leveled_against_reference(emulated_steer_packed_, hidden, None, vectors,
                                              weights, token_slot, False, bounds, packed=True)
        steered = token_slot >= 0
        reread = out[steered] @ u.T
    else:
        batched = hidden.view(2, n_tokens // 2, dim)
        out = check_leveled_against_reference(emulated_steer_, batched, None, vectors, weights,
                                              None, False, bounds, packed=False)
        reread = out.view(-1, dim) @ u.T
    torch.testing.assert_close(reread[:, :2], levels[:2].expand(len(reread), 2), rtol=0,
                               atol=1e-4)


def test_emulated_leveled_kernel_at_the_vector_limit(emulated_steer_, emulated_steer_packed_):
    """K = 128, the most the kernel takes with bounds (its solve needs more than the default
    48 KiB of shared memory): matches the reference; K = 129 is refused by both launchers
    (cudaErrorInvalidValue, nothing written), as are bounds without gram."""
    gen = torch.Generator().manual_seed(9)
    n_vec, dim = 128, 200
    hidden, vectors, weights = random_inputs((2, 2, dim, n_vec), torch.float32, gen)
    bounds = make_bounds(gen, 2, n_vec)
    bounds[:, :, 8:] = torch.tensor([-INF, INF])[:, None]  # a few bounded emotions
    check_leveled_against_reference(emulated_steer_, hidden, None, vectors, weights, None, True,
                                    bounds, packed=False)
    too_many = torch.randn(n_vec + 1, dim, generator=gen)
    wide_bounds = torch.zeros(2, 2, n_vec + 1)
    wide_weights = torch.zeros(2, n_vec + 1)
    got = hidden.clone()
    emulated_steer_(got, too_many, wide_weights, None, False, None, None, None, None,
                    wide_bounds, unit_gram(too_many), expect_status=1)
    token_slot = torch.zeros(2, dtype=torch.int32)
    emulated_steer_packed_(got[0], None, too_many, wide_weights, token_slot, False, None, None,
                           None, None, wide_bounds, unit_gram(too_many), expect_status=1)
    emulated_steer_(got, vectors, weights, None, False, None, None, None, None, bounds, None,
                    expect_status=1)
    assert torch.equal(got, hidden)


def test_emulated_leveled_kernel_reads_no_uninitialised_shared_memory(emulated_steer_packed_):
    """The leveled kernel's shared memory (solve scratch included) starts as NaN in the
    emulation: slots changing row by row, rows inside and outside their bounds, both block
    sizes; nothing is NaN afterwards."""
    gen = torch.Generator().manual_seed(4)
    for n_tokens in (3, 80):
        hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 100, 9, 5, torch.float32,
                                                           True, gen)
        token_slot = make_token_slot("random", n_tokens, n_tokens, 5, gen)
        token_slot[:2] = torch.tensor([-1, 2], dtype=torch.int32)
        bounds = make_bounds(gen, 5, 9)
        run = emokern.RunningProjections(5, 9)
        proj = torch.empty(n_tokens, 9)
        emulated_steer_packed_(hidden, res, vectors, slot_weights, token_slot, True, proj,
                               *run.tensors(), bounds, unit_gram(vectors))
        for t in (hidden, proj, run.sum, run.count):
            assert not t.isnan().any()


# --- the compiled kernel on a real GPU ---------------------------------------------------------

@gpu
@pytest.mark.parametrize("case", ["decode-D64", "D577-K17", "chunks-D200"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_gpu_kernel_matches_reference(case, dtype):
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    gen = torch.Generator().manual_seed(5)
    hidden, vectors, weights = random_inputs(SHAPES[case], dtype, gen)
    mask = make_mask("random", *SHAPES[case][:2], gen)

    def via_public_api(h, v, w, m, norm, proj, run_sum, run_count, run_last):
        run = None
        if run_sum is not None:
            run = emokern.RunningProjections(h.shape[0], v.shape[0], device=h.device)
            run.sum, run.count, run.last = run_sum, run_count, run_last
        emokern.steer_(h, v, w, mask=m, norm_preserving=norm, proj_out=proj, running=run,
                       backend="cuda")

    check_against_reference(via_public_api, hidden, vectors, weights, mask, True,
                            device="cuda")


@gpu
def test_gpu_kernel_in_cuda_graph():
    """The compiled kernel captured in a CUDA graph and replayed with new inputs copied in."""
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    batch, dim, n_vec = 8, 4099, 33
    gen = torch.Generator().manual_seed(7)
    vectors = torch.randn(n_vec, dim, generator=gen).cuda()
    hidden = torch.zeros(batch, 1, dim, dtype=torch.float16, device="cuda")
    weights = torch.zeros(batch, n_vec, device="cuda")
    run = emokern.RunningProjections(batch, n_vec, device="cuda")
    args = (hidden, vectors, weights, None, True, None, *run.tensors())
    torch.ops.emokern.steer_(*args)
    run.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.emokern.steer_(*args)
    ref_run = emokern.RunningProjections(batch, n_vec)
    run.reset()
    for _ in range(3):
        step = (torch.randn(batch, 1, dim, generator=gen) * 3).to(torch.float16)
        mix = torch.randn(batch, n_vec, generator=gen)
        hidden.copy_(step)
        weights.copy_(mix)
        graph.replay()
        expected = step.clone()
        ref_steer_(expected, vectors.cpu(), mix, None, True, None, *ref_run.tensors())
        expected32 = step.float()
        ref_steer_(expected32, vectors.cpu(), mix, None, True)
        assert_flash_close("hidden", hidden, expected32, expected)
    torch.testing.assert_close(run.last.cpu(), ref_run.last, rtol=1e-5, atol=1e-4)
    assert torch.equal(run.count.cpu(), ref_run.count)


@gpu
@pytest.mark.parametrize("case", ["decode-N5", "rows-D577-K17", "dot-D200"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_gpu_packed_kernel_matches_reference(case, dtype):
    """The compiled packed kernel through the dispatcher (what the vLLM plugin calls)."""
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    hidden, res, vectors, slot_weights, token_slot = packed_case(case, dtype, True, "random")
    check_packed_against_reference(torch.ops.emokern.steer_packed_.default, hidden, res,
                                   vectors, slot_weights, token_slot, True, device="cuda")


@gpu
def test_gpu_packed_and_batched_cuda_graph_replays():
    """Both ops captured over persistent buffers; new states, residuals, slot weights, token
    slots and masks copied in between replays."""
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    check_packed_graph_replays(torch.ops.emokern.steer_packed_.default,
                               torch.ops.emokern.steer_.default)


def _via_device(op, device):
    """``op`` (an emokern op of torch.ops) with the emulated launchers' CPU-tensor calling
    convention: the tensors are copied to ``device``, the op runs there and what it wrote is
    copied back into the CPU tensors."""
    def call(*args):
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        op(*moved)
        for arg, dev in zip(args, moved, strict=True):
            if isinstance(arg, torch.Tensor) and dev is not arg:
                arg.copy_(dev.cpu())
    return call


@gpu
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_gpu_leveled_kernel_matches_reference(packed, dtype):
    """The compiled leveled kernel through the dispatcher, with norm preservation (and a
    residual when packed), decode-size and chunked rows."""
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    if packed:
        for case in ("decode-N5", "dot-D200"):
            hidden, res, vectors, slot_weights, token_slot = packed_case(case, dtype, True,
                                                                         "random")
            gen = torch.Generator().manual_seed(case_seed("gpu-leveled", case))
            bounds = make_bounds(gen, slot_weights.shape[0], vectors.shape[0])
            check_leveled_against_reference(
                _via_device(torch.ops.emokern.steer_packed_.default, "cuda"), hidden, res,
                vectors, slot_weights, token_slot, True, bounds, packed=True)
    else:
        for case in ("decode-D64", "chunks-D200", "D577-K17"):
            shape = SHAPES[case]
            gen = torch.Generator().manual_seed(case_seed("gpu-leveled", case))
            hidden, vectors, weights = random_inputs(shape, dtype, gen)
            mask = make_mask("random", shape[0], shape[1], gen)
            check_leveled_against_reference(
                _via_device(torch.ops.emokern.steer_.default, "cuda"), hidden, None, vectors,
                weights, mask, True, make_bounds(gen, shape[0], shape[3]), packed=False)


@gpu
def test_gpu_leveled_kernel_in_cuda_graph():
    """The leveled packed kernel captured in a CUDA graph; new states, slots and bounds copied
    in between replays (a request's levels change without a new capture)."""
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    gen = torch.Generator().manual_seed(13)
    n_tokens, dim, n_vec, n_slots = 24, 576, 6, 4
    vectors = torch.randn(n_vec, dim, generator=gen)
    gram = unit_gram(vectors)
    args = [torch.zeros(n_tokens, dim, dtype=torch.bfloat16), torch.zeros(n_tokens, dim,
            dtype=torch.bfloat16), vectors, torch.zeros(n_slots, n_vec),
            torch.zeros(n_tokens, dtype=torch.int32), True, None, None, None, None,
            make_bounds(gen, n_slots, n_vec), gram]
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    torch.ops.emokern.steer_packed_.default(*dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.emokern.steer_packed_.default(*dev)
    for _ in range(3):
        hidden, res, _, weights = packed_inputs(n_tokens, dim, n_vec, n_slots, torch.bfloat16,
                                                True, gen)
        token_slot = make_token_slot("random", n_tokens, n_tokens, n_slots, gen)
        bounds = make_bounds(gen, n_slots, n_vec)
        for i, new in ((0, hidden), (1, res), (3, weights), (4, token_slot), (10, bounds)):
            dev[i].copy_(new)
        graph.replay()
        low, f32 = hidden.clone(), hidden.float()
        ref_steer_packed_(low, res, vectors, weights, token_slot, True, None, None, None, None,
                          bounds, gram)
        ref_steer_packed_(f32, res.float(), vectors, weights, token_slot, True, None, None, None,
                          None, bounds, gram)
        steered = token_slot >= 0
        got = dev[0].cpu()
        assert torch.equal(got[~steered], hidden[~steered])
        assert_flash_close("hidden", got[steered], f32[steered], low[steered])


@gpu
def test_gpu_leveled_kernel_refuses_too_many_vectors():
    if not build.load_cuda():
        pytest.fail(f"the CUDA kernel did not build: {build.build_info()['cuda']}")
    n_vec = 129
    hidden = torch.randn(2, 3, 256, device="cuda")
    vectors = torch.randn(n_vec, 256, device="cuda")
    bounds = torch.zeros(2, 2, n_vec, device="cuda")
    before = hidden.clone()
    with pytest.raises(ValueError, match="take at most 128 vectors, got K = 129"):
        torch.ops.emokern.steer_.default(hidden, vectors, torch.zeros(2, n_vec, device="cuda"),
                                         None, False, None, None, None, None, bounds,
                                         unit_gram(vectors))
    assert torch.equal(hidden, before)
