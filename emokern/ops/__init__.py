"""The fused ops: schema and wrappers (library), reference, compiled and Triton backends."""

from emokern.ops.library import (
    available_backends,
    resolve_backend,
    runner_for,
    scale_neurons_,
    steer_,
    steer_packed_,
)
from emokern.ops.reference import ref_scale_neurons_, ref_steer_, ref_steer_packed_
from emokern.ops.running import RunningProjections

__all__ = ["RunningProjections", "available_backends", "ref_scale_neurons_", "ref_steer_",
           "ref_steer_packed_", "resolve_backend", "runner_for", "scale_neurons_", "steer_",
           "steer_packed_"]
