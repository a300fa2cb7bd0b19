"""The emotion names emokern knows by heart: the six basic emotions (Ekman's, with joy for
happiness), in the order the shipped banks, the scorers and the benchmarks use.

Covered by ``tests/test_data.py``.
"""

BASIC_EMOTIONS: tuple[str, ...] = ("joy", "sadness", "anger", "fear", "disgust", "surprise")

__all__ = ["BASIC_EMOTIONS"]
