"""The neuron-scaling op ``emokern::scale_neurons_``: the reference vs its definition, the C++
and Triton kernels vs the reference (property tests), empty sets, opcheck, torch.compile,
errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emokern.ops import build
from emokern.ops.dispatch import resolve_backend
from emokern.ops.reference import ref_scale_neurons_
from emokern.ops.scale_neurons import activation_rows, scale_neurons_

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPILED = [b for b in ("cpu",) if build.load_cpu()]


def literal_scale(act, idx, scale):
    """The definition row by row: a[r, j] = float32(a[r, j]) * scale for each listed j."""
    flat = act.reshape(-1, act.shape[-1])
    out = flat.clone()
    for r in range(flat.shape[0]):
        for j in idx.tolist():
            out[r, j] = (flat[r, j].float() * torch.tensor(scale, dtype=torch.float32)
                         ).to(act.dtype)
    return out.reshape(act.shape)


def make_act(shape, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # rows of a wider buffer: a [.., F] view with row stride F + 5
        base = torch.randn(*shape[:-1], shape[-1] + 5, generator=gen).to(dtype)
        return base[..., : shape[-1]]
    return torch.randn(*shape, generator=gen).to(dtype)


def random_idx(features, m, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(features, generator=gen)[:m].sort().values


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_definition(dtype):
    act = make_act((2, 3, 11), dtype, 0)
    idx = torch.tensor([0, 4, 10])
    want = literal_scale(act, idx, 0.37)
    ref_scale_neurons_(act, idx, 0.37)
    assert torch.equal(act, want)


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    features=st.integers(1, 70),
    frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.0, 1.0, -1.5, 0.25, 3.0]),
    strided=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_backend_matches_the_definition_bit_for_bit(backend, lead, features, frac, dtype, scale,
                                              strided, seed):
    shape = (*lead, features)
    act = make_act(shape, dtype, seed, strided=strided and len(lead) > 0)
    idx = random_idx(features, round(frac * features), seed)
    literal = literal_scale(act, idx, scale)  # the definition, for every backend
    before = act.clone()
    scale_neurons_(act, idx, scale, backend=backend)
    assert torch.equal(act, literal)  # one float32 multiply rounded once: exact everywhere
    untouched = torch.ones(features, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(act[..., untouched], before[..., untouched])


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_set_and_unit_scale_leave_every_bit(backend, dtype):
    act = make_act((4, 7, 33), dtype, 1)
    act[0, 0, 0] = float("nan")
    act[0, 0, 1] = float("inf")
    before = act.clone()
    scale_neurons_(act, torch.empty(0, dtype=torch.int64), 0.0, backend=backend)
    assert torch.equal(act.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before.view(torch.int16 if dtype != torch.float32 else torch.int32))
    scale_neurons_(act, torch.arange(33), 1.0, backend=backend)
    assert torch.equal(act[..., 2:], before[..., 2:]) and act[0, 0, 0].isnan()


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_zero_scale_zeroes_the_neurons(backend):
    act = torch.randn(5, 3, 40) + 3.0
    idx = torch.tensor([2, 17, 39])
    scale_neurons_(act, idx, 0.0, backend=backend)
    assert (act[..., idx] == 0).all()
    assert (act[..., [0, 1, 3]] != 0).all()


@pytest.mark.parametrize("backend", COMPILED)
def test_large_rows_parallel_matches_reference(backend):
    act = make_act((3, 700, 1536), torch.float32, 2)
    idx = random_idx(1536, 300, 3)
    want = act.clone()
    ref_scale_neurons_(want, idx, 0.0)
    scale_neurons_(act, idx, 0.0, backend=backend)
    assert torch.equal(act, want)


def test_triton_kernel_matches_reference_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from emokern.ops import triton_ablate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for shape, m, dtype, strided in [((1,), 1, torch.float32, False),
                                     ((3, 5, 37), 9, torch.bfloat16, False),
                                     ((2, 4, 20), 20, torch.float16, True),
                                     ((17, 300), 130, torch.float32, False)]:
        act = make_act(shape, dtype, m, strided=strided).to(device)
        idx = random_idx(shape[-1], m, m).to(device)
        want = act.clone()
        ref_scale_neurons_(want, idx, 0.5)
        scale_neurons_(act, idx, 0.5, backend="triton")
        assert torch.equal(act, want), (shape, m, dtype, strided)
    assert triton_ablate.launch_config(1) == (16, 16)
    assert triton_ablate.launch_config(1000) == (16, 128)
    empty = torch.randn(2, 3, device=device)
    before = empty.clone()
    triton_ablate.triton_scale_neurons_(empty, torch.empty(0, dtype=torch.int64,
                                                           device=device), 0.0)
    assert torch.equal(empty, before)


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    act = make_act((2, 3, 16), torch.float32, 4)
    torch.library.opcheck(torch.ops.emokern.scale_neurons_.default,
                          (act, torch.tensor([1, 5, 15]), 0.0))
    torch.library.opcheck(torch.ops.emokern.scale_neurons_.default,
                          (act, torch.empty(0, dtype=torch.int64), 0.5))


def test_reference_is_registered_as_the_composite_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("emokern::scale_neurons_",
                                                           "CompositeExplicitAutograd")


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
def test_torch_compile_fullgraph(backend):
    act = make_act((3, 5, 64), torch.float32, 5)
    idx = torch.tensor([0, 9, 63])

    def step(a):
        b = a * 2.0
        torch.ops.emokern.scale_neurons_(b, idx, 0.0)
        return b + 1.0

    compiled = torch.compile(step, fullgraph=True,
                             backend="eager" if backend == "reference" else "inductor")
    torch.testing.assert_close(compiled(act), step(act), rtol=0, atol=0)

    scale_neurons_(act.clone(), idx, 0.0, backend=backend)  # resolves the backend eagerly

    @torch.compile(fullgraph=True, backend="eager")
    def wrapped(a):
        scale_neurons_(a, idx, 0.0, backend=backend)
        return a

    assert torch.equal(wrapped(act.clone()), literal_scale(act, idx, 0.0))


# ---------------------------------------------------------------- errors: one clear message


BAD = [
    ("act", lambda a, i: ([[1.0]], i, 0.0), TypeError, "act must be a torch.Tensor"),
    ("act", lambda a, i: (a.long(), i, 0.0), TypeError, "act must be float32"),
    ("act", lambda a, i: (a.transpose(0, 2), i, 0.0), ValueError, "contiguous last"),
    ("act", lambda a, i: (a[:, ::2].transpose(0, 1), i, 0.0), ValueError, "collapse"),
    ("neuron_idx", lambda a, i: (a, [1, 2], 0.0), TypeError, "neuron_idx must be a torch"),
    ("neuron_idx", lambda a, i: (a, i.int(), 0.0), TypeError, "neuron_idx must be int64"),
    ("neuron_idx", lambda a, i: (a, i[None], 0.0), ValueError, "neuron_idx must be [M]"),
    ("neuron_idx", lambda a, i: (a, torch.tensor([1, 8]), 0.0), ValueError, "in [0, 8)"),
    ("neuron_idx", lambda a, i: (a, torch.tensor([-1, 2]), 0.0), ValueError, "in [0, 8)"),
    ("neuron_idx", lambda a, i: (a, torch.tensor([3, 1]), 0.0), ValueError, "increasing"),
    ("neuron_idx", lambda a, i: (a, torch.tensor([2, 2]), 0.0), ValueError, "increasing"),
    ("scale", lambda a, i: (a, i, "0"), TypeError, "scale must be a float"),
    ("scale", lambda a, i: (a, i, float("nan")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("name,corrupt,exc,message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_input_raises_one_clear_error_and_modifies_nothing(backend, name, corrupt, exc,
                                                               message):
    act = make_act((3, 4, 8), torch.float32, 6)
    before = act.clone()
    args = corrupt(act, torch.tensor([1, 5]))
    with pytest.raises(exc, match="emokern.scale_neurons_: .*" + message.replace("[", r"\[")
                       .replace("(", r"\(").replace(")", r"\)")):
        scale_neurons_(*args, backend=backend)
    assert torch.equal(act, before)


@pytest.mark.parametrize("backend", COMPILED)
def test_the_cpu_kernel_checks_indices_itself(backend):
    act = make_act((2, 8), torch.float32, 7)
    before = act.clone()
    with pytest.raises(ValueError, match=r"neuron_idx\[1\] = 9 is outside \[0, 8\)"):
        torch.ops.emokern.scale_neurons_(act, torch.tensor([1, 9]), 0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.emokern.scale_neurons_(act, torch.tensor([4, 4]), 0.0)
    assert torch.equal(act, before)


def resolve_scale_neurons_backend(backend, device):
    return resolve_backend(backend, device, "scale_neurons_")


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="no compiled CUDA kernel"):
        resolve_scale_neurons_backend("cuda", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("EMOKERN_BACKEND", raising=False)
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        resolve_scale_neurons_backend("triton", cpu)
    assert resolve_scale_neurons_backend("reference", cpu) == "reference"
    assert resolve_scale_neurons_backend(None, cpu) == ("cpu" if COMPILED else "reference")


def test_activation_rows():
    assert activation_rows(torch.zeros(3, 4, 5)) == (12, 5)
    assert activation_rows(torch.zeros(5)) == (1, 5)
    assert activation_rows(torch.zeros(3, 1, 9)[:, :, :4]) == (3, 9)
    assert activation_rows(torch.zeros(0, 4)) == (0, 4)


def test_schema_is_derived_from_the_reference_signature():
    from emokern.ops import scale_neurons

    want = "(Tensor(a!) act, Tensor neuron_idx, float scale) -> ()"
    assert scale_neurons.SCHEMA == want
    assert str(torch.ops.emokern.scale_neurons_.default._schema) == f"emokern::scale_neurons_{want}"
