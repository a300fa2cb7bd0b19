r"""emokern's statistics, one module for the evaluation and the analyses (SciPy where it has
the function, NumPy/PyTorch where a vectorised form is much faster).

* :func:`pearson`, :func:`spearman`, :func:`ranks` and :func:`bootstrap_ci` of a correlation;
* :func:`rsa_permutation`: Spearman RSA between two distance matrices with a Mantel
  permutation p-value (labels permuted together in rows and columns);
* :func:`kendall_tau_b_many`: Kendall's :math:`\tau_b` of many variables against a few at
  once, through sign matrices (:math:`\tau_b = \sum s_x s_y / \sqrt{n_x n_y}` over all pairs of
  observations, :math:`n_x` the untied pairs of :math:`x`), with SciPy's asymptotic p-value;
* :func:`fdr_bh`: Benjamini-Hochberg q-values;
* :func:`ridge_cv_predict`: ridge regression with K-fold cross-validated predictions, the
  penalty chosen inside each training fold by generalised cross-validation.

**The NaN rule of the correlations** (:func:`pearson`, :func:`spearman`): a pair
:math:`(x_i, y_i)` with a non-finite value on either side is dropped; the result is NaN when
fewer than 3 pairs remain or either side is constant over them (no correlation is defined),
never a warning. Sequences of different lengths are a ``ValueError``.

Tested in ``tests/test_stats.py`` (against SciPy's reference functions and planted signals).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as scipy_stats

from emokern.errors import failing

__all__ = ["bootstrap_ci", "condensed", "fdr_bh", "kendall_tau_b_many", "pearson", "ranks",
           "ridge_cv_predict", "rsa_permutation", "spearman"]

fail = failing("emokern.stats")


def _finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float64 arrays without the pairs that hold a non-finite value."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        fail(ValueError, f"x and y must have the same length, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def _defined(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a correlation of the finite pairs ``a, b`` is defined: at least 3 pairs, neither
    side constant."""
    return a.size >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0


def pearson(x, y) -> float:
    """Pearson's r of two equal-length 1-D sequences (:func:`scipy.stats.pearsonr`), under the
    module's NaN rule."""
    a, b = _finite_pairs(x, y)
    if not _defined(a, b):
        return float("nan")
    return float(scipy_stats.pearsonr(a, b).statistic)


