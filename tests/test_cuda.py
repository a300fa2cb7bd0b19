"""The CUDA kernel of ``emokern::steer_`` on a machine without a GPU.

1. ``nvcc`` compiles ``csrc/cuda/steer_cuda.cu`` on its own (no torch headers) for sm_90 with
   the flags of the JIT build; ptxas reports no register spills; the object defines the
   launcher.
2. ``g++`` compiles the torch binding against the installed torch and CUDA headers, and the
   launcher symbol it needs is exactly the one the kernel object defines (so they link).
3. The kernel source runs on the CPU under a small emulation of the CUDA runtime — each CUDA
   thread of a block is a fiber, ``__syncthreads`` and warp shuffles are barriers, shared memory
   starts as NaN — and is compared with the reference like the Triton kernel is.
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
    assert_flash_close,
    assert_matches_reference,
    make_mask,
    random_inputs,
    steer_twice,
)

import emokern
from emokern.ops import build
from emokern.ops.reference import ref_steer_

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "csrc" / "cuda" / "steer_cuda.cu"
BINDING = REPO / "csrc" / "cuda" / "steer_cuda_binding.cpp"
LAUNCHER = "emokern::cuda::launch_steer("


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

_EMU_RUNTIME_H = r"""
// CPU emulation of the CUDA runtime subset used by csrc/cuda/steer_cuda.cu (tests only).
// Every CUDA thread of a block is a fiber on one OS thread; __syncthreads and warp shuffles
// are barriers at which fibers yield; blocks run one after another.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedBytes = 1 << 20;

struct Fiber {
  void* sp = nullptr;
  dim3 thread_idx;
  bool done = false;
  std::vector<unsigned char> stack = std::vector<unsigned char>(kStackBytes);
};

struct Barrier {
  unsigned arrived = 0, size = 0, generation = 0;
};

inline void* scheduler_sp = nullptr;
inline Fiber* current = nullptr;
inline std::vector<Fiber>* fibers = nullptr;
inline std::vector<Barrier> warp_barriers;
inline Barrier block_barrier;
inline float shuffle_slots[1024];
inline int or_flag = 0;
inline dim3 block_idx, block_dim;
inline void (*run_thread)(void*) = nullptr;  // the kernel call of the current launch
inline void* run_arg = nullptr;
inline unsigned exited = 0;  // threads of the current block that have returned
// The kernel's `extern __shared__` array (defined and set by the harness).
inline unsigned char* shared_memory = nullptr;

inline void yield() { emu_switch(&current->sp, scheduler_sp); }

inline void wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) {
    if (exited != 0) {
      std::fputs("emulated CUDA: a barrier waits for threads that have exited\n", stderr);
      std::abort();
    }
    yield();
  }
}

[[noreturn]] inline void trampoline() {
  run_thread(run_arg);
  current->done = true;
  ++exited;
  yield();
  std::abort();
}

}  // namespace emu

#define threadIdx (::emu::current->thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::wait(emu::block_barrier); }
inline int __syncthreads_or(int predicate) {
  if (predicate) emu::or_flag = 1;
  __syncthreads();
  const int result = emu::or_flag;
  __syncthreads();
  if (threadIdx.x == 0) emu::or_flag = 0;
  __syncthreads();
  return result;
}
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned t = threadIdx.x;
  emu::shuffle_slots[t] = value;
  emu::wait(emu::warp_barriers[t / 32]);
  const float other = emu::shuffle_slots[t ^ unsigned(lane_mask)];
  emu::wait(emu::warp_barriers[t / 32]);
  return other;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p; *p = old + v; return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  return size_t(value) <= emu::kSharedBytes ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <typename Arg>
