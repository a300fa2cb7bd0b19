"""Building and loading the C++ CPU kernel: registration, data checks, fallback, determinism."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import emokern
from emokern.ops import build
from emokern.ops.reference import ref_steer_

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cpu_kernel():
    assert build.load_cpu(), f"the CPU kernel did not build: {build.build_info()['cpu']}"


def run_python(code: str, env: dict, timeout: float = 300) -> dict:
    """Runs code in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def clean_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_EXTENSIONS_DIR", "EMOKERN_CACHE", "EMOKERN_BACKEND", "CXX")}
    env.update(overrides)
    return env


def test_jit_build_registers_a_cpu_kernel(cpu_kernel):
    info = build.build_info()
    assert info["cpu"]["loaded"] and info["cpu"]["source"] in ("aot", "jit")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_", "CPU")
    if info["cpu"]["source"] == "jit":
        name = info["cpu"]["name"]
        assert name.startswith("emokern_cpu_") and os.path.isfile(info["cpu"]["path"])
        assert info["cpu"]["path"].startswith(info["cache_dir"])
    assert emokern.available_backends()["cpu"]
    assert info["cpu"]["isa"] in ("avx512", "avx2", "sve256", "neon", "default")


def test_build_info_names_the_capped_instruction_set_in_a_fresh_process():
    result = run_python("""
        import json
        from emokern.ops import build
        before = build.build_info()["cpu"]["isa"]
        build.load_cpu()
        print(json.dumps({"before": before, "after": build.build_info()["cpu"]["isa"]}))
    """, clean_env(EMOKERN_CPU_CAPABILITY="default"))
    assert result["before"] is None  # nothing loaded, nothing to name
    assert result["after"] in ("default", "neon")


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("EMOKERN_CACHE", str(tmp_path / "c"))
    assert build.extensions_dir() == tmp_path / "c" / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "t"))
    assert build.extensions_dir() == tmp_path / "t"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.delenv("EMOKERN_CACHE")
    assert build.extensions_dir() == Path("~/.cache/emokern/torch_extensions").expanduser()


def test_build_names_differ_by_flags_and_sources(tmp_path):
    source = tmp_path / "a.cpp"
    source.write_text("int f() { return 1; }")
    base = build._build_name("emokern_cpu", [source], build.CPU_CFLAGS)
    assert base == build._build_name("emokern_cpu", [source], build.CPU_CFLAGS)
    assert base != build._build_name("emokern_cpu", [source], (*build.CPU_CFLAGS, "-DX"))
    source.write_text("int f() { return 2; }")
    assert base != build._build_name("emokern_cpu", [source], build.CPU_CFLAGS)


def test_cpu_march_replaces_native_and_names_its_own_build(monkeypatch):
    monkeypatch.delenv("EMOKERN_CPU_MARCH", raising=False)
    assert build.cpu_cflags() == build.CPU_CFLAGS
    native = build._cpu_target()
    monkeypatch.setenv("EMOKERN_CPU_MARCH", "x86-64-v3")
    flags = build.cpu_cflags()
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags
    assert len(flags) == len(build.CPU_CFLAGS)
    assert build._cpu_target()[0] != native[0]
    assert build.build_info()["cpu_flags"] == " ".join(flags)


def test_the_kernel_runs_instead_of_the_reference(cpu_kernel):
    # The kernel is batch-invariant by construction (every row's arithmetic is fixed), the
    # reference's matmuls are not guaranteed to be: a row computed alone equals the same row in
    # a batch bit for bit, and differs from the reference by rounding only.
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 1, 1000, generator=gen)
    vectors = torch.randn(12, 1000, generator=gen)
    weights = torch.randn(5, 12, generator=gen)
    batch, alone = hidden.clone(), hidden[2:3].clone()
    p_batch, p_alone = torch.empty(5, 1, 12), torch.empty(1, 1, 12)
    torch.ops.emokern.steer_(batch, vectors, weights, None, True, p_batch, None, None, None)
    torch.ops.emokern.steer_(alone, vectors, weights[2:3], None, True, p_alone, None, None, None)
    assert torch.equal(batch[2:3], alone) and torch.equal(p_batch[2:3], p_alone)
    want, p_want = hidden.clone(), torch.empty(5, 1, 12)
    ref_steer_(want, vectors, weights, None, True, p_want)
    torch.testing.assert_close(batch, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_batch, p_want, rtol=1e-5, atol=1e-4)