def ranks(x) -> np.ndarray:
    """Average ranks of a 1-D sequence, 0-based (ties share their mean rank):
    :func:`scipy.stats.rankdata` minus 1."""
    return scipy_stats.rankdata(np.asarray(x, dtype=np.float64), method="average") - 1.0


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks of the finite pairs, under the module's
    NaN rule (the ranks are taken after the non-finite pairs are dropped)."""
    a, b = _finite_pairs(x, y)
    if not _defined(a, b):
        return float("nan")
    return pearson(ranks(a), ranks(b))


def bootstrap_ci(x, y, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 stat=pearson) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(x, y)`` over resampled pairs."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(x)
    values = np.empty(n_boot)
    if stat is pearson:  # vectorised: all resamples at once
        idx = rng.integers(0, n, size=(n_boot, n))
        xs, ys = x[idx], y[idx]
        xs = xs - xs.mean(axis=1, keepdims=True)
        ys = ys - ys.mean(axis=1, keepdims=True)
        values = (xs * ys).sum(1) / np.sqrt((xs * xs).sum(1) * (ys * ys).sum(1))
    else:
        for b in range(n_boot):
            idx = rng.integers(0, n, size=n)
            values[b] = stat(x[idx], y[idx])
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def condensed(dist: np.ndarray) -> np.ndarray:
    """The upper triangle (``i < j``) of a square matrix, row-major: ``[C (C - 1) / 2]``."""
    i, j = np.triu_indices(dist.shape[0], k=1)
    return dist[i, j]


def rsa_permutation(model_dist: np.ndarray, human_dist: np.ndarray, *, n_perm: int = 10000,
                    seed: int = 0) -> tuple[float, float]:
    r"""Spearman RSA between two ``[C, C]`` distance matrices and its Mantel p-value.

    :math:`\rho` = Spearman correlation of the upper triangles; the null permutes the category
    labels of ``human_dist`` (rows and columns together); one-sided p-value
    :math:`(1 + \#\{\rho_\pi \ge \rho\}) / (1 + n_\mathrm{perm})`.
    """
    a = ranks(condensed(model_dist))
    h = ranks(condensed(human_dist))
    rho = pearson(a, h)
    rng = np.random.default_rng(seed)
    size = human_dist.shape[0]
    i, j = np.triu_indices(size, k=1)
    # Permuting labels permutes the pairs, so the permuted ranks are the ranks' permutation:
    # rank once, then index a [C, C] matrix of ranks.
    rank_matrix = np.zeros((size, size))
    rank_matrix[i, j] = h
    rank_matrix[j, i] = h
    perms = np.stack([rng.permutation(size) for _ in range(n_perm)])  # [P, C]
    r = rank_matrix[perms[:, i], perms[:, j]]  # [P, pairs]
    a0 = a - a.mean()
    r0 = r - r.mean(axis=1, keepdims=True)
    null = (r0 @ a0) / np.sqrt((r0 * r0).sum(1) * (a0 @ a0))
    p = (1 + int((null >= rho - 1e-12).sum())) / (1 + n_perm)
    return float(rho), float(p)


def _tie_terms(values: np.ndarray) -> tuple[float, float, float]:
    """SciPy's tie sums of one variable: (sum t(t-1)/2, sum t(t-1)(t-2), sum t(t-1)(2t+5))."""
    _, counts = np.unique(values, return_counts=True)
    t = counts[counts > 1].astype(np.float64)
    return float((t * (t - 1) / 2).sum()), float((t * (t - 1) * (t - 2)).sum()), \
        float((t * (t - 1) * (2 * t + 5)).sum())


