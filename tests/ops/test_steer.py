"""The steer_ op (``emokern/ops/steer.py``): the reference vs the op's definition in
``docs/design.md`` literally, compiled backends vs the reference, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import assert_flash_close, batched_term_scales

import emokern
from emokern.ops import build
from emokern.ops.reference import NORM_EPS, ref_steer_

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# available_backends() compiles nothing: build (or load) the CPU kernel explicitly, once.
# test_the_cpu_kernel_builds fails, with the reason, when it does not.
COMPILED = [b for b in ("cpu",) if build.load_cpu()]


def literal_steer(hidden, vectors, weights, mask, norm_preserving, proj_out, run):
    """The op's definition (``docs/design.md``) transcribed row by row, in float64: the oracle
    of the oracle."""
    batch, seq_len, _ = hidden.shape
    v = vectors.double()
    for b in range(batch):
        for t in range(seq_len):
            x = hidden[b, t].double()
            p = (v @ x) / v.norm(dim=1)
            if mask is None or bool(mask[b, t]):
                y = x + weights[b].double() @ v
                if norm_preserving:
                    y = y * x.norm() / max(y.norm(), NORM_EPS)
                hidden[b, t] = y.to(hidden.dtype)
                if run is not None:
                    run.sum[b] += p.float()
                    run.count[b] += 1
                    run.last[b] = p.float()
            if proj_out is not None:
                proj_out[b, t] = p.float()


def make_case(batch, seq_len, dim, n_vec, dtype, *, masked, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # rows of a wider, longer buffer: strides (2T(D+3), 2(D+3), 1)
        base = torch.randn(batch, 2 * seq_len, dim + 3, generator=gen).to(dtype)
        hidden = base[:, ::2, :dim]
    else:
        base = torch.randn(batch, seq_len, dim, generator=gen).to(dtype)
        hidden = base
    vectors = torch.randn(n_vec, dim, generator=gen)
    weights = torch.randn(batch, n_vec, generator=gen) * 2
    mask = torch.rand(batch, seq_len, generator=gen) < 0.7 if masked else None
    return base, hidden, vectors, weights, mask


def run_backend(backend, hidden, vectors, weights, mask, norm_preserving):
    batch, seq_len, _ = hidden.shape
    n_vec = vectors.shape[0]
    proj = torch.full((batch, seq_len, n_vec), float("nan"))
    run = emokern.RunningProjections(batch, n_vec)  # start from earlier calls' statistics
    gen = torch.Generator().manual_seed(batch * n_vec)
    run.sum.normal_(generator=gen)
    run.count.fill_(3)
    run.last.normal_(generator=gen)
    emokern.steer_(hidden, vectors, weights, mask=mask, norm_preserving=norm_preserving,
                   proj_out=proj, running=run, backend=backend)
    return proj, run


def test_the_cpu_kernel_builds():
    assert COMPILED == ["cpu"], f"the CPU kernel did not build: {build.build_info()['cpu']}"
    assert emokern.available_backends()["cpu"]


def test_reference_matches_design_literally():
    for seed, (batch, seq_len, dim, n_vec) in enumerate([(2, 3, 5, 2), (1, 4, 7, 3), (3, 1, 1, 1)]):
        for norm_preserving in (False, True):
            for dtype in DTYPES:
                _, hidden, vectors, weights, mask = make_case(batch, seq_len, dim, n_vec, dtype,
                                                              masked=True, seed=seed)
                want_h, got_h = hidden.clone(), hidden.clone()
                want_p = torch.zeros(batch, seq_len, n_vec)
                got_p = torch.zeros(batch, seq_len, n_vec)
                want_r = emokern.RunningProjections(batch, n_vec)
                got_r = emokern.RunningProjections(batch, n_vec)
                literal_steer(want_h, vectors, weights, mask, norm_preserving, want_p, want_r)
                ref_steer_(got_h, vectors, weights, mask, norm_preserving, got_p, *got_r.tensors())
                tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
                torch.testing.assert_close(got_h.float(), want_h.float(), rtol=tol, atol=tol)
                torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_r.sum, want_r.sum, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_r.last, want_r.last, equal_nan=True)
                assert torch.equal(got_r.count, want_r.count)


def assert_matches_reference(backend, batch, seq_len, dim, n_vec, dtype, masked, norm_preserving,
                             strided, seed):
    base, hidden, vectors, weights, mask = make_case(batch, seq_len, dim, n_vec, dtype,
                                                     masked=masked, seed=seed, strided=strided)
    h32 = hidden.float().contiguous().clone()  # .float() of a float32 tensor is itself
    low = hidden.contiguous().clone()
    base_before = base.clone()
    scales = batched_term_scales(low, vectors, weights, mask, norm_preserving)
    proj32, run32 = run_backend("reference", h32, vectors, weights, mask, norm_preserving)
    run_backend("reference", low, vectors, weights, mask, norm_preserving)
    proj, run = run_backend(backend, hidden, vectors, weights, mask, norm_preserving)

    # flash-attention's rule, per element: each element's error vs the float32 reference
    # within 2x the storage-dtype reference's error at that element, plus atol + rtol x the
    # element's own scale (the terms it is made of: batched_term_scales).
    assert_flash_close("hidden", hidden, h32, low, scale=scales[0])
    # Nothing outside the view was touched (strided case writes into a wider buffer).
    if strided:
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[:, ::2, :dim] = False
        assert torch.equal(base[outside], base_before[outside])
    # Unsteered rows stay bit-identical.
    if mask is not None:
        assert torch.equal(hidden[~mask], base_before[:, ::2, :dim][~mask] if strided
                           else base_before[~mask])
    # Projections read the storage-dtype input: the float32 reference ran on that input
    # (h32 holds its values exactly), so the storage-dtype slack is zero for them.
    assert_flash_close("proj_out", proj, proj32, proj32, scale=scales[1])
    assert_flash_close("running.sum", run.sum, run32.sum, run32.sum, scale=scales[2])
    assert_flash_close("running.last", run.last, run32.last, run32.last, scale=scales[3])
    assert torch.equal(run.count, run32.count)


@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.integers(1, 65),
    seq_len=st.integers(1, 37),
    dim=st.sampled_from([1, 7, 64, 577, 2048, 4099]),
    n_vec=st.integers(1, 33),
    dtype=st.sampled_from(DTYPES),
    masked=st.booleans(),
    norm_preserving=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_backend_matches_reference(backend, batch, seq_len, dim, n_vec, dtype, masked,
                                            norm_preserving, strided, seed):
    if batch * seq_len * dim > 500_000:  # keep CI fast; the largest rows are covered below
        seq_len = max(1, 500_000 // (batch * dim))
    assert_matches_reference(backend, batch, seq_len, dim, n_vec, dtype, masked, norm_preserving,
                             strided, seed)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4099, 33), (65, 37, 577, 1), (3, 5, 1, 7),
                                   (1, 300, 64, 8)])
def test_awkward_shapes(backend, dtype, shape):
    for norm_preserving in (False, True):
        assert_matches_reference(backend, *shape, dtype, masked=True,
                                 norm_preserving=norm_preserving, strided=True, seed=1)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_vec", [1, 3, 5, 8, 9, 32, 33])
@pytest.mark.parametrize("seq_len", [1, 3])
def test_steering_without_readings_writes_the_same_rows(backend, dtype, n_vec, seq_len):
    """Without proj_out and running the kernel skips the dot products but must still add every
    vector (decode with more vectors than a sweep holds once applied only the first eight)."""
    for norm_preserving in (False, True):
        _, hidden, vectors, weights, mask = make_case(17, seq_len, 577, n_vec, dtype, masked=True,
                                                      seed=n_vec)
        bare, read, ref = hidden.clone(), hidden.clone(), hidden.float()
        emokern.steer_(bare, vectors, weights, mask=mask, norm_preserving=norm_preserving,
                       backend=backend)
        run_backend(backend, read, vectors, weights, mask, norm_preserving)
        ref_steer_(ref, vectors, weights, mask, norm_preserving)
        assert torch.equal(bare, read)
        tol = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
        torch.testing.assert_close(bare.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_mask_none_equals_all_true_and_all_false_changes_nothing(backend):
    _, hidden, vectors, weights, _ = make_case(3, 4, 64, 5, torch.float32, masked=False, seed=2)
    a, b, c = hidden.clone(), hidden.clone(), hidden.clone()
    emokern.steer_(a, vectors, weights, backend=backend)
    emokern.steer_(b, vectors, weights, mask=torch.ones(3, 4, dtype=torch.bool), backend=backend)
    run = emokern.RunningProjections(3, 5)
    emokern.steer_(c, vectors, weights, mask=torch.zeros(3, 4, dtype=torch.bool), running=run,
                   backend=backend)
    assert torch.equal(a, b)
    assert torch.equal(c, hidden)
    assert run.count.tolist() == [0, 0, 0] and run.last.isnan().all()


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_norm_preserving_keeps_row_norms(backend):
    _, hidden, vectors, weights, _ = make_case(4, 6, 577, 3, torch.float32, masked=False, seed=3)
    before = hidden.norm(dim=-1)
    emokern.steer_(hidden, vectors, weights, norm_preserving=True, backend=backend)
    torch.testing.assert_close(hidden.norm(dim=-1), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_running_accumulates_over_calls_and_resets(backend):
    run = emokern.RunningProjections(2, 3)
    vectors = torch.eye(3, 8)
    weights = torch.zeros(2, 3)
    hidden = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [False, False, False, True]])
    emokern.steer_(hidden.clone(), vectors, weights, mask=mask, running=run, backend=backend)
    emokern.steer_(hidden.clone(), vectors, weights, mask=mask, running=run, backend=backend)
    assert run.count.tolist() == [4, 2]
    torch.testing.assert_close(run.sum[0], 2 * (hidden[0, 0, :3] + hidden[0, 1, :3]))
    torch.testing.assert_close(run.last[1], hidden[1, 3, :3])
    torch.testing.assert_close(run.mean()[1], hidden[1, 3, :3])
    run.reset(rows=[0])
    assert run.count.tolist() == [0, 2] and run.last[0].isnan().all()
    run.reset()
    assert run.count.tolist() == [0, 0]


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    _, hidden, vectors, weights, mask = make_case(2, 3, 16, 4, torch.float32, masked=True, seed=4)
    run = emokern.RunningProjections(2, 4)
    proj = torch.zeros(2, 3, 4)
    torch.library.opcheck(torch.ops.emokern.steer_.default,
                          (hidden, vectors, weights, mask, True, proj, *run.tensors()))
    torch.library.opcheck(torch.ops.emokern.steer_.default,
                          (hidden, vectors, weights, None, False, None, None, None, None))


def test_opcheck_reference_registration():
    # With nothing compiled the op still exists through the composite reference.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_",
                                                           "CompositeExplicitAutograd")


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_torch_compile_fullgraph(backend):
    _, hidden, vectors, weights, mask = make_case(3, 5, 64, 4, torch.float32, masked=True, seed=5)
    run_eager, run_comp = emokern.RunningProjections(3, 4), emokern.RunningProjections(3, 4)
    h_eager, h_comp = hidden.clone(), hidden.clone()

    def step(h, sum_, count, last):
        torch.ops.emokern.steer_(h, vectors, weights, mask, True, None, sum_, count, last)
        return h * 1.0

    compiled = torch.compile(step, fullgraph=True, backend="eager" if backend == "reference"
                             else "inductor")
    step(h_eager, *run_eager.tensors())
    compiled(h_comp, *run_comp.tensors())
    torch.testing.assert_close(h_comp, h_eager)
    torch.testing.assert_close(run_comp.sum, run_eager.sum)
    assert torch.equal(run_comp.count, run_eager.count)


@pytest.mark.parametrize("backend", ["reference", *COMPILED, None])
def test_public_wrapper_compiles_fullgraph(backend):
    _, hidden, vectors, weights, _ = make_case(2, 3, 32, 2, torch.float32, masked=False, seed=6)
    want = hidden.clone()
    literal_steer(want, vectors, weights, None, False, None, None)  # the definition

    @torch.compile(fullgraph=True, backend="eager")
    def step(h):
        emokern.steer_(h, vectors, weights, backend=backend)
        return h

    torch.testing.assert_close(step(hidden.clone()), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors: one clear message,
# nothing modified.

def _good():
    hidden = torch.randn(2, 3, 8)
    return dict(hidden=hidden, vectors=torch.randn(4, 8), weights=torch.randn(2, 4),
                mask=torch.ones(2, 3, dtype=torch.bool), proj_out=torch.zeros(2, 3, 4),
                running=emokern.RunningProjections(2, 4))


BAD_INPUTS = [
    ("hidden", lambda a: a.update(hidden=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError),
    ("hidden", lambda a: a.update(hidden=torch.randn(6, 8)), ValueError),
    ("hidden", lambda a: a.update(hidden=torch.randn(2, 8, 3).transpose(1, 2)), ValueError),
    ("hidden", lambda a: a.update(hidden=torch.randn(1, 1, 8).expand(2, 3, 8)), ValueError),
    ("vectors", lambda a: a.update(vectors=torch.randn(4, 9)), ValueError),
    ("vectors", lambda a: a.update(vectors=torch.ones(4, 8, dtype=torch.int32)), TypeError),
    ("vectors", lambda a: a["vectors"][2].zero_(), ValueError),
    ("vectors", lambda a: a["vectors"][1, 3].fill_(float("nan")), ValueError),
    ("weights", lambda a: a.update(weights=torch.randn(2, 3)), ValueError),
    ("weights", lambda a: a.update(weights=torch.randn(3, 4)), ValueError),
    ("weights", lambda a: a.update(weights=torch.randn(2, 4, dtype=torch.float64)), TypeError),
    ("weights", lambda a: a["weights"][1, 2].fill_(float("inf")), ValueError),
    ("weights", lambda a: a["weights"][0, 0].fill_(float("nan")), ValueError),
    ("mask", lambda a: a.update(mask=torch.ones(2, 3, dtype=torch.uint8)), TypeError),
    ("mask", lambda a: a.update(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError),
    ("proj_out", lambda a: a.update(proj_out=torch.zeros(2, 3, 5)), ValueError),
    ("proj_out", lambda a: a.update(proj_out=torch.zeros(2, 3, 4, dtype=torch.float64)),
     TypeError),
    ("proj_out", lambda a: a.update(proj_out=torch.zeros(2, 4, 3).transpose(1, 2)), ValueError),
    ("running", lambda a: a.update(running=emokern.RunningProjections(3, 4)), ValueError),
    ("running", lambda a: a.update(running=emokern.RunningProjections(2, 5)), ValueError),
    ("running", lambda a: a.update(running=(torch.zeros(2, 4),)), TypeError),
    ("weights", lambda a: a.update(weights=torch.randn(2, 4, device="meta")), ValueError),
    ("backend", lambda a: a.update(backend="tpu"), ValueError),
]


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("name,corrupt,exc", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in
                                                                 enumerate(BAD_INPUTS)])
def test_bad_input_raises_one_clear_error_and_modifies_nothing(backend, name, corrupt, exc):
    args = _good()
    args["backend"] = backend
    corrupt(args)
    snapshot = {k: v.clone() for k, v in args.items()
                if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    run = args["running"]
    run_before = [t.clone() for t in run.tensors()] if isinstance(run, emokern.RunningProjections) \
        else None
    with pytest.raises(exc, match=rf"emokern\.steer_: .*{name}"):
        emokern.steer_(**args)
    for key, value in snapshot.items():
        assert torch.equal(args[key].nan_to_num(7.0), value.nan_to_num(7.0)), key
    if run_before is not None:
        for before, after in zip(run_before, run.tensors(), strict=True):
            assert torch.equal(before.nan_to_num(7.0), after.nan_to_num(7.0))


def test_schema_is_derived_from_the_reference_signature():
    """One signature: the schema comes from ``ref_steer_``'s, alias annotations included."""
    from emokern.ops import steer

    want = ("(Tensor(a!) hidden, Tensor vectors, Tensor weights, Tensor? mask, "
            "bool norm_preserving, Tensor(b!)? proj_out=None, Tensor(c!)? run_sum=None, "
            "Tensor(d!)? run_count=None, Tensor(e!)? run_last=None, Tensor? bounds=None, "
            "Tensor? gram=None) -> ()")
    assert steer.SCHEMA == want
    assert str(torch.ops.emokern.steer_.default._schema) == f"emokern::steer_{want}"
