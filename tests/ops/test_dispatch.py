"""Choosing a backend (``emokern/ops/dispatch.py``, ``emokern/ops/build.py``): reporting without
compiling, a backend that cannot run on the tensors' device is one clear error, the Python
overlap check agrees with the C++ one, and Triton launches under the tensors' own device."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import gpu

import emokern
from emokern.ops import build, resolve_backend
from emokern.ops.steer import rows_disjoint

REPO = Path(__file__).resolve().parents[2]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def cpu_kernel():
    assert build.load_cpu(), f"the CPU kernel did not build: {build.build_info()['cpu']}"


def run_python(code: str, timeout: float = 600, **env_overrides) -> dict:
    """Runs ``code`` in a fresh interpreter (emokern from this checkout, no forced backend);
    its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_EXTENSIONS_DIR", "EMOKERN_CACHE", "EMOKERN_BACKEND")}
    env.update(env_overrides)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- available_backends() reports, compiling is an explicit step ------------------------------

_REPORT = """
    import json, torch
    import emokern
    from emokern.ops import build
    cpu_key = lambda: torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_", "CPU")
    before = emokern.available_backends()
    out = {"before": before, "loaded_by_report": cpu_key(),
           "aot": build.build_info()["aot_cpu_available"]}
    if LOAD:
        out["load_cpu"] = build.load_cpu()
        out["after"] = emokern.available_backends()
        out["loaded"] = cpu_key()
    print(json.dumps(out))
"""


def test_available_backends_compiles_nothing(cpu_kernel, tmp_path):
    """With an empty build cache nothing is reported ready and nothing is built; with a
    finished build in the cache the CPU kernel is reported ready without being loaded."""
    empty = tmp_path / "extensions"
    empty.mkdir()
    result = run_python(_REPORT.replace("LOAD", "False"), TORCH_EXTENSIONS_DIR=str(empty))
    if result["aot"]:
        pytest.skip("an ahead-of-time emokern._C is installed: the CPU kernel is always ready")
    assert result["before"] == {"reference": True, "cpu": False, "cuda": False,
                                "triton": build.triton_usable()}
    assert not result["loaded_by_report"]
    assert list(empty.iterdir()) == []  # no build started
    cached = run_python(_REPORT.replace("LOAD", "False"),
                        TORCH_EXTENSIONS_DIR=str(build.extensions_dir()))
    assert cached["before"]["cpu"] and not cached["loaded_by_report"]


