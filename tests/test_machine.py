"""emokern.machine: the thread choice on a shared machine and the record kept with results."""

import json

import torch

from emokern.machine import auto_threads, busy_cpus, cpu_model, machine_info


def test_busy_cpus_is_a_non_negative_number():
    busy = busy_cpus(interval=0.01)
    assert isinstance(busy, float) and busy >= 0.0


def test_auto_threads_returns_the_thread_count():
    before = torch.get_num_threads()
    try:
        threads = auto_threads()
        assert isinstance(threads, int) and threads >= 1
        assert threads == torch.get_num_threads()
        # It only ever lowers the count, to one.
        assert threads in (1, before)
    finally:
        torch.set_num_threads(before)


def test_machine_info_keys():
    info = machine_info()
    for key in ("python", "torch", "emokern", "machine", "cpu_model", "cpu_count",
                "torch_threads", "cpu_kernel"):
        assert key in info, key
    assert info["torch_threads"] == torch.get_num_threads()
    assert isinstance(cpu_model(), str)
    json.dumps(info)  # stored with results as JSON
