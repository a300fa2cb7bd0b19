"""The packed-token op steer_packed_: reference vs the semantics transcribed token by token,
the batched op as its special case, split residual streams, slots, errors, compile."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import emokern
from emokern.ops import RunningProjections, build, ref_steer_, ref_steer_packed_, steer_packed_

EPS = 1e-6
#: The backends every test that checks values runs on (Triton, under the interpreter: only
#: test_every_backend_matches_the_reference, it is slow). Named explicitly: a test without a
#: backend runs whatever the dispatcher picks and would not say which one it checked.
COMPILED = [b for b in ("cpu",) if build.load_cpu()]
BACKENDS = ["reference", *COMPILED]
#: Tolerance of a storage dtype against the float64 definition (one rounding of O(10) values).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=1e-2, atol=6e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-2)}


def literal_packed(hidden, residual, vectors, slot_weights, token_slot, norm_preserving):
    """docs/design.md's packed semantics, one token at a time, in float64. Returns
    (new hidden, proj [N, K], sum [S, K], count [S], last [S, K])."""
    n, _ = hidden.shape
    s_count, k_count = slot_weights.shape
    h = hidden.double().clone()
    r = torch.zeros_like(h) if residual is None else residual.double()
    v = vectors.double()
    proj = torch.zeros(n, k_count, dtype=torch.float64)
    run_sum = torch.zeros(s_count, k_count, dtype=torch.float64)
    run_count = torch.zeros(s_count, dtype=torch.int64)
    run_last = torch.full((s_count, k_count), float("nan"), dtype=torch.float64)
    for i in range(n):
        x = h[i] + r[i]
        p = torch.stack([x @ v[k] / v[k].norm() for k in range(k_count)])
        proj[i] = p
        s = int(token_slot[i])
        if s < 0:
            continue
        y = x.clone()
        for k in range(k_count):
            y = y + float(slot_weights[s, k]) * v[k]
        if norm_preserving:
            y = y * x.norm() / max(float(y.norm()), EPS)
        h[i] = y - r[i]
        run_sum[s] += p
        run_count[s] += 1
        run_last[s] = p
    return h, proj, run_sum, run_count, run_last


def make_case(n, dim, k, slots, *, n_max=None, dtype=torch.float32, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(dtype)
    res = torch.randn(n, dim, generator=g).to(dtype) if residual else None
    vectors = torch.randn(k, dim, generator=g)
    weights = torch.randn(slots, k, generator=g)
    n_max = n if n_max is None else n_max
    token_slot = torch.randint(-1, slots, (n_max,), generator=g, dtype=torch.int32)
    return hidden, res, vectors, weights, token_slot


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), dim=st.sampled_from([1, 7, 64, 577]), k=st.integers(1, 9),
       slots=st.integers(1, 6), extra=st.integers(0, 5), residual=st.booleans(),
       norm=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_matches_the_literal_semantics(n, dim, k, slots, extra, residual, norm, seed):
    hidden, res, vectors, weights, token_slot = make_case(n, dim, k, slots, n_max=n + extra,
                                                          residual=residual, seed=seed)
    want_h, want_p, want_sum, want_count, want_last = literal_packed(
        hidden, res, vectors, weights, token_slot, norm)
    res_before = None if res is None else res.clone()
    proj = torch.full((n + extra, k), -7.0)
    running = RunningProjections(slots, k)
    steer_packed_(hidden, vectors, weights, token_slot, residual=res, norm_preserving=norm,
                  proj_out=proj, running=running, backend="reference")
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.double(), want_h, **tol)
    torch.testing.assert_close(proj[:n].double(), want_p, **tol)
    assert bool((proj[n:] == -7.0).all()), "entries past N must stay untouched"
    torch.testing.assert_close(running.sum.double(), want_sum, **tol)
    assert torch.equal(running.count, want_count)
    torch.testing.assert_close(running.last.double(), want_last, equal_nan=True, **tol)
    if res is not None:
        assert torch.equal(res, res_before), "residual is read, never written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_without_a_slot_are_bit_identical(backend):
    hidden, res, vectors, weights, _ = make_case(9, 33, 3, 2)
    token_slot = torch.full((9,), -1, dtype=torch.int32)
    token_slot[4] = 1
    want = literal_packed(hidden, res, vectors, weights, token_slot, False)[0]
    before = hidden.clone()
    steer_packed_(hidden, vectors, weights, token_slot, residual=res, backend=backend)
    keep = torch.arange(9) != 4
    assert torch.equal(hidden[keep], before[keep])
    torch.testing.assert_close(hidden[4].double(), want[4], rtol=1e-5, atol=1e-5)
    assert not torch.equal(hidden[4], before[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_stream_becomes_the_steered_stream(backend):
    hidden, res, vectors, weights, _ = make_case(5, 16, 2, 1)
    token_slot = torch.zeros(5, dtype=torch.int32)
    stream = hidden.double() + res.double()  # the definition, by hand, in float64
    steer_packed_(hidden, vectors, weights, token_slot, residual=res, backend=backend)
    torch.testing.assert_close(hidden.double() + res.double(),
                               stream + weights[0].double() @ vectors.double(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_batched_op_is_the_packed_op_with_one_slot_per_sequence(backend, dtype, masked):
    """``steer_`` on ``[B, T, D]`` and ``steer_packed_`` on its rows with slot ``b`` per row
    (-1 where masked out), each against the float64 packed definition (not against each
    other: the batched reference is built on the packed one)."""
    g = torch.Generator().manual_seed(1)
    batch, seq, dim, k = 3, 5, 24, 4
    hidden = (torch.randn(batch, seq, dim, generator=g) * 3).to(dtype)
    vectors = torch.randn(k, dim, generator=g)
    weights = torch.randn(batch, k, generator=g)
    mask = torch.rand(batch, seq, generator=g) > 0.4 if masked else None
    packed = hidden.reshape(batch * seq, dim).clone()
    token_slot = torch.arange(batch, dtype=torch.int32).repeat_interleave(seq)
    if mask is not None:
        token_slot = torch.where(mask.reshape(-1), token_slot, -1)
    want_h, want_p, want_sum, want_count, want_last = literal_packed(
        packed, None, vectors, weights, token_slot, True)
    run_a, run_b = RunningProjections(batch, k), RunningProjections(batch, k)
    proj_a, proj_b = torch.zeros(batch, seq, k), torch.zeros(batch * seq, k)
    emokern.steer_(hidden, vectors, weights, mask=mask, norm_preserving=True, proj_out=proj_a,
                   running=run_a, backend=backend)
    steer_packed_(packed, vectors, weights, token_slot, norm_preserving=True, proj_out=proj_b,
                  running=run_b, backend=backend)
    tol = TOL[dtype]
    for got_h, got_p, run in ((hidden.reshape(batch * seq, dim), proj_a.reshape(-1, k), run_a),
                              (packed, proj_b, run_b)):
        torch.testing.assert_close(got_h.double(), want_h, **tol)
        # Projections read the storage-dtype input and are computed in float32.
        torch.testing.assert_close(got_p.double(), want_p, rtol=1e-5, atol=1e-4)
        assert torch.equal(run.count, want_count)
        torch.testing.assert_close(run.sum.double(), want_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(run.last.double(), want_last, rtol=1e-5, atol=1e-4,
                                   equal_nan=True)
    # Unsteered rows bit-identical in both layouts.
    keep = token_slot < 0
    assert torch.equal(packed[keep], hidden.reshape(batch * seq, dim)[keep])


def test_strided_batched_hidden_is_written_in_place():
    """The batched reference on rows that a view cannot flatten works on a copy: the result
    must land in the caller's strided tensor."""
    base = torch.randn(5, 3, 16)
    hidden = base.transpose(0, 1)  # [3, 5, 16], rows not flattenable by a view
    vectors, weights = torch.randn(2, 16), torch.randn(3, 2)
    want = hidden.double() + (weights.double() @ vectors.double())[:, None, :]
    ref_steer_(hidden, vectors, weights)
    torch.testing.assert_close(base.transpose(0, 1).double(), want, rtol=1e-5, atol=1e-5)