def test_load_cpu_is_the_explicit_step(cpu_kernel):
    assert emokern.available_backends()["cpu"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_", "CPU")


@pytest.mark.slow
def test_load_cpu_builds_into_an_empty_cache(tmp_path):
    """The whole sequence in a fresh cache: reported missing, built by load_cpu (a full
    compile of the CPU kernel, 15 to 60 s), then reported ready."""
    result = run_python(_REPORT.replace("LOAD", "True"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    if result["aot"]:
        pytest.skip("an ahead-of-time emokern._C is installed; nothing is compiled")
    assert not result["before"]["cpu"] and not result["loaded_by_report"]
    assert result["load_cpu"] and result["after"]["cpu"] and result["loaded"]
    assert any(tmp_path.glob("emokern_cpu_*/emokern_cpu_*.so"))


# --- a backend that cannot run on the tensors' device is an error ------------------------------

MISMATCHES = [("cpu", CUDA), ("cuda", CPU), ("triton", CPU)]


@pytest.mark.parametrize("backend,device", MISMATCHES, ids=lambda v: str(v))
def test_backend_on_the_wrong_device_is_one_clear_error(monkeypatch, backend,
                                                        device):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EMOKERN_BACKEND", raising=False)
    resolve_backend(None, CPU)  # earlier resolutions are cached: they must not hide the error
    for _ in range(2):  # nor may a cached failure turn into a success
        with pytest.raises(ValueError, match=rf"emokern\.steer_: backend '{backend}' cannot run "
                                             rf"on {device.type} tensors; use \["):
            resolve_backend(backend, device)
    monkeypatch.setenv("EMOKERN_BACKEND", backend)
    with pytest.raises(ValueError, match=rf"backend '{backend}' cannot run on {device.type}"):
        resolve_backend(None, device)


def test_triton_on_cpu_tensors_needs_the_interpreter_in_a_fresh_process():
    result = run_python("""
        import json, os, torch
        from emokern.ops import resolve_backend
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            resolve_backend("triton", torch.device("cpu"))
            error = None
        except ValueError as exc:
            error = str(exc)
        os.environ["TRITON_INTERPRET"] = "1"
        print(json.dumps({"error": error,
                          "interpreted": resolve_backend("triton", torch.device("cpu"))}))
    """)
    assert result["error"].startswith("emokern.steer_: backend 'triton' cannot run on cpu")
    assert result["interpreted"] == "triton"


def test_cached_triton_resolution_does_not_outlive_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu tensors"):
        resolve_backend("triton", CPU)


def _cpu_call():
    gen = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(2, 3, 8, generator=gen),
                vectors=torch.randn(4, 8, generator=gen),
                weights=torch.randn(2, 4, generator=gen), mask=torch.ones(2, 3, dtype=torch.bool),
                proj_out=torch.full((2, 3, 4), 7.0), running=emokern.RunningProjections(2, 4))


@pytest.mark.parametrize("backend,env", [("cuda", None), ("triton", None), (None, "cuda")],
                         ids=["cuda", "triton-no-interpreter", "EMOKERN_BACKEND=cuda"])
def test_steer_with_a_backend_for_another_device_modifies_nothing(monkeypatch,
                                                                  backend, env):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if env is None:
        monkeypatch.delenv("EMOKERN_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EMOKERN_BACKEND", env)
    args = _cpu_call()
    run = args["running"]
    before = [t.clone() for t in (args["hidden"], args["proj_out"], *run.tensors())]
    forced = backend or env
    with pytest.raises(ValueError, match=rf"emokern\.steer_: backend '{forced}' cannot run on "
                                         rf"cpu tensors"):
        emokern.steer_(**args, backend=backend)
    after = (args["hidden"], args["proj_out"], *run.tensors())
    for want, got in zip(before, after, strict=True):
        assert torch.equal(want.nan_to_num(3.0), got.nan_to_num(3.0))


def test_emokern_backend_set_while_running_takes_effect_at_once(monkeypatch, cpu_kernel):
    """The variable is read on every call (the decode fast path included), not once."""
    monkeypatch.delenv("EMOKERN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for _ in range(2):
        emokern.steer_(**_cpu_call())  # the C++ kernel's fast path
        monkeypatch.setenv("EMOKERN_BACKEND", "cuda")
        with pytest.raises(ValueError, match=r"emokern\.steer_: backend 'cuda' cannot run"):
            emokern.steer_(**_cpu_call())
        with pytest.raises(ValueError, match=r"emokern\.steer_packed_: backend 'cuda' cannot"):
            emokern.ops.steer_packed_(torch.zeros(2, 8), torch.randn(4, 8), torch.zeros(1, 4),
                                      torch.zeros(2, dtype=torch.int32))
        monkeypatch.setenv("EMOKERN_BACKEND", "reference")
        emokern.steer_(**_cpu_call())
        monkeypatch.delenv("EMOKERN_BACKEND")


@pytest.mark.parametrize("value", [None, "", "cpu", "reference"])
@pytest.mark.parametrize("name", ["EMOKERN_BACKEND", "TRITON_INTERPRET", "EMOKERN_NOT_CACHED"])
def test_environ_get_agrees_with_os_environ(monkeypatch, name, value):
    from emokern.ops.dispatch import environ_get

    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert environ_get(name) == os.environ.get(name)
    monkeypatch.setattr(os, "environ", {name: "replaced"})  # a stand-in: read through it
    assert environ_get(name) == "replaced"


@gpu
def test_cpu_backend_on_cuda_tensors_modifies_nothing():
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _cpu_call().items()}
    args["running"] = emokern.RunningProjections(2, 4, device="cuda")
    before = args["hidden"].clone()
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on cuda tensors"):
        emokern.steer_(**args, backend="cpu")
    assert torch.equal(args["hidden"], before)


# --- the Python overlap check is the C++ one ----------------------------------------------------

def _strided(sizes, strides, dtype=torch.float32):
    """A fresh ``[B, T, D]`` tensor with these strides over just enough storage."""
    extent = 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) \
        if all(sizes) else 0
    return torch.randn(max(extent, 1)).to(dtype).as_strided(sizes, strides)


def _rows_truly_disjoint(hidden) -> bool:
    """Brute force: the memory offsets of distinct ``[b, t]`` rows never meet."""
    batch, seq_len, dim = hidden.shape
    seen: set[int] = set()
    for b in range(batch):
        for t in range(seq_len):
            row = {b * hidden.stride(0) + t * hidden.stride(1) + d * hidden.stride(2)
                   for d in range(dim)}
            if seen & row:
                return False
            seen |= row
    return True


def _accepts(hidden, backend) -> bool:
    """Whether ``steer_`` on ``backend`` accepts ``hidden``'s layout (False: the overlap
    error; any other error fails the test)."""
    batch, _, dim = hidden.shape
    vectors = torch.ones(2, dim)
    try:
        emokern.steer_(hidden, vectors, torch.ones(batch, 2), backend=backend)
    except ValueError as exc:
        assert "hidden rows overlap in memory" in str(exc), exc
        return False
    return True


def _assert_checks_agree(make):
    """``make()`` returns a fresh ``hidden``: the Python check (the reference backend), the C++
    check (the CPU kernel) and :func:`rows_disjoint` agree on its layout."""
    hidden = make()
    layout = (tuple(hidden.shape), hidden.stride())
    expected = rows_disjoint(hidden)
    if expected:  # a sufficient condition: never accepts rows that share memory
        assert _rows_truly_disjoint(hidden), layout
    assert _accepts(hidden, "reference") == expected, layout
    assert _accepts(make(), "cpu") == expected, layout


def _base(*shape):
    return torch.randn(*shape)


LAYOUTS = {
    "contiguous": lambda: _base(2, 3, 8),
    "time-major [T, B] view": lambda: _base(3, 2, 8).transpose(0, 1),
    "every-other-token": lambda: _base(2, 6, 8)[:, ::2],
    "every-other-sequence": lambda: _base(4, 3, 8)[::2],
    "narrow-last-dim": lambda: _base(2, 3, 13)[..., 3:-2],
    "offset slice": lambda: _base(3, 4, 8)[1:, 1:],
    "expanded batch": lambda: _base(1, 3, 8).expand(2, 3, 8),
    "expanded tokens": lambda: _base(2, 1, 8).expand(2, 3, 8),
    "expanded both": lambda: _base(1, 1, 8).expand(2, 3, 8),
    "rows overlap (stride < D)": lambda: _strided((2, 3, 8), (24, 4, 1)),
    "same row twice": lambda: _strided((3, 4, 40), (40, 40, 1)),
    "interleaved, disjoint": lambda: _strided((2, 3, 8), (8, 16, 1)),
    "interleaved, overlapping": lambda: _strided((3, 2, 8), (8, 16, 1)),
    "disjoint but not provably": lambda: _strided((2, 2, 1), (2, 3, 1)),
    "size-1 batch, stride 0": lambda: _strided((1, 3, 8), (0, 8, 1)),
    "size-1 tokens, stride 0": lambda: _strided((2, 1, 8), (8, 0, 1)),
    "single row, any strides": lambda: _strided((1, 1, 8), (0, 0, 1)),
    "size-1 batch, tokens overlap": lambda: _strided((1, 3, 8), (24, 4, 1)),
    "size-1 tokens, batch overlaps": lambda: _strided((3, 1, 8), (5, 8, 1)),
    "D = 1, any last stride": lambda: _strided((2, 3, 1), (3, 1, 5)),
    "no sequences": lambda: _strided((0, 3, 8), (24, 8, 1)),
    "no tokens": lambda: _strided((2, 0, 8), (8, 8, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overlap_checks_agree_on_views(cpu_kernel, layout):
    _assert_checks_agree(LAYOUTS[layout])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(1, 5)),
       strides=st.tuples(st.integers(0, 30), st.integers(0, 30)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_overlap_checks_agree_on_any_strides(cpu_kernel, sizes, strides, dtype):
    _assert_checks_agree(lambda: _strided(sizes, (*strides, 1), dtype=dtype))


# --- Triton launches on the tensors' own device ------------------------------------------------

def test_device_guard_is_a_no_op_for_cpu_tensors():
    triton_steer = pytest.importorskip("emokern.ops.triton_steer")
    initialised = torch.cuda.is_initialized()
    guard = triton_steer._device_of(torch.zeros(2, 3, 4))
    assert isinstance(guard, contextlib.nullcontext)
    with guard:
        pass
    assert torch.cuda.is_initialized() == initialised  # the guard touched no CUDA state


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current (a model split over GPUs): the kernel is
    launched with cuda:1 current and computes what the reference does."""
    triton_steer = pytest.importorskip("emokern.ops.triton_steer")
    from emokern.ops.reference import ref_steer_

    launched_on = []
    launch = triton_steer._launch

    def recording_launch(*args):
        launched_on.append(torch.cuda.current_device())
        launch(*args)

    monkeypatch.setattr(triton_steer, "_launch", recording_launch)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 70, 96, generator=gen)
    vectors, weights = torch.randn(3, 96, generator=gen), torch.randn(2, 3, generator=gen)
    want, want_proj = hidden.clone(), torch.empty(2, 70, 3)
    ref_steer_(want, vectors, weights, None, True, want_proj)
    dev = torch.device("cuda", 1)
    got, got_proj = hidden.to(dev), torch.empty(2, 70, 3, device=dev)
    with torch.cuda.device(0):
        triton_steer.triton_steer_(got, vectors.to(dev), weights.to(dev), None, True, got_proj,
                                   None, None, None)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev)
    assert launched_on == [1]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_proj.cpu(), want_proj, rtol=1e-5, atol=1e-4)


# --- the op layer's structure: no import circle, Triton imported only when used ---------------

OPS_DIR = REPO / "emokern" / "ops"


def ops_import_graph() -> dict[str, set[str]]:
    """``module -> the emokern.ops modules it imports`` for every module of ``emokern/ops``
    (the package itself is ``emokern.ops``), counting every import statement: top level and
    deferred (inside functions), ``import a.b`` and ``from a import b`` (``b`` a submodule or
    a name of ``a``)."""
    import ast

    modules = {p.stem: p for p in OPS_DIR.glob("*.py")}

    def name_of(stem):
        return "emokern.ops" if stem == "__init__" else f"emokern.ops.{stem}"

    graph = {}
    for stem, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package emokern.ops
                    base = "emokern.ops" + (f".{base}" if base else "")
                found = [f"{base}.{alias.name}" if base == "emokern.ops"
                         and alias.name in modules else base for alias in node.names]
            else:
                continue
            targets |= {t for t in found if t == "emokern.ops" or t.startswith("emokern.ops.")
                        or t.split(".")[0] == "triton"}
        graph[name_of(stem)] = targets - {name_of(stem)}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of modules, the first repeated last), or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_ops_modules_import_each_other_without_a_circle():
    graph = ops_import_graph()
    assert {"emokern.ops.dispatch", "emokern.ops.steer", "emokern.ops.steer_packed",
            "emokern.ops.scale_neurons"} <= graph.keys()
    assert "emokern.ops.library" not in graph
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
    # Triton is an optional extra: only the Triton kernel modules import it.
    assert {name for name, targets in graph.items() if any(t.startswith("triton")
                                                            for t in targets)} \
        == {"emokern.ops.triton_steer", "emokern.ops.triton_ablate"}
    # The dispatcher sits below the op and kernel modules: it names kernel modules by string.
    assert graph["emokern.ops.dispatch"] <= {"emokern.ops.build"}


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_cpu_calls_leave_the_triton_kernels_unimported():
    """(torch itself may import triton, when installed: torch._dynamo does.)"""
    result = run_python("""
        import json, sys, torch
        import emokern
        from emokern.ops import scale_neurons_, steer_packed_
        emokern.steer_(torch.ones(1, 2, 8), torch.ones(2, 8), torch.ones(1, 2), backend="reference")
        steer_packed_(torch.ones(3, 8), torch.ones(2, 8), torch.ones(1, 2),
                      torch.zeros(3, dtype=torch.int32), backend="reference")
        scale_neurons_(torch.ones(2, 8), torch.tensor([1, 3]), backend="reference")
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("emokern.ops.triton"))))
    """, TRITON_INTERPRET="0")
    assert result == []


@pytest.mark.parametrize("op", ["steer_", "steer_packed_", "scale_neurons_"])
def test_every_backend_of_an_op_has_a_runner(op):
    from emokern.ops import dispatch

    assert dispatch.runner_for("reference", op) is getattr(emokern.ops, f"ref_{op}")
    if build.triton_usable() or "triton" in sys.modules:
        pytest.importorskip("triton")
        assert callable(dispatch.runner_for("triton", op))
