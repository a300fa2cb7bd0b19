"""The fused ops, one module each (:mod:`~emokern.ops.steer`, :mod:`~emokern.ops.steer_packed`,
:mod:`~emokern.ops.scale_neurons`: schema, fake, checks, wrapper), their references
(:mod:`~emokern.ops.reference`), the backend choice (:mod:`~emokern.ops.dispatch`), the
compiled kernels' loader (:mod:`~emokern.ops.build`) and the Triton kernels.

Importing this package defines every op's schema (the op modules), before any kernel loads.
"""

from emokern.ops.dispatch import available_backends, resolve_backend, runner_for
from emokern.ops.reference import (
    level_coefficients,
    ref_scale_neurons_,
    ref_steer_,
    ref_steer_packed_,
    unit_gram,
)
from emokern.ops.running import RunningProjections
from emokern.ops.scale_neurons import scale_neurons_
from emokern.ops.steer import steer_
from emokern.ops.steer_packed import steer_packed_

__all__ = ["RunningProjections", "available_backends", "level_coefficients",
           "ref_scale_neurons_", "ref_steer_", "ref_steer_packed_", "resolve_backend",
           "runner_for", "scale_neurons_", "steer_", "steer_packed_", "unit_gram"]
