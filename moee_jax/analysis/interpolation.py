"""Interpolating between two emotions, rendered as a frame strip and a video.

Two paths from emotion A to emotion B (DICE-Talk Fig. 4(d) interpolates its emotion embeddings;
MoEE mixes single-emotion experts with a palette):

* ``latent`` — the emotion tokens the experts attend to, ``T(α) = (1 − α)·T_A + α·T_B``, each
  endpoint's tokens computed per clip exactly as ``moee animate`` computes them for that emotion
  (label MLP + the clip's speech, text, speech alone or a reference clip); a compound palette's
  gate override is interpolated alike (both endpoints must then have one). Rendering needs an
  :class:`~moee_jax.analysis.animator.AnalysisAnimator`, whose per-clip conditions accept such a
  pair; at ``α = 0`` and ``α = 1`` its videos are the endpoints' own.
* ``palette`` — MoEE's palette, ``w(α) = (1 − α)·w_A + α·w_B`` over the six emotions, used as the
  label weights *and* as every MoE's global gate (``moee animate --emotion happy:0.6,sad:0.4``);
  its endpoints are the renders of the one-emotion palettes ``happy:1`` (gate forced on one expert).

Every render of one interpolation shares the portrait, the speech and the noise seed, so the
videos differ by the emotion only.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from moee_jax.analysis.animator import AnalysisAnimator, InterpolatedEmotion
from moee_jax.inference.animator import Animator
from moee_jax.inference.inputs import EmotionSpec, Speech

MODES = ("latent", "palette")


@dataclasses.dataclass
class Interpolation:
    """Renders along one path: ``alphas (K,)``, ``frames (K, T, S, S, 3)`` uint8 (row ``k`` at
    ``alphas[k]``), the driving ``audio (A,)`` at 16 kHz and ``fps``; ``mode`` and the endpoints'
    descriptions ``(A, B)``."""

    alphas: np.ndarray
    frames: np.ndarray
    audio: np.ndarray
    fps: float
    mode: str
    endpoints: tuple[str, str]


def interpolate(
    animator: Animator,
    image: str | os.PathLike | np.ndarray,
    speech: str | os.PathLike | Speech,
    emotion_a: EmotionSpec,
    emotion_b: EmotionSpec,
    *,
    alphas: int | Sequence[float] = 5,
    mode: str = "latent",
    steps: int | None = None,
    seed: int = 0,
    detect: bool = False,
    **options,
) -> Interpolation:
    """Render ``image`` speaking ``speech`` at each ``α`` of ``alphas`` (a count of evenly spaced
    values in [0, 1], or the values) along the ``mode`` path from ``emotion_a`` to ``emotion_b``.
    ``steps``, ``seed``, ``detect`` and ``options`` (``sampler``, ``guidance``) as
    :meth:`Animator.animate`. ``latent`` needs an :class:`AnalysisAnimator`; ``palette`` needs label or
    palette emotions (a model with a ``label`` emotion source)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    alphas = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError(f"alphas must be a count or a non-empty sequence of values, got {alphas!r}")
    settings = dict(steps=steps, seed=seed, detect=detect, **options)
    if mode == "palette":
        weights = [_weights(e) for e in (emotion_a, emotion_b)]
        renders, audio = [], None
        for alpha in alphas:
            w = ((1.0 - alpha) * weights[0] + alpha * weights[1]).astype(np.float32)
            anim = animator.animate(image, speech, palette_spec(w), **settings)
            renders.append(anim.frames)
            audio = anim.audio
    else:
        if not isinstance(animator, AnalysisAnimator):
            raise TypeError("latent interpolation renders with an AnalysisAnimator: AnalysisAnimator.from_run(run_dir)")
        job = animator.prepare(image, speech, emotion_a, **settings)
        sources_b = animator.emotion_sources(emotion_b, detect=detect)
        if bool(np.asarray(job.emotion.palette_keep)[0]) != bool(np.asarray(sources_b.palette_keep)[0]):
            raise ValueError(
                "latent interpolation between a label (or palette) and an emotion from speech, text or a clip: the label "
                "sets the MoE's gate at one end only; give both ends the same way, or use mode='palette'"
            )
        renders = []
        for alpha in alphas:
            pair = InterpolatedEmotion(job.emotion, sources_b, np.float32(alpha))
            renders.append(animator.render_job(dataclasses.replace(job, emotion=pair)))
        audio = job.speech.wave
    return Interpolation(
        alphas=alphas, frames=np.stack(renders), audio=np.asarray(audio, np.float32), fps=animator.fps, mode=mode,
        endpoints=(emotion_a.spec or emotion_a.kind, emotion_b.spec or emotion_b.kind),
    )  # fmt: skip


def palette_spec(weights: np.ndarray) -> EmotionSpec:
    """The palette condition ``weights (6,)`` (label MLP input and global-gate override), as
    ``--emotion happy:0.6,sad:0.4`` gives it."""
    from moee_jax.emotions import EMOTIONS

    w = np.asarray(weights, np.float32)
    spec = ",".join(f"{e}:{v:.3g}" for e, v in zip(EMOTIONS, w) if v > 0) or "neutral"
    return EmotionSpec("palette", weights=w, palette=w, spec=spec)


def frame_strip(interp: Interpolation, columns: int = 6) -> np.ndarray:
    """Rows = the ``α`` values, columns = ``columns`` frames evenly spaced over the video:
    ``(K·S, columns·S, 3)`` uint8."""
    t = interp.frames.shape[1]
    index = np.linspace(0, t - 1, min(columns, t)).round().astype(int)
    return np.concatenate([np.concatenate(list(video[index]), axis=1) for video in interp.frames], axis=0)


def side_by_side(interp: Interpolation) -> np.ndarray:
    """The renders next to each other, ``α`` increasing left to right: ``(T, S, K·S, 3)`` uint8."""
    return np.concatenate(list(interp.frames), axis=2)


def save_video(interp: Interpolation, path: str | os.PathLike) -> pathlib.Path:
    """Write :func:`side_by_side` as an MP4 with the speech muxed in → ``path``."""
    from moee_jax.data.audio import SAMPLE_RATE
    from moee_jax.data.video_io import write_video

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, side_by_side(interp), interp.fps, interp.audio, SAMPLE_RATE)


def portrait_and_speech(
    data_dir: str | os.PathLike, dataset: str, size: int, *, split: str = "test", seconds: float | None = None
) -> tuple[np.ndarray, Speech]:
    """A face and a speech clip to animate from a dataset split: the first frame of its first
    neutral clip (else its first clip), resized to ``size`` ``(size, size, 3)`` uint8, and that
    clip's speech (its first ``seconds`` when given) as :class:`~moee_jax.inference.inputs.Speech`."""
    from moee_jax.data import schema
    from moee_jax.data.audio import SAMPLE_RATE
    from moee_jax.data.pipeline import open_source

    source = open_source(data_dir, dataset, split)
    records = (source[i] for i in range(len(source)))
    record = next((r for r in records if schema.text_field(r["emotion"]) == "neutral"), None) or source[0]
    frame = schema.decode_frames(record["frames"], [0])[0]
    portrait = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))
    audio = np.asarray(record["audio"], np.float32)
    if seconds is not None:
        audio = audio[: int(round(seconds * SAMPLE_RATE))]
    return portrait, Speech(audio, pathlib.Path(f"{dataset}/{split}/{schema.text_field(record['id'])}"))


def _weights(spec: EmotionSpec) -> np.ndarray:
    if spec.weights is None:
        raise ValueError(f"palette interpolation needs label or palette emotions, got a {spec.kind!r} condition")
    return np.asarray(spec.weights, np.float64)
