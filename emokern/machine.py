"""The machine a job runs on: how many torch threads to use, and what to record with results.

Measured results (benchmarks, evaluations, extraction timings) always carry
:func:`machine_info`, since the same code gives different numbers on an AVX-512 Xeon and an
AVX2 EPYC, with 1 or 2 threads, on a quiet or a busy machine.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch
import transformers

from emokern.ops import build
from emokern.version import __version__

__all__ = ["auto_threads", "busy_cpus", "cpu_model", "machine_info"]


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs in use by other processes right now, from two reads of ``/proc/stat`` (the load
    average lags by a minute and counts our own past work); the load average elsewhere."""
    def read():
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    elapsed = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / elapsed)


def auto_threads() -> int:
    """Use one torch thread when other processes keep a CPU busy, else leave torch's default.

    On a shared machine, torch's OpenMP threads wait for each other at every parallel region;
    when another process holds a core, each wait costs a scheduler slice. Measured on the
    2-core dev machine with two other busy processes: greedy generation of 32 x 24 tokens on
    the default model took 38.6 s with 2 threads and 7.9 s with 1. Returns the thread count.
    """
    if busy_cpus() >= 0.5:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. "Intel(R) Xeon(R) Processor"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """Versions, CPU model, threads, the compiled kernels and the load at the time of a run.

    Reports the kernels without compiling anything (see :func:`emokern.ops.build.build_info`).
    """
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "emokern": __version__, "machine": platform.machine(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_kernel": build.build_info()["cpu"], "transformers": transformers.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info
