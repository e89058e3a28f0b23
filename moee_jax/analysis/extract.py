"""Per-clip latents of a trained run: embedder priors, emotion tokens and Emotion-MoE gates.

For every analysed window of a dataset split (:func:`extract_latents`), one row of
:class:`ClipLatents` holds

* the Gaussian emotion embedder's prior (DICE-Talk §3.1, eqs. 2–5) ``μ``, ``σ`` ``(d,)`` for each
  input mode of DICE-Talk Table 5: ``audio`` (speech only), ``video`` (mouth-masked frames only)
  and ``both``. The embedder is the one the model uses — stage 2's own when stage 2 takes its
  emotion from the embedder (stage 2 trains it further) — else the run's ``embedder`` stage
  (``RUN/embedder/final``);
* the emotion tokens ``(Ne, D)`` that reach every expert (MoEE §Design 2, Emotion-to-Latents, or
  the embedder's token head), for each emotion condition the model takes from a clip: ``label``
  (the clip's palette through the label MLP, the gate left to the gate network) and ``audio``
  (speech only) for Emotion-to-Latents models, ``video`` (the clip itself) and ``audio`` for
  embedder models — exactly what ``moee animate`` feeds (:meth:`Animator.emotion_sources`);
* the Emotion MoE's gates (MoEE §Design 1, sown by :class:`~moee_jax.models.emotion_moe.EmotionMoE`)
  in every spatial transformer block of the U-Net, from one denoiser evaluation of the clip's own
  latents noised to ``timestep`` under the clip's condition (``label`` / ``video``; the global gate
  is the gate network's, never the palette a label imposes): the global gate ``g`` ``(6,)`` and the
  local gate map ``s`` ``(h_l, w_l, 6)`` of each layer, both averaged over the clip's frames.

Windows are drawn the way the training pipeline draws them (:class:`moee_jax.data.pipeline.MakeSample`,
without condition dropout or noisy sampling), ``windows_per_clip`` per record, seeded by
``(seed, record, window)``; each model part sees the window of its own stage's data config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moee_jax.analysis.animator import AnalysisAnimator
from moee_jax.checkpoint.run import RunCheckpoint, load_run_config, restore_final
from moee_jax.data import pipeline as data_pipeline
from moee_jax.data import schema
from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.eval.evaluate import run_dataset  # noqa: F401  (re-exported: the notebook's extract.run_dataset)
from moee_jax.inference.inputs import EmotionSpec, parse_emotion
from moee_jax.models.conditioning import EmotionConfig, EmotionSources
from moee_jax.models.emotion_embedder import GaussianEmotionEmbedder
from moee_jax.models.features import embedder_inputs

EMBEDDER_MODES = ("audio", "video", "both")  # DICE-Talk Table 5 rows


@dataclasses.dataclass
class ClipLatents:
    """What a run computes for ``N`` analysed windows (one row each).

    Metadata: ``clip_id``, ``speaker``, ``emotion`` (label, compound name or ``mixed``) ``(N,)`` str;
    ``emotion_class (N,)`` int (index into :data:`moee_jax.data.schema.CLASSES`, −1 for compounds);
    ``intensity (N,)``; ``palette (N, 6)``; ``start (N,)`` first target frame of the stage-2 window;
    ``frames (N, S, S, 3)`` uint8, that first frame (for gate overlays).

    Embedder (empty dicts when the run has none): ``mu[mode]``, ``sigma[mode]`` ``(N, d)`` for
    ``mode`` in :data:`EMBEDDER_MODES`.

    Stage 2: ``tokens[kind] (N, Ne, D)``; ``global_gates (N, layers, 6)``; ``local_gates[layer]
    (N, h_l, w_l, 6)`` for each name of ``layers`` (U-Net order); ``timestep`` of the gate pass.
    """

    clip_id: np.ndarray
    speaker: np.ndarray
    emotion: np.ndarray
    emotion_class: np.ndarray
    intensity: np.ndarray
    palette: np.ndarray
    start: np.ndarray
    frames: np.ndarray
    mu: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    global_gates: np.ndarray
    local_gates: dict[str, np.ndarray]
    layers: tuple[str, ...]
    timestep: int

    def __len__(self) -> int:
        return len(self.clip_id)

    @property
    def basic(self) -> np.ndarray:
        """``(N,)`` bool: rows of a basic emotion or neutral (not a compound)."""
        return self.emotion_class >= 0

    def select(self, rows: np.ndarray) -> ClipLatents:
        """The rows ``rows`` (bool mask or indices) as a new :class:`ClipLatents`."""
        pick = lambda a: a[rows]  # noqa: E731
        return dataclasses.replace(
            self,
            **{f: pick(getattr(self, f)) for f in ("clip_id", "speaker", "emotion", "emotion_class", "intensity", "palette", "start",
                                                   "frames", "global_gates")},
            mu={k: pick(v) for k, v in self.mu.items()},
            sigma={k: pick(v) for k, v in self.sigma.items()},
            tokens={k: pick(v) for k, v in self.tokens.items()},
            local_gates={k: pick(v) for k, v in self.local_gates.items()},
        )  # fmt: skip


# ---- dataset windows ---------------------------------------------------------------------------------------


def window_samples(source, config, keys: Sequence[int], windows_per_clip: int, seed: int) -> list[dict]:
    """Training-pipeline samples (one dict per window, no batch axis) of records ``keys`` under the
    run config ``config`` (its ``data`` block): ``windows_per_clip`` windows per record, condition
    dropout and noisy sampling off. Records too short for a window are skipped."""
    cfg = dataclasses.replace(
        data_pipeline.PipelineConfig.from_config(config), noisy_p=0.0, class_balanced=False, drop_reference_p=0.0, drop_audio_p=0.0, drop_emotion_p=0.0,
        drop_all_p=0.0, batch_size=1,
    )  # fmt: skip
    index = data_pipeline.clip_index(source)
    make = data_pipeline.MakeSample(source, index, cfg, (0, len(source)))
    usable = set(int(k) for k in make.keys)
    out = []
    for key in keys:
        if int(key) not in usable:
            continue
        for w in range(windows_per_clip):
            out.append(make.random_map(int(key), np.random.default_rng([seed, int(key), w])))
    return out


# ---- the embedder ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("module", "mode"))
def _prior(module: GaussianEmotionEmbedder, mode: str, params, audio, frames, mouth):
    """``(μ, σ)`` ``(B, d)`` of the embedder in ``mode``; jitted per (module, mode), so every load
    of the same embedder shares one compilation."""
    visual = mode in ("video", "both")
    prior = module.apply(
        {"params": params}, audio if mode in ("audio", "both") else None, frames if visual else None, mouth if visual else None,
        deterministic=True,
    )  # fmt: skip
    return prior.mu, prior.sigma


@dataclasses.dataclass
class Embedder:
    """A Gaussian emotion embedder with its parameters and the run config whose ``data`` it reads."""

    module: GaussianEmotionEmbedder
    params: dict
    config: object

    def inputs(self, sample: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A pipeline sample → ``audio (1, F, n_mels)``, ``frames (1, F, S, S, 3)`` in [-1, 1],
        ``mouth (1, F, S, S)`` — the embedder stage's inputs (:func:`moee_jax.models.features.embedder_inputs`)."""
        data = self.config.data
        batch = {k: jnp.asarray(sample[k])[None] for k in ("mel", "frames", "mouth_mask")}
        return embedder_inputs(batch, int(data.num_frames), int(data.audio_context_frames), int(data.mask_downsample))

    def prior(self, sample: dict, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """``(μ, σ)``, each ``(d,)``, of one pipeline sample in ``mode`` (:data:`EMBEDDER_MODES`)."""
        if mode not in EMBEDDER_MODES:
            raise ValueError(f"embedder mode {mode!r}: choose one of {EMBEDDER_MODES}")
        mu, sigma = _prior(self.module, mode, self.params, *self.inputs(sample))
        return np.asarray(mu[0]), np.asarray(sigma[0])


def load_embedder(run_dir: str | pathlib.Path, animator=None) -> Embedder | None:
    """The run's embedder: the stage-2 conditioning's when ``animator``'s model takes its emotion
    from one, else ``RUN/embedder/final`` (+ its ``config.json``); None when there is neither."""
    final = pathlib.Path(run_dir) / "embedder" / "final"
    config_path = final.parent / "config.json"
    if animator is not None and animator.uses_embedder:
        config, params = animator.config, animator.params["conditioning"]["embedder"]
    elif (final / "metadata.json").exists() and config_path.exists():
        metadata = json.loads((final / "metadata.json").read_text())
        config = load_run_config(RunCheckpoint(final, config_path, "embedder", int(metadata.get("step", 0)), metadata))
        params = restore_final(final)["embedder"]
    else:
        return None
    e = EmotionConfig.from_dict(config.model.emotion.to_dict())
    module = GaussianEmotionEmbedder(
        e.embedder_dim, e.embedder_heads, e.embedder_audio_layers, e.embedder_layers,
        visual_channels=e.embedder_visual_channels, dtype=jnp.dtype(config.dtype),
    )  # fmt: skip
    return Embedder(module, params, config)


# ---- stage 2: tokens and gates ----------------------------------------------------------------------------------


def token_kinds(animator) -> tuple[str, ...]:
    """The emotion conditions :func:`extract_latents` reads tokens for (see the module docstring)."""
    if animator.uses_embedder:
        return ("video", "audio")
    return ("label", "audio") if "speech" in animator.emotion.sources else ("label",)


def clip_emotion_sources(animator, sample: dict, kind: str) -> EmotionSources:
    """The emotion sources (batch 1, :meth:`Animator.emotion_sources`) of condition ``kind`` taken
    from the clip of ``sample`` itself.

    ``label``: the clip's palette as label weights, the gate left to the gate network (so the gate
    pass shows what the gate network reads, not the palette a label imposes); ``audio``: speech only;
    ``video`` (embedder models): the clip's own mouth-masked frames and per-frame log-mel.
    """
    palette = np.asarray(sample["palette"], np.float32)
    if kind == "label":
        sources = animator.emotion_sources(EmotionSpec("label", weights=palette, palette=palette))
        return dataclasses.replace(sources, palette_keep=np.zeros((1,), bool))
    if kind == "audio":
        return animator.emotion_sources(parse_emotion(emotion_from_audio=True))
    if kind == "video":
        data = animator.config.data
        batch = {k: jnp.asarray(sample[k])[None] for k in ("mel", "frames", "mouth_mask")}
        audio, frames, mouth = embedder_inputs(batch, int(data.num_frames), int(data.audio_context_frames), int(data.mask_downsample))
        return EmotionSources(drop=np.zeros((1, 3), bool), palette=palette[None], palette_keep=np.zeros((1,), bool),
                              embedder_audio=np.asarray(audio), expression_frames=np.asarray(frames), mouth_mask=np.asarray(mouth))  # fmt: skip
    raise ValueError(f"unknown emotion condition kind {kind!r}; expected label, audio or video")


def clip_tokens(animator: AnalysisAnimator, sample: dict, sources: EmotionSources) -> np.ndarray:
    """The emotion tokens ``(Ne, D)`` of ``sources`` (:func:`clip_emotion_sources`) on the clip of
    the pipeline ``sample``."""
    return np.asarray(animator.clip_tokens(sources, jnp.asarray(sample["mel"])[None]))


def gate_pass(animator: AnalysisAnimator, sample: dict, sources: EmotionSources, noise: jax.Array, timestep: int):
    """:meth:`AnalysisAnimator.gate_pass` of a pipeline ``sample`` (no batch axis)."""
    batch = {k: jnp.asarray(sample[k])[None] for k in ("frames", "reference", "motion_frames", "face_mask", "mel")}
    return animator.gate_pass(batch, sources, noise, timestep)


def _grid(length: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """``(h_l, w_l)`` of a layer with ``length`` tokens, at the latent's aspect ratio."""
    h, w = latent_hw
    h_l = int(round(np.sqrt(length * h / w)))
    if h_l * (length // h_l) != length:
        raise ValueError(f"a layer of {length} tokens does not tile a {h}×{w} latent grid")
    return h_l, length // h_l


# ---- the whole extraction ---------------------------------------------------------------------------------------


def extract_latents(
    run_dir: str | pathlib.Path,
    *,
    data_dir: str | pathlib.Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    windows_per_clip: int = 1,
    max_clips: int | None = None,
    timestep: int | None = None,
    seed: int = 0,
    animator: AnalysisAnimator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ClipLatents:
    """Everything of the module docstring for the records of ``split`` (all, or the first
    ``max_clips``) of the run's dataset (``RUN/stage2/config.json`` unless ``data_dir`` /
    ``dataset`` are given). ``timestep`` of the gate pass defaults to half the training schedule.
    ``animator``: the run's :class:`~moee_jax.analysis.animator.AnalysisAnimator` when already
    loaded (its compiled functions are reused). ``progress(done, total)`` follows each window."""
    if windows_per_clip < 1:
        raise ValueError(f"windows_per_clip={windows_per_clip}: must be at least 1")
    if data_dir is None or dataset is None:
        data_dir, dataset = run_dataset(run_dir)
    animator = animator or AnalysisAnimator.from_run(run_dir)
    embedder = load_embedder(run_dir, animator)
    source = data_pipeline.open_source(data_dir, dataset, split)
    keys = list(range(len(source) if max_clips is None else min(max_clips, len(source))))
    samples = window_samples(source, animator.config, keys, windows_per_clip, seed)
    if not samples:
        raise ValueError(f"{data_dir}/{dataset} split {split!r}: no record is long enough for a window of the run's config")
    embedder_samples = samples
    if embedder is not None and embedder.config.data.to_dict() != animator.config.data.to_dict():
        embedder_samples = window_samples(source, embedder.config, keys, windows_per_clip, seed)
        if len(embedder_samples) != len(samples):
            raise ValueError("the embedder's and stage 2's data configs keep different records; analyse them separately")
    timestep = animator.schedule.num_train_timesteps // 2 if timestep is None else int(timestep)
    kinds = token_kinds(animator)
    gate_kind = kinds[0]

    rows: dict[str, list] = {k: [] for k in ("clip_id", "speaker", "emotion", "emotion_class", "intensity", "palette", "start", "frames")}
    mu: dict[str, list] = {m: [] for m in EMBEDDER_MODES} if embedder is not None else {}
    sigma: dict[str, list] = {m: [] for m in EMBEDDER_MODES} if embedder is not None else {}
    tokens: dict[str, list] = {k: [] for k in kinds}
    local: dict[str, list] = {}
    global_: list[np.ndarray] = []
    latent_hw = None
    key = jax.random.key(seed)
    for i, (sample, e_sample) in enumerate(zip(samples, embedder_samples)):
        record = source[int(sample["clip_key"])]
        rows["clip_id"].append(schema.text_field(record["id"]))
        rows["speaker"].append(schema.text_field(record["speaker"]))
        rows["emotion"].append(schema.text_field(record["emotion"]))
        rows["emotion_class"].append(int(sample["emotion_class"]))
        rows["intensity"].append(float(sample["intensity"]))
        rows["palette"].append(np.asarray(sample["palette"], np.float32))
        rows["start"].append(int(sample["start"]))
        rows["frames"].append(sample["frames"][0])
        if embedder is not None:
            for mode in EMBEDDER_MODES:
                m, s = embedder.prior(e_sample, mode)
                mu[mode].append(m)
                sigma[mode].append(s)
        inputs = {kind: clip_emotion_sources(animator, sample, kind) for kind in kinds}
        for kind in kinds[1:]:
            tokens[kind].append(clip_tokens(animator, sample, inputs[kind]))
        if latent_hw is None:
            latent_hw = (sample["frames"].shape[1] // animator.downsample, sample["frames"].shape[2] // animator.downsample)
        shape = (1, animator.clip_frames) + latent_hw + (int(animator.config.model.vae.latent_channels),)
        noise = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        gate_tokens, gates = gate_pass(animator, sample, inputs[gate_kind], noise, timestep)
        tokens[gate_kind].append(np.asarray(gate_tokens))
        if gates:  # the 'single' MoE variant has none
            global_.append(np.stack([np.asarray(g["global_gates"]).mean(axis=0) for g in gates.values()]))
        for layer, g in gates.items():
            s = np.asarray(g["local_gates"]).mean(axis=0)  # (L, 6)
            local.setdefault(layer, []).append(s.reshape(_grid(s.shape[0], latent_hw) + (s.shape[-1],)))
        if progress is not None:
            progress(i + 1, len(samples))

    layers = tuple(local)
    return ClipLatents(
        clip_id=np.asarray(rows["clip_id"]),
        speaker=np.asarray(rows["speaker"]),
        emotion=np.asarray(rows["emotion"]),
        emotion_class=np.asarray(rows["emotion_class"], np.int64),
        intensity=np.asarray(rows["intensity"], np.float32),
        palette=np.stack(rows["palette"]).reshape(-1, NUM_EMOTIONS),
        start=np.asarray(rows["start"], np.int64),
        frames=np.stack(rows["frames"]),
        mu={k: np.stack(v) for k, v in mu.items()},
        sigma={k: np.stack(v) for k, v in sigma.items()},
        tokens={k: np.stack(v) for k, v in tokens.items()},
        global_gates=np.stack(global_) if layers else np.zeros((len(samples), 0, NUM_EMOTIONS), np.float32),
        local_gates={k: np.stack(v) for k, v in local.items()},
        layers=layers,
        timestep=timestep,
    )


def class_names(latents: ClipLatents) -> tuple[str, ...]:
    """The basic classes present in ``latents``, in :data:`moee_jax.data.schema.CLASSES` order."""
    present = set(latents.emotion_class[latents.basic].tolist())
    return tuple(c for i, c in enumerate(schema.CLASSES) if i in present)


def emotion_order(latents: ClipLatents) -> tuple[str, ...]:
    """Every emotion of ``latents``: the basic classes in :data:`~moee_jax.data.schema.CLASSES`
    order, then the compounds alphabetically."""
    return class_names(latents) + tuple(sorted(set(latents.emotion[~latents.basic].tolist())))
