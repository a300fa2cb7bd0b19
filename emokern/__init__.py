"""emokern: fused emotion steering and monitoring for transformer language models."""

__version__ = "0.1.0"

from emokern.ops import RunningProjections, available_backends, steer_

__all__ = ["RunningProjections", "__version__", "available_backends", "steer_"]
