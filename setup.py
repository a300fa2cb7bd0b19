"""Optional ahead-of-time build of the compiled kernels; the metadata lives in pyproject.toml.

By default this installs pure Python: the C++ CPU kernel is compiled on first use into a
cache (emokern/ops/build.py). With ``EMOKERN_BUILD_EXT=1`` it builds, with the installed torch,

* ``emokern._C`` from every csrc/cpu/*.cpp, as the JIT build (always), and
* ``emokern._C_cuda`` from csrc/cuda (only when torch is a CUDA build and nvcc is found),

which emokern then loads instead of compiling. Build without isolation so the extension is
compiled against the torch that will run it::

    EMOKERN_BUILD_EXT=1 pip install --no-build-isolation -e .

``emokern._C`` runs on any CPU of its architecture, like torch itself: steer_cpu.cpp (argument
checks, registration, the portable core) and ablate_cpu.cpp are compiled for the baseline
instruction set, and the cores for wider sets (csrc/cpu/steer_kernel_<set>.cpp) each with their
own -m flags, linked after them; at load the kernel picks the widest set the CPU supports
(``EMOKERN_CPU_CAPABILITY`` caps the choice). The flags are the JIT build's, from
emokern/ops/compile_flags.py (the baseline's without -march). Either way the kernel sources are
copied into the package (emokern/csrc) so that a wheel can still JIT-compile them.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


class BuildPyWithKernelSources(build_py):
    """Ships csrc/ inside the package (emokern/csrc) for JIT builds from an installed wheel."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "emokern", "csrc")
        if os.path.isdir(os.path.join(HERE, CSRC)) and not self.dry_run:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(HERE, CSRC), target,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _compile_flags():
    """emokern/ops/compile_flags.py, the flags the JIT build uses too, loaded by its path:
    importing the emokern package here would import torch and every module of emokern."""
    import importlib.util

    path = os.path.join(HERE, "emokern", "ops", "compile_flags.py")
    spec = importlib.util.spec_from_file_location("emokern_compile_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLAGS = _compile_flags()
ISA_CORE_PREFIX = "steer_kernel_"


def cpu_sources(arch: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(baseline sources, [(core source, its flags)])``: every csrc/cpu/*.cpp, the files the
    JIT build (emokern/ops/build.py) compiles, split into the objects built for the baseline
    and the instruction-set cores built with their own flags."""
    flags = FLAGS.CPU_ISA_FLAGS.get(arch, {})
    baseline, cores = [], []
    for source in sorted(glob.glob(f"{CSRC}/cpu/*.cpp")):
        name = os.path.splitext(os.path.basename(source))[0]
        isa = name.removeprefix(ISA_CORE_PREFIX)
        if isa == name:
            baseline.append(source)
        elif isa in flags:
            cores.append((source, list(flags[isa])))
    return baseline, cores


def extensions():
    if os.environ.get("EMOKERN_BUILD_EXT") != "1":
        return [], {}
    import platform

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    baseline, isa_cores = cpu_sources(platform.machine().lower().replace("amd64", "x86_64"))

    class BuildWithIsaCores(BuildExtension):
        """Compiles each instruction set's core with its own flags and links it after the
        baseline objects (the first definition of a shared inline function is the one kept)."""

        def build_extension(self, ext):
            if ext.name == "emokern._C" and isa_cores:
                base = list(ext.extra_compile_args) if isinstance(ext.extra_compile_args, list) \
                    else list(ext.extra_compile_args.get("cxx", []))
                ext.extra_objects = list(ext.extra_objects or [])
                for source, flags in isa_cores:
                    core = os.path.splitext(os.path.basename(source))[0]
                    ext.extra_objects += self.compiler.compile(
                        [source], output_dir=os.path.join(self.build_temp, "isa", core),
                        macros=ext.define_macros, include_dirs=ext.include_dirs,
                        extra_postargs=base + flags, depends=ext.depends)
            super().build_extension(ext)

    modules = [CppExtension(
        "emokern._C", baseline,
        extra_compile_args=list(FLAGS.cpu_aot_cflags()), extra_link_args=list(FLAGS.CPU_LDFLAGS),
        define_macros=[("EMOKERN_AOT_MODULE", None)],
        depends=sorted(glob.glob(f"{CSRC}/cpu/**/*.h", recursive=True) + glob.glob(f"{CSRC}/*.h")),
    )]
    cuda_sources = sorted(glob.glob(f"{CSRC}/cuda/*.cu") + glob.glob(f"{CSRC}/cuda/*.cpp"))
    nvcc = CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc and cuda_sources:
        # Loaded with torch.ops.load_library (it registers kernels, exports no Python module).
        modules.append(CUDAExtension(
            "emokern._C_cuda", cuda_sources,
            extra_compile_args={"cxx": list(FLAGS.CUDA_CFLAGS),
                                "nvcc": list(FLAGS.CUDA_NVCC_FLAGS)},
            depends=sorted(glob.glob(f"{CSRC}/cuda/*.h") + glob.glob(f"{CSRC}/*.h")),
        ))
    return modules, {"build_ext": BuildWithIsaCores.with_options(no_python_abi_suffix=False)}


ext_modules, ext_commands = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithKernelSources, **ext_commands})
