"""Low-dimensional views of emotion latents: PCA, its explained-variance curve, and t-SNE.

* :func:`pca` projects ``x (N, d)`` on its leading principal axes (centred SVD).
* :func:`explained_variance` and :func:`components_to_reach` give the curve of EMOPortraits' latent
  analysis (Drobyshev et al. 2024, Fig. 3): the share of variance each principal component
  explains, and how many components it takes to reach a given share — a latent space whose
  variance spreads over more components has more room for expressions.
* :func:`tsne` is scikit-learn's t-SNE, as DICE-Talk's Fig. 4(c) projects its emotion priors.

Every function takes rows of any width; token sets ``(N, Ne, D)`` are flattened to ``(N, Ne·D)``
(:func:`flatten`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

EXACT_TSNE_ROWS = 1000


def flatten(x: np.ndarray) -> np.ndarray:
    """``(N, ...)`` → ``(N, prod(...))`` float64."""
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class PCA:
    """A fitted PCA: ``mean (d,)``, unit ``components (k, d)`` (rows, by decreasing variance),
    per-component ``variance (k,)`` and ``explained (k,)`` = variance / total variance."""

    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray
    explained: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``x (N, d)`` (or ``(N, ...)``) → coordinates ``(N, k)``."""
        return (flatten(x) - self.mean) @ self.components.T

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Coordinates ``(N, k)`` → points ``(N, d)`` in the span of the components."""
        return np.asarray(y, np.float64) @ self.components + self.mean


def fit_pca(x: np.ndarray, k: int | None = None) -> PCA:
    """The first ``k`` (default: all, ``min(N, d)``) principal components of ``x (N, ...)``
    (scikit-learn's exact-SVD PCA; ``explained`` is relative to the total variance of ``x``)."""
    x = flatten(x)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {n}")
    from sklearn.decomposition import PCA as SkPCA

    full = min(n, x.shape[1])
    k = full if k is None else min(int(k), full)
    fitted = SkPCA(n_components=k, svd_solver="full").fit(x)
    total = float(np.var(x, axis=0, ddof=1).sum())
    explained = fitted.explained_variance_ / total if total > 0 else np.zeros(k)
    return PCA(fitted.mean_, fitted.components_, fitted.explained_variance_, explained)


def pca(x: np.ndarray, k: int = 2) -> np.ndarray:
    """``x (N, ...)`` → its coordinates ``(N, k)`` on the first ``k`` principal axes."""
    return fit_pca(x, k).transform(x)


def explained_variance(x: np.ndarray) -> np.ndarray:
    """The share of the total variance of ``x (N, ...)`` each principal component explains,
    ``(min(N, d),)``, decreasing; its cumulative sum ends at 1 (EMOPortraits Fig. 3)."""
    return fit_pca(x).explained


def components_to_reach(explained: np.ndarray, thresholds: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99)) -> dict[float, int]:
    """For each share ``τ`` of ``thresholds``: the fewest leading components whose explained
    variance (``explained``, as from :func:`explained_variance`) sums to at least ``τ``."""
    cumulative = np.cumsum(np.asarray(explained, np.float64))
    out = {}
    for tau in thresholds:
        if not 0 < tau <= 1:
            raise ValueError(f"threshold {tau}: a share of variance in (0, 1]")
        # Rounding can leave the total a hair under 1: the last component always reaches it.
        hit = np.nonzero(cumulative >= tau - 1e-9)[0]
        out[float(tau)] = int(hit[0] + 1) if hit.size else len(cumulative)
    return out


def tsne(x: np.ndarray, k: int = 2, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE of ``x (N, ...)`` → ``(N, k)``. The perplexity is lowered to
    ``(N − 1) / 3`` when there are too few rows for it (scikit-learn needs it below ``N``). Up to
    :data:`EXACT_TSNE_ROWS` rows the exact gradient is used: at analysis sizes it is both exact and
    much faster than the Barnes–Hut approximation."""
    from sklearn.manifold import TSNE

    x = flatten(x)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 rows, got {n}")
    perplexity = float(min(perplexity, max((n - 1) / 3.0, 1.0)))
    method = "exact" if n <= EXACT_TSNE_ROWS else "barnes_hut"
    return TSNE(n_components=k, perplexity=perplexity, init="pca", method=method, random_state=seed).fit_transform(x)
