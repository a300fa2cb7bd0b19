"""Emotion vectors in and out of other tools.

* :mod:`emokern.interop.llamacpp`: llama.cpp control vectors (GGUF, ``--control-vector``):
  :func:`~emokern.interop.llamacpp.write_control_vector` folds a bank and a mix into one file,
  :func:`~emokern.interop.llamacpp.read_control_vector` and
  :func:`~emokern.interop.llamacpp.bank_from_control_vectors` read such files back.
* :mod:`emokern.interop.vector_libraries`: repeng ``ControlVector`` and steering-vectors
  ``SteeringVector`` objects as per-layer directions and banks.

This package sits beside :mod:`emokern.steering`: it imports the bank and models layer and
nothing above it. Tested in ``tests/interop/``.
"""

from emokern.interop.llamacpp import (
    bank_from_control_vectors,
    bank_from_directions,
    mix_directions,
    read_control_vector,
    write_control_vector,
)
from emokern.interop.vector_libraries import from_repeng, from_steering_vector

__all__ = [
    "bank_from_control_vectors",
    "bank_from_directions",
    "from_repeng",
    "from_steering_vector",
    "mix_directions",
    "read_control_vector",
    "write_control_vector",
]
