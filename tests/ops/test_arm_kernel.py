"""The CPU kernel on ARM: its core cross-compiled for aarch64 (the portable core on ATen's NEON
Vectorized, and the SVE core at 256 bits), run under qemu-user, gives the x86 kernel's bits.

The program (tests/ops/arm/kernel_main.cpp) runs the kernel core on problems read from a file;
the same problems go through ``torch.ops.emokern.steer_`` here, and every output (hidden rows,
projections, running statistics) must agree bit for bit, as the kernel's arithmetic contract
(docs/design.md) promises for every instruction set. Needs the cross compiler and qemu
(Debian: ``apt-get install g++-aarch64-linux-gnu qemu-user``); skipped without them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from emokern.ops import build

HERE = Path(__file__).resolve().parent
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
# (flags, qemu CPU) per core; the SVE core fixes the vector length at 256 bits, as ATen's does.
CORES = {"neon": ("-march=armv8.2-a -DEMOKERN_ISA_DEFAULT", "max"),
         "sve256": ("-march=armv8.2-a+sve -msve-vector-bits=256 -DEMOKERN_ISA_SVE256",
                    "max,sve256=on")}
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# (batch, seq_len, dim, n_vec): sweeps and tiles, decode and prefill, partial logical vectors,
# several panels and blocks, a prefill sweep over several column chunks (1040 columns, six
# vectors: the two halves' sums carried from chunk to chunk).
CASES = [(3, 5, 77, 3), (9, 1, 100, 5), (2, 1, 100, 20), (4, 40, 576, 8), (20, 1, 1040, 32),
         (2, 9, 2048, 12), (1, 60, 64, 1), (3, 1, 1, 7), (2, 9, 1040, 6)]

pytestmark = pytest.mark.skipif(
    shutil.which(CXX) is None or shutil.which(QEMU) is None,
    reason=f"needs {CXX} and {QEMU} (apt-get install g++-aarch64-linux-gnu qemu-user)")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    if not build.load_cpu():
        pytest.fail(f"the CPU kernel did not build: {build.build_info()['cpu']}")
    out = tmp_path_factory.mktemp("arm")
    include = Path(torch.__file__).parent / "include"
    built = {}
    for core, (flags, _) in CORES.items():
        exe = out / f"kernel_{core}"
        cmd = [CXX, "-O3", "-std=c++17", "-fopenmp", "-Wno-psabi", *flags.split(),
               f"-I{build.csrc_dir() / 'cpu'}", f"-I{include}",
               str(HERE / "arm" / "kernel_main.cpp"), "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        built[core] = exe
    return built


def make_problem(seed, batch, seq_len, dim, n_vec, dtype, norm_preserving):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(batch, seq_len, dim, generator=g) * 2).to(dtype)
    vectors = torch.randn(n_vec, dim, generator=g)
    weights = torch.randn(batch, n_vec, generator=g)
    mask = torch.rand(batch, seq_len, generator=g) < 0.7
    run = [torch.randn(batch, n_vec, generator=g), torch.randint(0, 5, (batch,)),
           torch.randn(batch, n_vec, generator=g)]
    return hidden, vectors, weights, mask, norm_preserving, run


def on_x86(problem):
    """The loaded kernel's outputs: hidden, projections, run sum, count, last."""
    hidden, vectors, weights, mask, norm_preserving, run = problem
    hidden, run = hidden.clone(), [t.clone() for t in run]
    proj = torch.empty(*hidden.shape[:2], vectors.shape[0])
    torch.ops.emokern.steer_(hidden, vectors, weights, mask, norm_preserving, proj, *run)
    return [hidden, proj, *run]


def on_arm(exe, core, problems, tmp_path):
    """Runs the aarch64 program under qemu on every problem at once; its outputs per problem."""
    blob = [struct.pack("<q", len(problems))]
    for hidden, vectors, weights, mask, norm_preserving, run in problems:
        b, t, d = hidden.shape
        blob.append(struct.pack("<7q", DTYPES[hidden.dtype], b, t, d, vectors.shape[0],
                                int(norm_preserving), 1))
        blob += [hidden.view(torch.int16 if hidden.dtype != torch.float32 else torch.float32)
                 .numpy().tobytes(), vectors.numpy().tobytes(), weights.numpy().tobytes(),
                 mask.numpy().astype(np.uint8).tobytes(), *(t.numpy().tobytes() for t in run)]
    (tmp_path / "in").write_bytes(b"".join(blob))
    done = subprocess.run([QEMU, "-cpu", CORES[core][1], "-L", SYSROOT, str(exe),
                           str(tmp_path / "in"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout.splitlines()[0] == core
    raw, at, outs = (tmp_path / "out").read_bytes(), 0, []
    for hidden, vectors, _, _, _, run in problems:
        b, t, _ = hidden.shape
        k = vectors.shape[0]
        parts = []
        for like in (hidden, torch.empty(b, t, k), *run):
            n = like.numel() * like.element_size()
            parts.append(torch.frombuffer(bytearray(raw[at:at + n]), dtype=like.dtype)
                         .view(like.shape))
            at += n
        outs.append(parts)
    assert at == len(raw)
    return outs


@pytest.mark.parametrize("core", list(CORES))
def test_arm_cores_give_the_x86_kernels_bits(programs, core, tmp_path):
    problems = [make_problem(ci, *case, dtype, norm)
                for ci, case in enumerate(CASES) for dtype in DTYPES for norm in (False, True)]
    for problem, arm in zip(problems, on_arm(programs[core], core, problems, tmp_path),
                            strict=True):
        want = on_x86(problem)
        label = (tuple(problem[0].shape), problem[1].shape[0], problem[0].dtype, problem[4])
        for name, x, y in zip(("hidden", "proj", "sum", "count", "last"), arm, want,
                              strict=True):
            assert torch.equal(x, y), (core, label, name)
