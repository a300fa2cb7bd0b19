"""Projection levels and bounds of the steering ops: the reference against a float64
transcription of docs/design.md §2 (explicit active set, ``numpy.linalg.solve`` per row), the
defining property (re-reading a leveled row gives its level), dependent directions, norm
preservation, the argument checks, and the dispatcher entry (opcheck, ``torch.compile``).
Kernel-specific cases: ``test_cpu_kernel.py``, ``test_triton.py``, ``test_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emokern.ops import (
    level_coefficients,
    ref_steer_packed_,
    steer_,
    steer_packed_,
    unit_gram,
)
from emokern.ops.reference import LEVEL_PIVOT_EPS

INF = float("inf")


def literal_levels(hidden, residual, vectors, slot_weights, token_slot, norm_preserving,
                   bounds):
    """The packed op with bounds, one token at a time in float64: the active set from the
    clipped targets, then ``G_AA a = t_A - p'_A`` by ``numpy.linalg.solve`` (directions
    assumed independent). Returns the new hidden [N, D] float64."""
    h = hidden.double().numpy().copy()
    r = np.zeros_like(h) if residual is None else residual.double().numpy()
    v = vectors.double().numpy()
    norms = np.linalg.norm(v, axis=1)
    u = v / norms[:, None]
    gram = u @ u.T
    for i in range(h.shape[0]):
        s = int(token_slot[i])
        if s < 0:
            continue
        x = h[i] + r[i]
        w = slot_weights[s].double().numpy()
        y = x + w @ v
        if norm_preserving:
            y = y * np.linalg.norm(x) / max(np.linalg.norm(y), 1e-6)
        p_after = u @ y
        lo, hi = bounds[s, 0].double().numpy(), bounds[s, 1].double().numpy()
        target = np.clip(p_after, lo, hi)
        active = np.nonzero(target != p_after)[0]
        if active.size:
            a = np.linalg.solve(gram[np.ix_(active, active)], (target - p_after)[active])
            y = y + a @ u[active]
        h[i] = y - r[i]
    return torch.from_numpy(h)


def random_bounds(gen, slots, k, levels_only=False):
    """Per slot and emotion: open, a level, an upper cap, a lower floor or both sides."""
    bounds = torch.empty(slots, 2, k)
    bounds[:, 0], bounds[:, 1] = -INF, INF
    kind = torch.randint(0, 5, (slots, k), generator=gen)
    if levels_only:
        kind = torch.ones_like(kind)
    value = torch.randn(slots, k, generator=gen) * 3
    width = torch.rand(slots, k, generator=gen) * 2
    bounds[:, 0] = torch.where((kind == 1) | (kind == 3) | (kind == 4), value, bounds[:, 0])
    bounds[:, 1] = torch.where(kind == 1, value, bounds[:, 1])
    bounds[:, 1] = torch.where(kind == 2, value, bounds[:, 1])
    bounds[:, 1] = torch.where(kind == 4, value + width, bounds[:, 1])
    return bounds


def case(n, dim, k, slots, seed, *, residual=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    res = torch.randn(n, dim, generator=gen).to(dtype) if residual else None
    vectors = torch.randn(k, dim, generator=gen)
    weights = torch.randn(slots, k, generator=gen) * 0.5
    token_slot = torch.randint(-1, slots, (n,), generator=gen, dtype=torch.int32)
    return hidden, res, vectors, weights, token_slot, random_bounds(gen, slots, k)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), dim=st.integers(8, 70), k=st.integers(1, 6),
       slots=st.integers(1, 4), seed=st.integers(0, 10_000), norm_preserving=st.booleans(),
       residual=st.booleans())
def test_reference_matches_the_float64_transcription(n, dim, k, slots, seed, norm_preserving,
                                                     residual):
    hidden, res, vectors, weights, token_slot, bounds = case(n, dim, k, slots, seed,
                                                             residual=residual)
    k = min(k, dim)  # independent directions: at most D of them
    vectors, weights, bounds = vectors[:k], weights[:, :k], bounds[..., :k].contiguous()
    got = hidden.clone()
    ref_steer_packed_(got, res, vectors, weights, token_slot, norm_preserving, None, None, None,
                      None, bounds, unit_gram(vectors))
    want = literal_levels(hidden, res, vectors, weights, token_slot, norm_preserving, bounds)
    # The solve amplifies rounding by the conditioning of G_AA: scale the tolerance by it.
    cond = float(torch.linalg.cond(unit_gram(vectors).double()))
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * cond * float(scale.max()))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_a_leveled_row_reads_its_level(backend, dtype, norm_preserving):
    """After the op, the projection of every steered row on each leveled direction is its
    level, within the storage dtype's rounding of the row."""
    n, dim, k, slots = 24, 96, 4, 3
    hidden, _, vectors, weights, token_slot, _ = case(n, dim, k, slots, 7, residual=False,
                                                      dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    bounds = random_bounds(gen, slots, k, levels_only=True)
    got = hidden.clone()
    steer_packed_(got, vectors, weights, token_slot, norm_preserving=norm_preserving,
                  bounds=bounds, backend=backend)
    u = vectors / vectors.norm(dim=1, keepdim=True)
    reread = got.float() @ u.T
    steered = token_slot >= 0
    want = bounds[token_slot[steered].long(), 0]
    # A row rounded to the storage dtype moves each projection by at most ~eps·||y||.
    tol = 4 * torch.finfo(dtype).eps * got[steered].float().norm(dim=1, keepdim=True)
    assert ((reread[steered] - want).abs() <= tol + 1e-5).all()
    assert torch.equal(got[~steered], hidden[~steered])  # slot -1: untouched


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rows_inside_their_bounds_are_written_as_without_bounds(backend):
    hidden, _, vectors, weights, token_slot, _ = case(16, 64, 3, 2, 11, residual=False)
    bounds = torch.empty(2, 2, 3)
    bounds[:, 0], bounds[:, 1] = -1e30, 1e30  # finite but never reached
    plain, bounded = hidden.clone(), hidden.clone()
    steer_packed_(plain, vectors, weights, token_slot, backend=backend)
    steer_packed_(bounded, vectors, weights, token_slot, bounds=bounds, backend=backend)
    assert torch.equal(plain, bounded)


def test_a_cap_moves_only_the_rows_above_it():
    hidden, _, vectors, _, _, _ = case(32, 48, 2, 1, 5, residual=False)
    weights = torch.zeros(1, 2)
    token_slot = torch.zeros(32, dtype=torch.int32)
    u = vectors / vectors.norm(dim=1, keepdim=True)
    before = hidden @ u.T
    cap = float(before[:, 0].median())
    bounds = torch.tensor([[[-INF, -INF], [cap, INF]]])
    got = hidden.clone()
    steer_packed_(got, vectors, weights, token_slot, bounds=bounds, backend="reference")
    above = before[:, 0] > cap
    assert torch.equal(got[~above], hidden[~above])
    after = got @ u.T
    torch.testing.assert_close(after[above, 0], torch.full((int(above.sum()),), cap),
                               rtol=0, atol=1e-4)


def test_dependent_directions_are_dropped_and_the_rest_still_hit():
    """A third direction in the span of the first two: its coefficient is dropped, the first
    two levels are met exactly, and the third lands where they move it."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 32, generator=gen)
    v[2] = 0.6 * v[0] + 0.8 * v[1]
    gram = unit_gram(v)
    p = torch.randn(5, 3, generator=gen)
    lo = torch.tensor([[1.0, -2.0, 0.5]]).expand(5, 3)
    a = level_coefficients(gram, p, lo, lo)
    assert (a[:, 2] == 0).all()
    moved = p + a @ gram  # p'_k + Σ_j a_j <u_j, u_k>
    torch.testing.assert_close(moved[:, :2], lo[:, :2], rtol=0, atol=1e-5)
    assert LEVEL_PIVOT_EPS == pytest.approx(1e-4)


def test_levels_after_norm_preservation_are_exact():
    hidden, _, vectors, weights, token_slot, _ = case(8, 40, 2, 1, 9, residual=False)
    token_slot = torch.zeros(8, dtype=torch.int32)
    bounds = torch.tensor([[[0.5, -INF], [0.5, INF]]])
    got = hidden.clone()
    steer_packed_(got, vectors, weights, token_slot, norm_preserving=True, bounds=bounds,
                  backend="reference")
    u = vectors / vectors.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got @ u[0], torch.full((8,), 0.5), rtol=0, atol=1e-5)


def test_batched_op_takes_bounds_per_sequence():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 32, generator=gen)
    vectors, weights = torch.randn(2, 32, generator=gen), torch.randn(3, 2, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    bounds = random_bounds(gen, 3, 2)
    got, want = hidden.clone(), hidden.clone()
    steer_(got, vectors, weights, mask=mask, bounds=bounds, backend="reference")
    slots = torch.where(mask, torch.arange(3)[:, None], -1).to(torch.int32).reshape(-1)
    flat = want.view(15, 32)
    ref_steer_packed_(flat, None, vectors, weights, slots, False, None, None, None, None, bounds,
                      unit_gram(vectors))
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad, message", [
    (lambda b: b.fill_(float("nan")), "must not be NaN"),
    (lambda b: b[:, 0].fill_(2.0) if b[:, 1].fill_(1.0) is not None else None, "is above upper"),
])
def test_bad_bounds_raise_before_writing(backend, bad, message):
    hidden, _, vectors, weights, token_slot, bounds = case(6, 16, 2, 2, 3, residual=False)
    bad(bounds)
    got = hidden.clone()
    with pytest.raises(ValueError, match=message):
        steer_packed_(got, vectors, weights, token_slot, bounds=bounds, backend=backend)
    assert torch.equal(got, hidden)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bounds_shape_and_gram_are_checked(backend):
    hidden, _, vectors, weights, token_slot, bounds = case(6, 16, 2, 2, 3, residual=False)
    with pytest.raises(ValueError, match="bounds must have shape"):
        steer_packed_(hidden, vectors, weights, token_slot, bounds=bounds[:1].contiguous(),
                      backend=backend)
    with pytest.raises(ValueError, match="bounds and gram go together"):
        steer_packed_(hidden, vectors, weights, token_slot, gram=unit_gram(vectors),
                      backend=backend)
    with pytest.raises(TypeError, match="bounds must be torch.float32"):
        steer_packed_(hidden, vectors, weights, token_slot, bounds=bounds.double(),
                      backend=backend)


def test_opcheck_and_compile_fullgraph_with_bounds():
    hidden, res, vectors, weights, token_slot, bounds = case(8, 32, 3, 2, 4)
    gram = unit_gram(vectors)
    args = (hidden.clone(), res, vectors, weights, token_slot, False, torch.zeros(8, 3), None,
            None, None, bounds, gram)
    torch.library.opcheck(torch.ops.emokern.steer_packed_.default, args)

    def step(h):
        torch.ops.emokern.steer_packed_.default(h, res, vectors, weights, token_slot, False,
                                                None, None, None, None, bounds, gram)
        return h

    want = step(hidden.clone())
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden.clone())
    assert torch.equal(got, want)
