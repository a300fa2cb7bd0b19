"""The CUDA kernel of ``emokern::steer_`` on a machine without a GPU.

1. ``nvcc`` compiles ``csrc/cuda/steer_cuda.cu`` on its own (no torch headers) for sm_90 with
   the flags of the JIT build; ptxas reports no register spills; the object defines the
   launcher.
2. ``g++`` compiles the torch binding against the installed torch and CUDA headers, and the
   launcher symbol it needs is exactly the one the kernel object defines (so they link).
3. The kernel source runs on the CPU under a small emulation of the CUDA runtime
   (``tests/ops/cuda_emulation/``: each CUDA thread of a block is a fiber, ``__syncthreads`` and
   warp shuffles are barriers, shared memory starts as NaN) and is compared with the reference
   by the harness the Triton kernel's tests use (``tests/kernel_cases.py``).
4. On a machine with a GPU and a CUDA torch, the compiled kernel itself is compared with the
   reference through the public API.

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
    VIEWS,
    assert_flash_close,
    case_seed,
    check_against_reference,
    gpu,
    make_mask,
    random_inputs,
)

import emokern
from emokern.ops import build
from emokern.ops.reference import ref_steer_

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "csrc" / "cuda" / "steer_cuda.cu"
BINDING = REPO / "csrc" / "cuda" / "steer_cuda_binding.cpp"
LAUNCHER = "emokern::cuda::launch_steer("
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
    assert any(s.startswith(LAUNCHER) for s in _defined_symbols(obj, "T")), \
        "the object does not define emokern::cuda::launch_steer"


@needs_nvcc
def test_kernel_does_not_spill(kernel_object):
    _, log = kernel_object
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == 3, log  # float, bfloat16 and float16 instantiations
    assert all(s == ("0", "0") for s in spills), log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert registers and max(registers) <= 64, log  # __launch_bounds__(512, 2)


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
    needed = [s for s in _defined_symbols(obj, "U") if s.startswith(LAUNCHER)]
    defined = [s for s in _defined_symbols(kernel_object[0], "T") if s.startswith(LAUNCHER)]
    assert len(needed) == 1 and needed == defined, (needed, defined)


# --- the kernel on the CPU under an emulated CUDA runtime -------------------------------------

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emulated_steer_(tmp_path_factory):
    """``emulated_steer_(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum,
    run_count, run_last)``: ``launch_steer`` of steer_cuda.cu run on CPU tensors."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ on x86-64 (its fibers switch in x86-64 asm)")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "libsteer_emulated.so"
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           f"-I{EMULATION / 'include'}", f"-I{KERNEL.parent}", "-o", str(lib),
           str(EMULATION / "harness.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    launch = ctypes.CDLL(str(lib)).emokern_emulated_steer
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    launch.restype = ctypes.c_int
    launch.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr,
                       ctypes.c_bool, ptr, ptr, ptr, ptr]

    def address(t):
        return None if t is None else t.data_ptr()

    def steer(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum, run_count,
              run_last):
        batch, seq_len, dim = hidden.shape
        status = launch(hidden.data_ptr(), _DTYPE_CODE[hidden.dtype], batch, seq_len, dim,
                        hidden.stride(0), hidden.stride(1), vectors.data_ptr(), vectors.shape[0],
                        weights.data_ptr(), address(mask), norm_preserving, address(proj_out),
                        address(run_sum), address(run_count), address(run_last))
        assert status == 0, f"launch_steer returned cudaError {status}"

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
