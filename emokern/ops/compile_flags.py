"""Compiler flags of the compiled kernels: the one place both builds read them.

* The JIT build (:mod:`emokern.ops.build`) compiles every ``csrc/cpu/*.cpp`` with
  :data:`CPU_CFLAGS` for this machine's CPU (``-march=native``) and the CUDA sources with
  :data:`CUDA_CFLAGS` and :data:`CUDA_NVCC_FLAGS`.
* The ahead-of-time build (``setup.py`` with ``EMOKERN_BUILD_EXT=1``) compiles the baseline
  objects with :func:`cpu_aot_cflags` (no ``-march``: the binary loads on any CPU of its
  architecture) and each instruction set's core (``csrc/cpu/steer_kernel_<set>.cpp``) with its
  flags in :data:`CPU_ISA_FLAGS` added.

``setup.py`` loads this file by its path, before torch or emokern can be imported, so it
imports nothing. Covered by tests/ops/test_build.py (the build names hash these flags; the
ahead-of-time build is compared with the JIT build there).
"""

#: Flags of the JIT CPU build: -march=native is why builds are per CPU (``$EMOKERN_CPU_MARCH``
#: replaces native, see :func:`emokern.ops.build.cpu_cflags`).
CPU_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")
#: Link flags of every CPU build.
CPU_LDFLAGS = ("-fopenmp",)
#: The cores for wider instruction sets, csrc/cpu/steer_kernel_<set>.cpp, per architecture:
#: each one's extra flags in the ahead-of-time build (those of ATen's own per-capability
#: kernels). A core without flags here is not built there (its entry point stays null and the
#: kernel runs a narrower set); the JIT build's -march=native implies the flags of the sets the
#: CPU has.
CPU_ISA_FLAGS = {
    "x86_64": {
        "avx2": ("-mavx2", "-mfma", "-mf16c"),
        "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    },
}
#: Host-compiler flags of the CUDA binding, and nvcc's flags of the kernel.
CUDA_CFLAGS = ("-O3", "-std=c++17")
CUDA_NVCC_FLAGS = ("-O3", "--use_fast_math", "-std=c++17")


def cpu_aot_cflags() -> tuple[str, ...]:
    """The ahead-of-time build's baseline flags: :data:`CPU_CFLAGS` without ``-march``."""
    return tuple(f for f in CPU_CFLAGS if not f.startswith("-march="))
