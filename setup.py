"""Optional ahead-of-time build of the compiled kernels; the metadata lives in pyproject.toml.

By default this installs pure Python: the C++ CPU kernel is compiled on first use into a
cache (emokern/ops/build.py). With ``EMOKERN_BUILD_EXT=1`` it builds, with the installed torch,

* ``emokern._C`` from csrc/cpu (always), and
* ``emokern._C_cuda`` from csrc/cuda (only when torch is a CUDA build and nvcc is found),

which emokern then loads instead of compiling. Build without isolation so the extension is
compiled against the torch that will run it::

    EMOKERN_BUILD_EXT=1 pip install --no-build-isolation -e .

Either way the kernel sources are copied into the package (emokern/csrc) so that a wheel can
still JIT-compile them.
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


def extensions():
    if os.environ.get("EMOKERN_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # The same flags as the JIT build (emokern.ops.build): -march=native ties the binary to
    # this machine's CPU, which is what an ahead-of-time install on the serving host wants.
    cflags = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
    modules = [CppExtension(
        "emokern._C", [f"{CSRC}/cpu/steer_cpu.cpp"],
        extra_compile_args=cflags, extra_link_args=["-fopenmp"],
        define_macros=[("EMOKERN_AOT_MODULE", None)],
    )]
    cuda_sources = sorted(glob.glob(f"{CSRC}/cuda/*.cu") + glob.glob(f"{CSRC}/cuda/*.cpp"))
    nvcc = CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc and cuda_sources:
        # Loaded with torch.ops.load_library (it registers kernels, exports no Python module).
        modules.append(CUDAExtension(
            "emokern._C_cuda", cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
        ))
    return modules, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, ext_commands = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithKernelSources, **ext_commands})