def kendall_tau_b_many(x: np.ndarray, y: np.ndarray, *, chunk: int = 512,
                       alternative: str = "greater") -> tuple[np.ndarray, np.ndarray]:
    r"""Kendall's :math:`\tau_b` of every row of ``x [V, n]`` against every row of ``y [A, n]``.

    With :math:`s^x_{ij} = \operatorname{sign}(x_i - x_j)` over the :math:`n(n-1)/2` pairs of
    observations, :math:`S = \sum_{i<j} s^x_{ij} s^y_{ij}` (concordant minus discordant) and
    :math:`\tau_b = S / \sqrt{(n_0 - n_x)(n_0 - n_y)}` (:math:`n_x` tied pairs). The p-value is
    SciPy's asymptotic one, :math:`z = S / \sqrt{\mathrm{var}(S)}` with the tie-corrected
    variance; ``alternative="greater"`` tests :math:`\tau > 0`, ``"two-sided"`` both ways.
    Chunks of ``chunk`` rows of ``x`` keep memory at ``chunk · n(n-1)/2`` floats.

    Returns
    -------
    tau, p : ndarray [V, A]
        NaN tau and p = 1 for a constant row.
    """
    if alternative not in ("greater", "two-sided"):
        raise ValueError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[1]
    if y.shape[1] != n:
        raise ValueError(f"x and y must have the same number of observations, got {n} and "
                         f"{y.shape[1]}")
    i, j = np.triu_indices(n, k=1)
    total = n * (n - 1) / 2
    m = n * (n - 1)
    sy = torch.from_numpy(np.sign(y[:, i] - y[:, j])).float()  # [A, P]
    yt = np.array([_tie_terms(row) for row in y]).reshape(-1, 3)  # [A, 3]
    tau = np.full((x.shape[0], y.shape[0]), np.nan)
    pval = np.ones((x.shape[0], y.shape[0]))
    ii, jj = torch.from_numpy(i), torch.from_numpy(j)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        block = torch.from_numpy(rows).float()
        sx = torch.sign(block[:, ii] - block[:, jj])  # [c, P]
        s = (sx @ sy.T).double().numpy()  # [c, A]: integers, exact in float32 below 2**24
        untied_x = sx.abs().sum(1).double().numpy()  # pairs of x without a tie
        xt = np.zeros((len(rows), 3))
        for r in np.flatnonzero((np.diff(np.sort(rows, axis=1), axis=1) == 0).any(axis=1)):
            xt[r] = _tie_terms(rows[r])
        denom = np.sqrt(untied_x[:, None] * (total - yt[None, :, 0]))
        var = ((m * (2 * n + 5) - xt[:, None, 2] - yt[None, :, 2]) / 18
               + 2 * xt[:, None, 0] * yt[None, :, 0] / m
               + xt[:, None, 1] * yt[None, :, 1] / (9 * m * (n - 2)))
        ok = denom > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            tau[start:start + len(rows)] = np.where(ok, s / denom, np.nan)
            z = torch.from_numpy(np.where(ok & (var > 0), s / np.sqrt(var), 0.0))
        p = 0.5 * torch.special.erfc(z / math.sqrt(2)) if alternative == "greater" else \
            torch.special.erfc(z.abs() / math.sqrt(2))
        pval[start:start + len(rows)] = np.where(ok, p.numpy(), 1.0)
    return tau, pval


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of the p-values ``p`` (any shape, one family)."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    n = flat.size
    order = np.argsort(flat)
    scaled = flat[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = q
    return out.reshape(p.shape)


def _ridge_fit_gcv(x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor):
    """Standardise ``x``, choose the penalty by generalised cross-validation, return
    ``(mean, scale, coef, intercept, alpha)``. In torch float64: NumPy's OpenBLAS spins threads
    that a busy machine does not have (small products run 20x slower), torch follows
    ``torch.set_num_threads``."""
    mean = x.mean(0)
    scale = x.std(0, correction=0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    z = (x - mean) / scale
    y0 = y.mean()
    u, s, vt = torch.linalg.svd(z, full_matrices=False)
    uty = u.T @ (y - y0)
    n = len(y)
    shrink = s * s / (s * s + alphas[:, None])  # [A, K]
    resid = (y - y0)[None] - (shrink * uty) @ u.T  # [A, N]
    dof = shrink.sum(1)
    gcv = (resid * resid).sum(1) / (n - dof).clamp_min(1e-9) ** 2
    best = int(torch.argmin(gcv))
    coef = vt.T @ (s / (s * s + alphas[best]) * uty)
    return mean, scale, coef, y0, float(alphas[best])


def ridge_cv_predict(x: np.ndarray, y: np.ndarray, *, folds: int = 10, seed: int = 0,
                     alphas=None) -> tuple[np.ndarray, list[float]]:
    r"""Cross-validated ridge predictions of ``y [N]`` from ``x [N, K]``.

    The rows are shuffled (seeded) into ``folds`` folds; each fold is predicted by a ridge
    fitted on the others (features standardised on the training fold, penalty
    :math:`\alpha` chosen from ``alphas`` by generalised cross-validation on the training fold:
    no test row informs its own prediction).

    Returns
    -------
    predictions : ndarray [N]
    chosen alphas : list of float, one per fold
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    y = torch.as_tensor(np.asarray(y, dtype=np.float64))
    alphas = torch.as_tensor(np.logspace(-3, 5, 17) if alphas is None
                             else np.asarray(alphas, dtype=np.float64))
    n = len(y)
    if n < folds:
        raise ValueError(f"need at least {folds} rows for {folds}-fold CV, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    pred = torch.empty(n, dtype=torch.float64)
    chosen = []
    for f in range(folds):
        test = torch.as_tensor(order[f::folds])
        train = torch.as_tensor(np.setdiff1d(order, order[f::folds], assume_unique=True))
        mean, scale, coef, y0, alpha = _ridge_fit_gcv(x[train], y[train], alphas)
        pred[test] = ((x[test] - mean) / scale) @ coef + y0
        chosen.append(alpha)
    return pred.numpy(), chosen