BAD = [
    ("hidden", lambda a: a.update(hidden=torch.randn(2, 3, 8)), ValueError, "hidden must be"),
    ("hidden dtype", lambda a: a.update(hidden=torch.randn(4, 8).double()), TypeError,
     "hidden must be float32"),
    ("residual shape", lambda a: a.update(residual=torch.randn(3, 8)), ValueError, "residual"),
    ("residual dtype", lambda a: a.update(residual=torch.randn(4, 8).half()), TypeError,
     "residual"),
    ("vectors", lambda a: a.update(vectors=torch.randn(2, 7)), ValueError, "vectors must be"),
    ("weights", lambda a: a.update(slot_weights=torch.randn(3, 5)), ValueError, "slot_weights"),
    ("weights dtype", lambda a: a.update(slot_weights=torch.randn(3, 2).double()), TypeError,
     "slot_weights"),
    ("token_slot dtype", lambda a: a.update(token_slot=torch.zeros(4, dtype=torch.int64)),
     TypeError, "token_slot"),
    ("token_slot short", lambda a: a.update(token_slot=torch.zeros(3, dtype=torch.int32)),
     ValueError, "token_slot"),
    ("slot out of range", lambda a: a["token_slot"].fill_(3), ValueError, r"\[-1, 3\)"),
    ("slot below -1", lambda a: a["token_slot"].fill_(-2), ValueError, r"\[-1, 3\)"),
    ("nan weight", lambda a: a["slot_weights"].fill_(float("nan")), ValueError, "finite"),
    ("zero vector", lambda a: a["vectors"][1].zero_(), ValueError, r"vectors\[1\]"),
    ("proj_out", lambda a: a.update(proj_out=torch.zeros(4, 3)), ValueError, "proj_out"),
    ("running", lambda a: a.update(running=RunningProjections(2, 2)), ValueError, "running.sum"),
    ("running type", lambda a: a.update(running=(1, 2)), TypeError, "RunningProjections"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,spoil,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_error_and_nothing_is_modified(name, spoil, exc, match, backend):
    args = dict(hidden=torch.randn(4, 8), residual=torch.randn(4, 8), vectors=torch.randn(2, 8),
                slot_weights=torch.randn(3, 2), token_slot=torch.zeros(6, dtype=torch.int32),
                proj_out=torch.zeros(6, 2), running=RunningProjections(3, 2), backend=backend)
    spoil(args)
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    if isinstance(args["running"], RunningProjections):
        tensors.update(zip(("sum", "count", "last"), args["running"].tensors(), strict=True))
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(exc, match=match):
        steer_packed_(args.pop("hidden"), args.pop("vectors"), args.pop("slot_weights"),
                      args.pop("token_slot"), **args)
    for key, value in before.items():  # NaN entries (running.last) compare equal to NaN
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{key} was modified")


def test_opcheck_and_compile_fullgraph():
    hidden, res, vectors, weights, token_slot = make_case(6, 16, 3, 2, n_max=8)
    running = RunningProjections(2, 3)
    proj = torch.zeros(8, 3)
    torch.library.opcheck(torch.ops.emokern.steer_packed_.default,
                          (hidden.clone(), res, vectors, weights, token_slot, False, proj.clone(),
                           *RunningProjections(2, 3).tensors()))

    def step(h, r):
        torch.ops.emokern.steer_packed_(h, r, vectors, weights, token_slot, False, proj,
                                        *running.tensors())
        return h

    want = literal_packed(hidden, res, vectors, weights, token_slot, False)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(hidden.clone(), res)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


def test_public_api_exports():
    assert emokern.ops.steer_packed_ is steer_packed_


BACKENDS_HERE = ["reference", "cpu"] + (["triton"] if importlib.util.find_spec("triton") else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_backend_matches_the_reference(backend, monkeypatch):
    from emokern.ops import build

    if backend == "cpu" and not build.load_cpu():
        pytest.fail("the CPU kernel did not build")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, res, vectors, weights, token_slot = make_case(11, 40, 3, 4, n_max=14)
    want = hidden.clone()
    want_run, got_run = RunningProjections(4, 3), RunningProjections(4, 3)
    want_proj, got_proj = torch.zeros(14, 3), torch.zeros(14, 3)
    if backend == "reference":  # against the definition, not against itself
        lit_h, lit_p, lit_sum, lit_count, lit_last = literal_packed(hidden, res, vectors, weights,
                                                                    token_slot, True)
        want.copy_(lit_h)
        want_proj[:11] = lit_p
        want_run.sum.copy_(lit_sum)
        want_run.count.copy_(lit_count)
        want_run.last.copy_(lit_last)
    else:
        ref_steer_packed_(want, res, vectors, weights, token_slot, True, want_proj,
                          *want_run.tensors())
    steer_packed_(hidden, vectors, weights, token_slot, residual=res, norm_preserving=True,
                  proj_out=got_proj, running=got_run, backend=backend)
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_proj, want_proj, rtol=1e-5, atol=1e-4)
    assert torch.equal(got_run.count, want_run.count)
    torch.testing.assert_close(got_run.sum, want_run.sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_run.last, want_run.last, rtol=1e-5, atol=1e-4,
                               equal_nan=True)


def test_a_backend_for_another_device_is_refused():
    hidden, _, vectors, weights, token_slot = make_case(3, 8, 2, 1)
    before = hidden.clone()
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on cpu"):
        steer_packed_(hidden, vectors, weights, token_slot, backend="cuda")
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_every_backend_refuses(backend):
    vectors, weights = torch.randn(2, 8), torch.randn(1, 2)
    one_strided = torch.randn(8, 2)[:, :1].T  # N = 1, last-dimension stride 2
    with pytest.raises(ValueError, match="contiguous last dimension"):
        steer_packed_(one_strided, vectors, weights, torch.zeros(1, dtype=torch.int32),
                      backend=backend)
    running = RunningProjections(1, 2)
    running.sum = torch.zeros(1, 4)[:, ::2]
    with pytest.raises(ValueError, match="running.sum must be contiguous"):
        steer_packed_(torch.randn(2, 8), vectors, weights, torch.zeros(2, dtype=torch.int32),
                      running=running, backend=backend)


def test_schema_is_derived_from_the_reference_signature():
    from emokern.ops import steer_packed

    want = ("(Tensor(a!) hidden, Tensor? residual, Tensor vectors, Tensor slot_weights, "
            "Tensor token_slot, bool norm_preserving, Tensor(b!)? proj_out=None, "
            "Tensor(c!)? run_sum=None, Tensor(d!)? run_count=None, Tensor(e!)? run_last=None, "
            "Tensor? bounds=None, Tensor? gram=None) -> ()")
    assert steer_packed.SCHEMA == want
    assert str(torch.ops.emokern.steer_packed_.default._schema) == f"emokern::steer_packed_{want}"
