"""Analyses of a model's emotion representations (after arXiv 2506.13978 and Li, Su et al.
2024), runnable on any loaded model with ``emokern analyze``:

* :mod:`~emokern.analysis.norms` — human word norms (Warriner; CVAW) read from PyPI packages;
* :mod:`~emokern.analysis.space` — PCA/RSA of the category vectors vs human valence/arousal;
* :mod:`~emokern.analysis.words` — cross-validated prediction of word ratings;
* :mod:`~emokern.analysis.neurons` — emotion-attribute MLP neurons (RSA per neuron);
* :mod:`~emokern.analysis.inference` — vignette emotion inference, intact and ablated;
* :mod:`~emokern.analysis.ablate` — :func:`ablate`, the neuron-ablation context manager
  (op ``emokern::scale_neurons_``);
* :mod:`~emokern.analysis.stats`, :mod:`~emokern.analysis.report`,
  :mod:`~emokern.analysis.run` — statistics, written results, the command.

Only the ablation API is imported here (it is re-exported as ``emokern.ablate``); import the
analysis modules themselves for the rest.
"""

from emokern.analysis.ablate import Ablator, ablate, mlp_down_projections

__all__ = ["Ablator", "ablate", "mlp_down_projections"]
