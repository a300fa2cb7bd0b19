"""Analyses of a model's emotion representations (after arXiv 2506.13978 and Li, Su et al.
2024), runnable on any loaded model with ``emokern analyze``:

* :mod:`~emokern.analysis.norms` — human word norms (Warriner; CVAW) read from PyPI packages;
* :mod:`~emokern.analysis.space` — PCA/RSA of the category vectors vs human valence/arousal;
* :mod:`~emokern.analysis.words` — cross-validated prediction of word ratings;
* :mod:`~emokern.analysis.neurons` — emotion-attribute MLP neurons (RSA per neuron);
* :mod:`~emokern.analysis.inference` — vignette emotion inference, intact and ablated;
* :mod:`~emokern.analysis.analysis_report`, :mod:`~emokern.analysis.analyze_command` — the
  written results, the command.

They use :mod:`emokern.stats` (the statistics) and :mod:`emokern.steering.ablate` (the neuron
ablation, ``emokern.ablate``). Nothing is imported here: import the modules themselves.
"""