def _state(hidden, proj, run):
    return [t.clone() for t in (hidden, proj, *run.tensors())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", ["weights_nan", "weights_inf", "vector_zero", "vector_nan"])
@pytest.mark.parametrize("direct", [True, False], ids=["torch.ops", "emokern.steer_"])
def test_data_checks_raise_before_writing(cpu_kernel, dtype, bad, direct):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 4, 40, generator=gen).to(dtype)
    vectors = torch.randn(5, 40, generator=gen)
    weights = torch.randn(3, 5, generator=gen)
    proj = torch.randn(3, 4, 5, generator=gen)
    run = emokern.RunningProjections(3, 5)
    run.sum.normal_(generator=gen)
    if bad == "weights_nan":
        weights[2, 4] = float("nan")
        match = "weights must be finite"
    elif bad == "weights_inf":
        weights[0, 0] = float("-inf")
        match = "weights must be finite"
    elif bad == "vector_zero":
        vectors[3] = 0
        match = r"vectors\[3\] has zero or non-finite norm"
    else:
        vectors[1, 7] = float("nan")
        match = r"vectors\[1\] has zero or non-finite norm"
    before = _state(hidden, proj, run)
    with pytest.raises(ValueError, match=match):
        if direct:
            torch.ops.emokern.steer_(hidden, vectors, weights, None, False, proj, *run.tensors())
        else:
            emokern.steer_(hidden, vectors, weights, proj_out=proj, running=run, backend="cpu")
    for got, want in zip(_state(hidden, proj, run), before, strict=True):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("corrupt, exc, match", [
    (lambda a: a.update(weights=a["weights"][:, :2]), ValueError, "weights must have shape"),
    (lambda a: a.update(weights=a["weights"].double()), TypeError, "weights must be"),
    (lambda a: a.update(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have"),
    (lambda a: a.update(proj_out=torch.zeros(4, 3, 5).transpose(0, 1)), ValueError,
     "proj_out must be contiguous"),
    (lambda a: a.update(run_count=torch.zeros(3)), TypeError, "running.count must be"),
    (lambda a: a.update(hidden=torch.zeros(240).as_strided((3, 4, 40), (40, 40, 1))),
     ValueError, "overlap"),
    (lambda a: a.update(hidden=torch.randn(4, 3, 40).transpose(0, 1)), None, None),
])
def test_metadata_checks_of_direct_calls(cpu_kernel, corrupt, exc, match):
    """torch.ops.emokern.steer_ bypasses the wrapper: the C++ kernel checks for itself."""
    gen = torch.Generator().manual_seed(3)
    args = dict(hidden=torch.randn(3, 4, 40, generator=gen), vectors=torch.randn(5, 40),
                weights=torch.randn(3, 5), mask=None, norm_preserving=False,
                proj_out=torch.zeros(3, 4, 5), run_sum=torch.zeros(3, 5),
                run_count=torch.zeros(3, dtype=torch.long), run_last=torch.zeros(3, 5))
    corrupt(args)
    if exc is None:  # a layout that is fine: steered in place, like the reference
        want = args["hidden"].clone()
        ref_steer_(want, args["vectors"], args["weights"])
        torch.ops.emokern.steer_(*args.values())
        torch.testing.assert_close(args["hidden"], want, rtol=1e-5, atol=1e-5)
        return
    hidden_before = args["hidden"].clone()
    with pytest.raises(exc, match=match):
        torch.ops.emokern.steer_(*args.values())
    assert torch.equal(args["hidden"], hidden_before)


def _run_with_threads(n_threads, hidden, vectors, weights, mask, norm_preserving):
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        hidden = hidden.clone()
        batch, seq_len, _ = hidden.shape
        proj = torch.empty(batch, seq_len, vectors.shape[0])
        run = emokern.RunningProjections(batch, vectors.shape[0])
        for _ in range(2):  # accumulate over two calls
            emokern.steer_(hidden, vectors, weights, mask=mask, norm_preserving=norm_preserving,
                           proj_out=proj, running=run, backend="cpu")
        return [hidden, proj, *run.tensors()]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("shape", [(2, 300, 576, 8), (1, 700, 256, 20), (64, 1, 512, 16),
                                   (40, 1, 1000, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(cpu_kernel, shape, dtype):
    if os.cpu_count() < 2:
        pytest.skip("needs 2 cores")
    batch, seq_len, dim, n_vec = shape
    gen = torch.Generator().manual_seed(4)
    hidden = (torch.randn(batch, seq_len, dim, generator=gen) * 3).to(dtype)
    vectors = torch.randn(n_vec, dim, generator=gen)
    weights = torch.randn(batch, n_vec, generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) < 0.8
    for norm_preserving in (False, True):
        one = _run_with_threads(1, hidden, vectors, weights, mask, norm_preserving)
        two = _run_with_threads(2, hidden, vectors, weights, mask, norm_preserving)
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_missing_compiler_warns_and_falls_back_to_the_reference(tmp_path):
    result = run_python("""
        import json, warnings
        warnings.simplefilter("always")
        import torch
        with warnings.catch_warnings(record=True) as caught:
            import emokern
            from emokern.ops import build, dispatch
            loaded = build.load_cpu()
        ours = [str(w.message) for w in caught if str(w.message).startswith("emokern:")]
        h = torch.ones(1, 2, 3)
        emokern.steer_(h, torch.ones(1, 3), torch.ones(1, 1))
        print(json.dumps({
            "loaded": loaded, "warnings": ours, "h": h.tolist(),
            "backend": dispatch.resolve_backend(None, h.device),
            "cpu_key": torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_", "CPU"),
            "aot": build.build_info()["aot_cpu_available"],
        }))
    """, clean_env(CXX=str(tmp_path / "no-such-compiler"), EMOKERN_CACHE=str(tmp_path)))
    if result["aot"]:
        pytest.skip("an ahead-of-time emokern._C is installed; nothing is compiled")
    assert result["loaded"] is False and result["backend"] == "reference"
    assert not result["cpu_key"]
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "could not build the C++ CPU kernel" in message and "no-such-compiler" in message
    assert "using the reference backend" in message
    assert result["h"] == [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes compiling into the same empty cache: torch's lock lets one build, the
    other waits and loads the same binary; both then compute."""
    code = """
        import json, torch
        from emokern.ops import build
        ok = build.load_cpu()
        h = torch.randn(2, 3, 64); v = torch.randn(4, 64); w = torch.randn(2, 4)
        want = h.clone()
        from emokern.ops.reference import ref_steer_
        ref_steer_(want, v, w)
        torch.ops.emokern.steer_(h, v, w, None, False, None, None, None, None)
        print(json.dumps({"ok": ok, "close": bool(torch.allclose(h, want, atol=1e-5)),
                          "info": build.build_info()["cpu"]}))
    """
    env = clean_env(EMOKERN_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    if any(r["info"]["source"] == "aot" for r in results):
        pytest.skip("an ahead-of-time emokern._C is installed; nothing is compiled")
    assert all(r["ok"] and r["close"] and r["info"]["source"] == "jit" for r in results)
    assert results[0]["info"]["path"] == results[1]["info"]["path"]


_AOT_RUN = """
    import ctypes, json, sys, torch
    import emokern.ops  # the schemas, before the kernels register
    so, out = sys.argv[1], sys.argv[2]
    torch.ops.load_library(so)
    lib = ctypes.CDLL(so)
    lib.emokern_cpu_isa.restype = ctypes.c_char_p
    sys.path.insert(0, "tests/ops")
    from test_build import aot_cases
    torch.save(aot_cases(), out)
    print(json.dumps({"isa": lib.emokern_cpu_isa().decode(), "has": {
        op: torch._C._dispatch_has_kernel_for_dispatch_key(f"emokern::{op}", "CPU")
        for op in ("steer_", "steer_packed_", "scale_neurons_")}}))
"""


def aot_cases() -> list[torch.Tensor]:
    """Seeded calls of every CPU op through the dispatcher (whichever kernel is registered)."""
    gen = torch.Generator().manual_seed(5)
    torch.set_num_threads(1)
    results = []
    for (b, t, d, k), dtype, norm in [((3, 5, 77, 3), torch.float32, False),
                                      ((2, 1, 576, 8), torch.bfloat16, True),
                                      ((1, 9, 33, 9), torch.float16, False)]:
        h = torch.randn(b, t, d, generator=gen).to(dtype)
        v, w = torch.randn(k, d, generator=gen), torch.randn(b, k, generator=gen)
        m = torch.rand(b, t, generator=gen) < 0.7
        p, run = torch.empty(b, t, k), emokern.RunningProjections(b, k)
        torch.ops.emokern.steer_(h, v, w, m, norm, p, *run.tensors())
        packed, slots = torch.randn(6, d, generator=gen).to(dtype), torch.tensor(
            [0, -1, 1, 0, 1, 1], dtype=torch.int32)
        p_packed = torch.empty(6, k)
        torch.ops.emokern.steer_packed_(packed, None, v, torch.randn(2, k, generator=gen),
                                        slots, norm, p_packed, None, None, None)
        act = torch.randn(4, 3, d, generator=gen).to(dtype)
        torch.ops.emokern.scale_neurons_(act, torch.tensor([0, 5, d - 1]), 0.5)
        results += [h, p, *run.tensors(), packed, p_packed, act]
    return results


@pytest.mark.slow
def test_ahead_of_time_build_has_every_op_and_the_jit_bits(cpu_kernel, tmp_path):
    """setup.py (EMOKERN_BUILD_EXT=1) compiles every csrc/cpu/*.cpp the JIT build compiles: the
    baseline objects without -march and each instruction set's core with its own flags. The
    module registers every CPU op; its widest path gives the JIT kernel's bits, and so does its
    portable core except where that core has no FMA while the JIT build's has (the x86-64
    baseline on an FMA machine rounds products separately, the documented exception): there
    it agrees within rounding."""
    if build.build_info()["cpu"]["source"] != "jit":
        pytest.skip("compares the ahead-of-time build with a JIT build")
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")], cwd=REPO, capture_output=True, text=True,
        env=clean_env(EMOKERN_BUILD_EXT="1"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (module,) = (tmp_path / "lib" / "emokern").glob("_C*.so")
    want = aot_cases()
    for cap in (None, "default"):
        out = tmp_path / f"cases-{cap}.pt"
        env = clean_env() if cap is None else clean_env(EMOKERN_CPU_CAPABILITY=cap)
        ran = subprocess.run([sys.executable, "-c", textwrap.dedent(_AOT_RUN), str(module),
                              str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert ran.returncode == 0, ran.stderr[-3000:]
        result = json.loads(ran.stdout.strip().splitlines()[-1])
        assert all(result["has"].values()), result
        assert result["isa"] == (build.cpu_isa() if cap is None else "default") or \
            cap is not None and result["isa"] == "neon"
        exact = result["isa"] != "default" or build.cpu_isa() == "default" \
            or platform.machine().lower() not in ("x86_64", "amd64")
        for i, (got, exp) in enumerate(zip(torch.load(out), want, strict=True)):
            assert torch.equal(got.isnan(), exp.isnan()), (cap, i)
            if exact or not got.is_floating_point():
                assert torch.equal(got.nan_to_num(), exp.nan_to_num()), (cap, i)
            else:
                tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
                torch.testing.assert_close(got, exp, rtol=tol[got.dtype], atol=tol[got.dtype],
                                           equal_nan=True, msg=f"{cap}, case {i}")