inline cudaError_t cudaLaunchKernel(void (*kernel)(Arg), dim3 grid, dim3 block, void** args,
                                    size_t shared_bytes, cudaStream_t) {
  if (shared_bytes > emu::kSharedBytes || block.x % 32 != 0 || block.x > 1024 ||
      grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    return cudaErrorInvalidValue;
  }
  static Arg arg;
  arg = *static_cast<Arg*>(args[0]);
  static void (*launch)(Arg);
  launch = kernel;
  emu::run_thread = [](void*) { launch(arg); };
  std::vector<emu::Fiber> fibers(block.x);
  emu::fibers = &fibers;
  emu::block_dim = block;
  // Blocks in a scrambled order (a GPU gives no order), fibers scheduled adversarially: each
  // pass visits them from a random start and lets each run with probability 1/2, so a thread
  // can lag many barrier steps behind the others of its block, exposing missing barriers.
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ grid.x ^ (uint64_t(block.x) << 32);
  auto next_random = [&rng] {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  const unsigned stride = [&] {  // coprime with grid.x: visits every block once
    unsigned s = unsigned(next_random() % grid.x) | 1u;
    auto gcd = [](unsigned a, unsigned b) {
      while (b) {
        const unsigned t = a % b;
        a = b;
        b = t;
      }
      return a;
    };
    while (gcd(s, grid.x) != 1) s += 2;
    return s;
  }();
  for (unsigned i = 0; i < grid.x; ++i) {
    emu::block_idx = dim3(unsigned((uint64_t(i) * stride + grid.x - 1) % grid.x));
    // Uninitialised shared memory reads as NaN (0xFF bytes).
    std::memset(emu::shared_memory, 0xFF, shared_bytes);
    emu::block_barrier = {0, block.x, 0};
    emu::exited = 0;
    emu::warp_barriers.assign(block.x / 32, emu::Barrier{0, 32, 0});
    for (unsigned t = 0; t < block.x; ++t) {
      emu::Fiber& f = fibers[t];
      f.thread_idx = dim3(t);
      f.done = false;
      // Entered by `ret`: the return slot sits 16-byte aligned, as after a call.
      auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
      auto* slot = reinterpret_cast<void**>(top - 16);
      slot[0] = reinterpret_cast<void*>(&emu::trampoline);
      for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
      f.sp = slot - 6;
    }
    for (unsigned live = block.x; live > 0;) {
      live = 0;
      const unsigned start = unsigned(next_random() % block.x);
      const uint64_t coins = next_random();
      for (unsigned j = 0; j < block.x; ++j) {
        emu::Fiber& f = fibers[(start + j) % block.x];
        if (f.done) continue;
        ++live;
        if ((coins >> (j % 64)) & 1u) continue;  // this fiber lags behind for a pass
        emu::current = &f;
        emu_switch(&emu::scheduler_sp, f.sp);
      }
    }
  }
  return cudaSuccess;
}
"""

_EMU_BF16_H = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
"""

_EMU_FP16_H = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return float(f); }
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
"""

_EMU_HARNESS_CPP = r"""
#include "steer_cuda.cu"
// Definition of the kernel's `extern __shared__` array, in the unnamed namespace it was
// declared in.
namespace emokern { namespace cuda { namespace {
alignas(16) unsigned char smem[emu::kSharedBytes];
} } }
extern "C" int emokern_emulated_steer(void* hidden, int dtype, int64_t batch, int64_t seq_len,
                                      int64_t dim, int64_t stride_b, int64_t stride_t,
                                      const float* vectors, int64_t n_vec, const float* weights,
                                      const bool* mask, bool norm_preserving, float* proj_out,
                                      float* run_sum, int64_t* run_count, float* run_last) {
  emu::shared_memory = emokern::cuda::smem;
  return int(emokern::cuda::launch_steer(
      hidden, static_cast<emokern::cuda::HiddenDtype>(dtype), batch, seq_len, dim, stride_b,
      stride_t, vectors, n_vec, weights, mask, norm_preserving, proj_out, run_sum, run_count,
      run_last, nullptr));
}
"""

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emulated_steer_(tmp_path_factory):
    """``emulated_steer_(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum,
    run_count, run_last)``: ``launch_steer`` of steer_cuda.cu run on CPU tensors."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ on x86-64 (its fibers switch in x86-64 asm)")
    work = tmp_path_factory.mktemp("cuda_emulation")
    (work / "include").mkdir()
    for name, text in (("cuda_runtime.h", _EMU_RUNTIME_H), ("cuda_bf16.h", _EMU_BF16_H),
                       ("cuda_fp16.h", _EMU_FP16_H)):
        (work / "include" / name).write_text(text)
    (work / "harness.cpp").write_text(_EMU_HARNESS_CPP)
    lib = work / "libsteer_emulated.so"
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           f"-I{work / 'include'}", f"-I{KERNEL.parent}", "-o", str(lib),
           str(work / "harness.cpp")]
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


def check_against_reference(fn, hidden_in, vectors, weights, mask, norm, make_view=None,
                            with_proj=True, with_run=True, device="cpu"):
    """Two calls of ``fn`` and of the reference (storage dtype and float32) sharing running
    statistics; every output compared. ``make_view(base)`` steers a non-contiguous view of a
    larger buffer whose other elements must stay untouched."""
    hiddens = [hidden_in, hidden_in.flip(1).contiguous()]
    args = dict(mask=mask, norm=norm, with_proj=with_proj, with_run=with_run)
    dev = [None if t is None else t.to(device) for t in (vectors, weights, mask)]
    if make_view is None:
        bases = views = [h.clone().to(device) for h in hiddens]
    else:
        bases = [torch.randn(make_view.base_shape(h.shape)).to(h.dtype).to(device)
                 for h in hiddens]
        views = [make_view(base) for base in bases]
        for view, h in zip(views, hiddens, strict=True):
            assert not view.is_contiguous() and view.stride(2) == 1
            view.copy_(h)
    before = [b.clone() for b in bases]
    outs, projs, run = steer_twice(fn, views, dev[0], dev[1], **dict(args, mask=dev[2]))
    assert_matches_reference(outs, projs, run, hiddens, vectors, weights, args, mask,
                             bases, before, make_view, with_proj, with_run)


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


@pytest.mark.parametrize("dtype,mask_kind", [
    (torch.bfloat16, "none"), (torch.bfloat16, "random"), (torch.bfloat16, "all"),
    (torch.float16, "random"), (torch.float32, "random"),
], ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("norm", [False, True], ids=["add", "norm"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_emulated_kernel_matches_reference(emulated_steer_, case, norm, dtype, mask_kind):
    shape = SHAPES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case + mask_kind)))
    hidden, vectors, weights = random_inputs(shape, dtype, gen)
    mask = make_mask(mask_kind, shape[0], shape[1], gen)
    check_against_reference(emulated_steer_, hidden, vectors, weights, mask, norm)


class _View:
    def __init__(self, name, base_shape, view):
        self.name, self.base_shape, self._view = name, base_shape, view

    def __call__(self, base):
        return self._view(base)

    def __repr__(self):
        return self.name


VIEWS = [
    _View("every-other-token", lambda s: (s[0], 2 * s[1], s[2]), lambda b: b[:, ::2]),
    _View("narrow-last-dim", lambda s: (s[0], s[1], s[2] + 5), lambda b: b[..., 3:-2]),
    _View("time-major", lambda s: (s[1], s[0], s[2]), lambda b: b.transpose(0, 1)),
]


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

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and a CUDA torch")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and a CUDA torch")
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
