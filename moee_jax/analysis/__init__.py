"""Latent-space analysis of a trained run, for notebooks (``notebooks/latent_space_analysis.ipynb``).

=================  ==========================================================================
module             what it gives
=================  ==========================================================================
``animator``       the model with analysis hooks (latent interpolation, gate pass)
``extract``        per clip window: embedder μ/σ (audio / video / both), emotion tokens,
                   Emotion-MoE global gates and local gate maps per layer (:func:`extract_latents`)
``projection``     PCA, explained-variance curves (EMOPortraits Fig. 3), t-SNE
``clustering``     clustering strength d_inter / d_intra per emotion (DICE-Talk Table 5)
``gates``          gate summaries per emotion and heat maps over the face
``interpolation``  emotion A → B in token space or by palette, as a frame strip and a video
``figures``        matplotlib figures of all of the above
``report``         everything into a folder: ``python -m moee_jax.analysis RUN --out DIR``
=================  ==========================================================================
"""

from moee_jax.analysis.animator import AnalysisAnimator
from moee_jax.analysis.clustering import clustering_markdown, clustering_strength, clustering_table
from moee_jax.analysis.extract import EMBEDDER_MODES, ClipLatents, extract_latents
from moee_jax.analysis.interpolation import interpolate
from moee_jax.analysis.projection import components_to_reach, explained_variance, pca, tsne
from moee_jax.analysis.report import AnalysisSettings, analyze_run

__all__ = [
    "EMBEDDER_MODES",
    "AnalysisAnimator",
    "AnalysisSettings",
    "ClipLatents",
    "analyze_run",
    "clustering_markdown",
    "clustering_strength",
    "clustering_table",
    "components_to_reach",
    "explained_variance",
    "extract_latents",
    "interpolate",
    "pca",
    "tsne",
]
