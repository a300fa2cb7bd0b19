"""emokern.benchmarks.vllm_hook without vLLM: the hook's sums equal the packed op's reference
on a slot table, and installing it replaces a wrapped forward."""

from types import SimpleNamespace

import numpy as np
import torch

import emokern.ops  # noqa: F401  (registers torch.ops.emokern)
from emokern.benchmarks.vllm_hook import HookExtension, install_hook, torch_hook
from emokern.vllm.slots import SlotTable


def _table():
    t = SlotTable(n_layers=1, n_emotions=3, max_requests=2, max_tokens=8)
    t.add("a", torch.tensor([1.0, -0.5, 0.0]), read=True)
    t.add("b", None)
    t.fill(["a", "b"], np.array([3, 2]), np.array([0, 0]), np.array([2, 2]))
    return t


def test_hook_matches_the_packed_op():
    torch.manual_seed(0)
    vectors = torch.randn(3, 16)
    hidden, residual = torch.randn(5, 16), torch.randn(5, 16)
    hooked, op = _table(), _table()
    out_h, _ = torch_hook(vectors, hooked, 0, True)(None, (), (hidden.clone(), residual))
    expected = hidden.clone()
    torch.ops.emokern.steer_packed_.default(  # as the plugin's wrapped layer calls it
        expected, residual, vectors, op.slot_weights[0], op.token_slot, False, None,
        op.run_sum[0], op.run_count[0], op.run_last[0])
    torch.testing.assert_close(out_h, expected)
    torch.testing.assert_close(hooked.run_sum[0], op.run_sum[0])
    assert hooked.run_count[0].tolist() == op.run_count[0].tolist()


def test_install_replaces_the_op_wrapper():
    layer = torch.nn.Linear(4, 4)
    calls = []
    layer.forward = lambda *a, **k: calls.append("op")  # the plugin's instance wrapper

    def unwrap_layers():
        del layer.forward
        return [(layer, torch.randn(3, 4))]

    steering = SimpleNamespace(unwrap_layers=unwrap_layers, table=_table(),
                               config=SimpleNamespace(monitor=False))
    assert install_hook(steering) == 1
    assert "forward" not in vars(layer) and len(layer._forward_hooks) == 1
    worker = HookExtension()
    try:
        worker.emokern_use_hook()
    except RuntimeError as exc:
        assert "does not enable emokern" in str(exc)
    else:
        raise AssertionError("a worker without steering must refuse")
