"""The grain training pipeline: talking-face records → fixed-shape training samples.

Reads a split of any dataset in the record format of :mod:`moee_jax.data.schema` through
``tfds.data_source`` (random access to ArrayRecord; TensorFlow is never imported) and yields
batches of dicts of NumPy arrays. One sample is:

===================  ===========================  ==================================================
key                  shape / dtype                meaning
===================  ===========================  ==================================================
``frames``           ``(F, S, S, 3)`` uint8        the target frames ``[s, s + F)``
``motion_frames``    ``(M, S, S, 3)`` uint8        the ``M`` frames before them ``[s − M, s)``
``reference``        ``(S, S, 3)`` uint8           the reference (identity) frame (see below)
``audio``            ``(A,)`` float32              16 kHz speech of frames ``[s − c, s + F + c)``,
                                                   ``A = (F + 2c)·sr/fps``, zeros outside the clip
``mel``              ``(F + 2c, n_mels)`` float32      log-mel energy of each video frame of that audio
``face_mask``        ``(F, m, m)`` float32         the face locator's input, ``m = S/r`` (see below)
``lip_mask``         ``(F, m, m)`` float32         lip region (⊂ face)
``mouth_mask``       ``(F, m, m)`` float32         1 on every cell the mouth box touches, else 0
``loss_mask``        ``(F, m, m)`` float32         weight of each latent cell in the denoising loss
``palette``          ``(6,)`` float32              emotion weights over EMOTIONS
``emotion_class``    int32                         CLASSES index (6 emotions + neutral), −1 compound
``intensity``        float32
``noisy``            bool                          masked noisy emotion sample (stage 2)
``drop_reference``   bool                          CFG condition dropout flags (see below)
``drop_audio``       bool
``drop_emotion``     bool                          every emotion modality dropped (unconditional)
``emotion_drop``     ``(3,)`` bool                 per modality (text, speech, label): True drops it
``motion_is_reference`` bool                       motion frames are the repeated reference
``reference_clip``   int64                         record the reference frame comes from
``action_units``     ``(F, 11)`` float32           ground truth (synthetic), zeros for real data
``has_action_units`` bool
``clip_key``         int64                         record index in the split
``start``            int32                         ``s``
``reference_index``  int32                         frame index of ``reference``
``text``             ``(L,)`` int32 + ``text_mask``  only with ``tokenizer`` set
===================  ===========================  ==================================================

With ``features`` (a feature cache folder, :mod:`moee_jax.data.feature_cache`) a sample also has
the cached encoder features of its window; log-mel stays as it is (``mel_bins``), and without a
cache nothing changes::

    audio_features    (F, 2c+1, layers+1, D) float32   wav2vec2 windows: slot k of frame i is the clip's
                                                       frame s + i − c + k, clamped into the clip (its
                                                       edge frames replicate)
    speech_features   (F, D) float32 + speech_mask     the last layer at the target frames
    text_features     (L, D_t) float32 + text_mask     T5 features of the clip's text

Reference frame — the model must need its conditions
    A clip holds one expression in every frame, so a reference or motion frame from the target's own
    clip already shows the emotion, and a model trained on such samples ignores its emotion
    condition (measured: the loss with emotion labels shuffled across the batch equalled the loss
    with the true ones). At inference the reference is a *neutral* portrait and the first clip's
    motion frames are that portrait repeated. Training is made to look the same:

    * with probability ``reference_neutral_p`` the reference is a frame of a **neutral clip of the
      same identity** (when it has one besides the target), with ``reference_other_p`` a frame of
      **another clip of the same identity** (any emotion); otherwise a frame of the target clip at
      least ``reference_min_distance`` frames from the window (clips too short for that are left
      out of the sampling pool and counted in ``skipped``);
    * with probability ``motion_as_reference_p`` the ``M`` motion frames are the reference frame
      repeated (``motion_is_reference``), as at the first clip of an animation;
    * with probability ``motion_other_p`` they are ``M`` consecutive frames of **another clip of the
      same identity with another expression** (``motion_clip`` names it; otherwise it is the target's
      own key), as at a later clip of an animation whose frames drifted towards a wrong expression:
      the label, not the motion frames, must then decide the expression. Otherwise they are the
      ``M`` frames before the window.

Masked noisy emotion sampling (MoEE §3.4, stage 2)
    Each sample first draws a *target class* uniformly over the classes present (class-balanced,
    since the per-emotion subsets are small; ``class_balanced`` does this without the noise). With probability ``noisy_p`` the clip is then drawn
    instead from the clips of *any other* class — another emotion or neutral — and the sample is
    flagged ``noisy``. A noisy sample keeps its own emotion condition (``palette``,
    ``emotion_class`` are those of the clip shown, so condition and pixels agree) and adds identity
    and expression diversity to every expert; its lips, which come from other speech and other
    recordings, are *hidden from the loss*: ``loss_mask`` is 0 on every latent cell that the mouth
    box (:func:`moee_jax.data.masks.mouth_mask`: the outer-lip bounding box scaled by
    ``mouth_scale``) touches in that frame, and 1 elsewhere. Non-noisy samples have ``loss_mask``
    1 everywhere. The trainer multiplies the per-cell denoising error by ``loss_mask`` (nearest-
    upsampled for pixel-space terms) and normalises by its sum, so masked cells contribute exactly
    nothing and do not dilute the others.

The face locator's mask (``face_mask``)
    ``"framing"`` (the training configs' choice): the face-oval ellipse of a crop framed like the
    training crops (:func:`moee_jax.data.masks.framing_face_mask`), the same in every frame and
    every sample — exactly what the animator gives at inference, where a portrait has no landmarks.
    ``"landmarks"`` (the field's default, which configs stored before it existed trained with): the
    face-oval hull of each target frame's landmarks. That mask carries the identity's face outline
    and every frame's jaw opening, which inference cannot supply (the CPU demo's model trained on it
    draws faces in the ellipse's shape). Measured on the CPU demo, though, training on the ellipse
    read fewer validation clips right and synced the lips less (benchmarks/RESULTS.md, "Where the
    failing classes come from"), so that demo keeps ``"landmarks"``.

Region-weighted loss
    ``face_loss_weight`` and ``lip_loss_weight`` (default 1: uniform) scale ``loss_mask`` on the
    face and the lips with the nested region masks of the audio attention (Hallo's regions,
    :func:`moee_jax.data.masks.combine_region_masks`): ``w = (full − face) + w_face · (face − lip) +
    w_lip · lip``. An expression occupies a few cells of a frame; weighting the face makes the
    error there, which only the emotion condition can explain, a larger share of the loss.

Condition dropout (classifier-free guidance) and emotion modes
    With ``drop_all_p`` every condition is dropped together; otherwise each of reference, audio and
    emotion independently with its own probability. The flags are data; the model replaces a
    dropped condition by its null input. A sample whose emotion is kept is conditioned the way one
    inference mode conditions it (train as you infer): with ``emotion_speech_p`` on its speech alone
    (``--emotion-from-audio``), with ``emotion_text_p`` on its text alone (``--emotion-text``), and
    otherwise on its label alone (``--emotion``: the speech source is dropped, since the speech a
    user gives need not carry the emotion asked for). ``emotion_drop`` holds the result over
    (text, speech, label); ``drop_emotion`` is the all-dropped case.

Sharding and determinism
    Records are sharded over JAX processes (``ShardByJaxProcess``: process ``i`` of ``n`` owns a
    contiguous, disjoint range of record keys); the noisy substitute is drawn from the process's own
    range too, so processes never share a clip. Every random choice comes from grain's per-record
    RNG, seeded by ``seed`` and the position in the stream, so every sample is identical for any
    ``worker_count`` (with workers, grain groups samples into batches within each worker, so only
    the grouping changes), and :func:`save_iterator_state`-style checkpoints (the iterator's
    ``get_state``; Orbax through ``grain.checkpoint.CheckpointSave``) resume the exact sequence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from moee_jax.data import masks as masks_lib
from moee_jax.data import schema
from moee_jax.data.audio import audio_window, frame_log_mel
from moee_jax.data.feature_cache import FeatureCache

FACE_MASKS = ("framing", "landmarks")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a training sample contains and how it is drawn (see the module docstring)."""

    num_frames: int = 16  # F
    image_size: int = 0  # S: frames resized to S × S (landmarks scaled with them); 0 keeps the stored size
    motion_frames: int = 2  # M
    reference_min_distance: int = 0  # frames between a same-clip reference and the window
    reference_neutral_p: float = 0.0  # reference from a neutral clip of the same identity
    reference_other_p: float = 0.0  # reference from another clip of the same identity (any emotion)
    motion_as_reference_p: float = 0.0  # motion frames = the reference repeated (an animation's first clip)
    motion_other_p: float = 0.0  # motion frames from a clip of the same identity with another expression
    audio_context_frames: int = 2  # c: audio frames of context on each side of the window
    mel_bins: int = 32  # log-mel features per video frame (0: none)
    mask_downsample: int = 8  # r: masks at S / r (the VAE's latent size)
    mouth_scale: float = 1.5
    face_mask: str = "landmarks"  # the face locator's mask: "framing" (as at inference) or "landmarks"
    noisy_p: float = 0.0  # masked noisy emotion sampling probability (stage 2)
    face_loss_weight: float = 1.0  # loss weight of face cells outside the lips (1: uniform)
    lip_loss_weight: float = 1.0  # loss weight of lip cells
    class_balanced: bool = False  # draw a target class uniformly first (implied by noisy_p > 0)
    drop_reference_p: float = 0.0
    drop_audio_p: float = 0.0
    drop_emotion_p: float = 0.0
    drop_all_p: float = 0.0
    emotion_speech_p: float = 0.0  # emotion from the speech alone (label dropped)
    emotion_text_p: float = 0.0  # emotion from the text alone (label dropped)
    batch_size: int = 2  # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    worker_count: int = 0  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2
    text_length: int = 32
    features: str = ""  # feature cache folder (moee features); "" = none: log-mel audio only

    @classmethod
    def from_config(cls, config, num_processes: int = 1) -> PipelineConfig:
        """From a stage config: ``config.data`` fields, ``config.seed``, and the per-process share of
        the global ``config.train.batch_size``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.data.to_dict().items() if k in fields}
        global_batch = int(config.train.batch_size)
        if global_batch % num_processes:
            raise ValueError(f"config.train.batch_size={global_batch} must be divisible by the {num_processes} processes")
        return cls.from_dict(values | {"batch_size": global_batch // num_processes, "seed": int(config.seed)})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PipelineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown data pipeline field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(values))

    def __post_init__(self):
        for name in ("noisy_p", "drop_reference_p", "drop_audio_p", "drop_emotion_p", "drop_all_p", "reference_neutral_p",
                     "reference_other_p", "motion_as_reference_p", "motion_other_p", "emotion_speech_p",
                     "emotion_text_p"):  # fmt: skip
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"data.{name} must lie in [0, 1], got {p}")
        for name in ("face_loss_weight", "lip_loss_weight"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"data.{name} must be ≥ 0, got {getattr(self, name)}")
        for a, b in (("reference_neutral_p", "reference_other_p"), ("motion_as_reference_p", "motion_other_p"),
                     ("emotion_speech_p", "emotion_text_p")):  # fmt: skip
            if getattr(self, a) + getattr(self, b) > 1.0:
                raise ValueError(f"data.{a} + data.{b} must be at most 1, got {getattr(self, a)} + {getattr(self, b)}")
        if self.num_frames < 1 or self.motion_frames < 0 or self.reference_min_distance < 0:
            raise ValueError("data.num_frames must be >= 1, data.motion_frames and data.reference_min_distance >= 0")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.face_mask not in FACE_MASKS:
            raise ValueError(f"data.face_mask must be one of {FACE_MASKS}, got {self.face_mask!r}")


# ---- the clip index ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipIndex:
    """Per-record metadata for sampling: ``(N,)`` arrays over the records of a split."""

    num_frames: np.ndarray  # int64
    emotion_class: np.ndarray  # int64, -1 for compounds
    frame_size: np.ndarray  # int64, S
    speaker: np.ndarray  # int64, index into ``speakers``
    speakers: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.num_frames)


def _index_from(data: dict) -> ClipIndex:
    speakers = tuple(data["speakers"])
    return ClipIndex(*(np.asarray(data[k], np.int64) for k in ("num_frames", "emotion_class", "frame_size", "speaker")), speakers)


def clip_index(source, cache: str | pathlib.Path | None = None) -> ClipIndex:
    """Read ``num_frames`` / ``emotion_class`` / frame size / speaker of every record (cached as JSON
    if given; a cache without the speaker field is rebuilt)."""
    if cache is not None and pathlib.Path(cache).exists():
        data = json.loads(pathlib.Path(cache).read_text())
        if data.get("num_records") == len(source) and "speaker" in data:
            return _index_from(data)
    n, e, s, who = [], [], [], []
    for i in range(len(source)):
        record = source[i]
        n.append(len(record["frames"]))
        e.append(int(record["emotion_class"]))
        s.append(schema.decode_frames(record["frames"], [0]).shape[1] if len(record["frames"]) else 0)
        who.append(schema.text_field(record["speaker"]))
    speakers = sorted(set(who))
    data = {"num_records": len(source), "num_frames": n, "emotion_class": e, "frame_size": s,
            "speaker": [speakers.index(w) for w in who], "speakers": speakers}  # fmt: skip
    index = _index_from(data)
    if cache is not None:
        try:
            pathlib.Path(cache).write_text(json.dumps(data))
        except OSError as e:  # e.g. a read-only dataset directory: the index is recomputed next time
            logging.getLogger("moee_jax.data").info("clip index not cached at %s: %s", cache, e)
    return index


def shard_range(num_records: int, shard_options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """The contiguous record-key range ``[start, end)`` a process owns (grain's sharding rule)."""
    from grain._src.core import sharding as grain_sharding

    return grain_sharding.even_split(num_records, shard_options)


def _window_ok(n: int, cfg: PipelineConfig) -> bool:
    """Whether a clip of ``n`` frames admits a window and a far-enough reference frame."""
    if n < cfg.motion_frames + cfg.num_frames:
        return False
    if cfg.reference_min_distance == 0:
        return True
    # The earliest window leaves the most room after it, the latest the most before it.
    after = n - 1 - (cfg.motion_frames + cfg.num_frames - 1 + cfg.reference_min_distance)
    before = (n - cfg.num_frames - cfg.motion_frames) - cfg.reference_min_distance
    return after >= 0 or before >= 0


# ---- the per-record transform ----------------------------------------------------------------------


class MakeSample(grain.transforms.RandomMap):
    """Record key → training sample (the whole per-sample recipe of the module docstring)."""

    def __init__(
        self,
        source,
        index: ClipIndex,
        cfg: PipelineConfig,
        key_range: tuple[int, int],
        tokenizer: Callable[[str], Sequence[int]] | None = None,
        features: FeatureCache | None = None,
    ):
        self.source, self.cfg, self.tokenizer, self.features = source, cfg, tokenizer, features
        if tokenizer is not None and features is not None and features.text_encoder is not None:
            raise ValueError(f"text twice: a tokenizer and the text features of {features.path}; use one of them")
        lo, hi = key_range
        keys = np.arange(lo, hi)
        usable = np.asarray([_window_ok(int(index.num_frames[k]), cfg) for k in keys], bool)
        self.skipped = int((~usable).sum())
        self.keys = keys[usable]
        if len(self.keys) == 0:
            raise ValueError(
                f"no clip in records [{lo}, {hi}) is long enough for {cfg.motion_frames} motion + {cfg.num_frames} frames"
                f" with the reference {cfg.reference_min_distance} frames away; shorten data.num_frames or "
                "data.reference_min_distance, or add longer clips"
            )
        classes = index.emotion_class[self.keys]
        self.classes = np.unique(classes)
        self.by_class = {int(c): self.keys[classes == c] for c in self.classes}
        self.not_class = {int(c): self.keys[classes != c] for c in self.classes}
        sizes = np.unique(index.frame_size[self.keys])
        if len(sizes) != 1:
            raise ValueError(f"records have mixed frame sizes {sizes.tolist()}; prepare the dataset at one size")
        self.stored_size = int(sizes[0])
        self.size = cfg.image_size or self.stored_size
        if self.size % cfg.mask_downsample:
            raise ValueError(f"frame size {self.size} is not divisible by data.mask_downsample={cfg.mask_downsample}")
        self.num_frames = index.num_frames
        self.emotion_class_of = index.emotion_class
        if cfg.face_mask == "framing":
            framing = masks_lib.framing_face_mask(self.size, cfg.mask_downsample)
            self.framing_mask = np.ascontiguousarray(np.broadcast_to(framing, (cfg.num_frames,) + framing.shape))
        # Clips of each identity (within this process's records), for references from other clips.
        speakers = index.speaker[self.keys]
        self.speaker_of = {int(k): int(w) for k, w in zip(self.keys, speakers)}
        self.by_speaker = {int(w): self.keys[speakers == w] for w in np.unique(speakers)}
        neutral = schema.CLASSES.index(schema.NEUTRAL)
        self.neutral_by_speaker = {int(w): self.keys[(speakers == w) & (classes == neutral)] for w in np.unique(speakers)}

    # Which record a sample shows ----------------------------------------------------------------
    def _choose(self, key: int, rng: np.random.Generator) -> tuple[int, bool]:
        cfg = self.cfg
        if not (cfg.noisy_p > 0 or cfg.class_balanced):
            if key in self._usable_set:
                return key, False
            return int(self.keys[rng.integers(len(self.keys))]), False
        target = int(self.classes[rng.integers(len(self.classes))])
        others = self.not_class[target]
        if cfg.noisy_p > 0 and len(others) and rng.random() < cfg.noisy_p:
            return int(others[rng.integers(len(others))]), True
        pool = self.by_class[target]
        return int(pool[rng.integers(len(pool))]), False

    @property
    def _usable_set(self) -> set[int]:
        if not hasattr(self, "_usable_cache"):
            self._usable_cache = set(int(k) for k in self.keys)
        return self._usable_cache

    def _reference_clip(self, clip_key: int, rng: np.random.Generator) -> int:
        """The record the reference frame comes from: a neutral or another clip of the same identity
        (probabilities ``reference_neutral_p`` / ``reference_other_p``, when there is one), else ``clip_key``."""
        cfg = self.cfg
        u = rng.random()
        speaker = self.speaker_of[clip_key]
        if u < cfg.reference_neutral_p:
            pool = self.neutral_by_speaker[speaker]
        elif u < cfg.reference_neutral_p + cfg.reference_other_p:
            pool = self.by_speaker[speaker]
        else:
            return clip_key
        pool = pool[pool != clip_key]
        return int(pool[rng.integers(len(pool))]) if len(pool) else clip_key

    def _motion_clip(self, clip_key: int, rng: np.random.Generator) -> int:
        """The record the motion frames come from when ``motion_other_p`` fires: a clip of the same
        identity with another expression class (``clip_key`` itself when the identity has none)."""
        pool = self.by_speaker[self.speaker_of[clip_key]]
        pool = pool[self.emotion_class_of[pool] != self.emotion_class_of[clip_key]]
        return int(pool[rng.integers(len(pool))]) if len(pool) else clip_key

    def _window(self, n: int, rng: np.random.Generator, same_clip: bool = True) -> tuple[int, int]:
        """``(s, reference_index)`` with ``s ∈ [M, n − F]``; a same-clip reference is ≥ N frames from
        the window, another clip's is any of its frames (drawn by the caller)."""
        cfg = self.cfg
        m, f, d = cfg.motion_frames, cfg.num_frames, cfg.reference_min_distance
        starts = np.arange(m, n - f + 1)
        if not same_clip:
            return int(starts[rng.integers(len(starts))]), -1
        if d == 0:
            s = int(starts[rng.integers(len(starts))])
            return s, int(rng.integers(n))
        before = np.maximum(starts - m - d + 1, 0)  # references in [0, s − M − d]
        after = np.maximum(n - (starts + f - 1 + d), 0)  # references in [s + F − 1 + d, n)
        counts = before + after
        s_i = int(rng.choice(len(starts), p=counts / counts.sum()))  # uniform over valid (s, r) pairs
        s = int(starts[s_i])
        j = int(rng.integers(counts[s_i]))
        r = j if j < before[s_i] else s + f - 1 + d + (j - before[s_i])
        return s, r

    def _emotion_modes(self, drop_all: bool, rng: np.random.Generator, voice_matches: bool = True) -> np.ndarray:
        """``(3,)`` drop flags over (text, speech, label): all for a dropped emotion, else one mode
        kept — speech (``emotion_speech_p``), text (``emotion_text_p``) or the label. Speech is the
        source only where the voice expresses the clip's emotion (``voice_matches``); else the label."""
        if drop_all:
            return np.ones(3, np.bool_)
        u = rng.random()
        keep = 1 if u < self.cfg.emotion_speech_p else 0 if u < self.cfg.emotion_speech_p + self.cfg.emotion_text_p else 2
        if keep == 1 and not voice_matches:
            keep = 2
        flags = np.ones(3, np.bool_)
        flags[keep] = False
        return flags

    def random_map(self, key, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg = self.cfg
        clip_key, noisy = self._choose(int(key), rng)
        record = self.source[clip_key]
        n = len(record["frames"])
        ref_key = self._reference_clip(clip_key, rng)
        s, r = self._window(n, rng, same_clip=ref_key == clip_key)
        m, f = cfg.motion_frames, cfg.num_frames
        if ref_key == clip_key:
            frames = schema.decode_frames(record["frames"], list(range(s - m, s + f)) + [r])
        else:
            ref_frames = self.source[ref_key]["frames"]
            r = int(rng.integers(len(ref_frames)))
            frames = np.concatenate([schema.decode_frames(record["frames"], list(range(s - m, s + f))),
                                     schema.decode_frames(ref_frames, [r])])  # fmt: skip
        u = rng.random()
        motion_is_reference = bool(m) and u < cfg.motion_as_reference_p
        motion_key = (
            self._motion_clip(clip_key, rng)
            if m and not motion_is_reference and u < cfg.motion_as_reference_p + cfg.motion_other_p
            else clip_key
        )
        if motion_is_reference:
            frames[:m] = frames[-1]
        elif motion_key != clip_key:
            other = self.source[motion_key]["frames"]
            t = int(rng.integers(len(other) - m + 1))
            frames[:m] = schema.decode_frames(other, list(range(t, t + m)))
        landmarks = np.asarray(record["landmarks"], np.float32)[s : s + f]
        if self.size != self.stored_size:
            frames = resize_frames(frames, self.size)
            landmarks = landmarks * (self.size / self.stored_size)
        groups = schema.layout_groups(schema.text_field(record["landmark_layout"]))
        size, small = self.size, self.size // cfg.mask_downsample
        try:
            face, lip = masks_lib.masks_from_landmarks(landmarks, size, size, groups["face_oval"], groups["lips"])
            mouth = masks_lib.mouth_mask(landmarks, size, size, groups["lips"], cfg.mouth_scale)
        except ValueError as e:
            clip_id = schema.text_field(record["id"])
            raise ValueError(f"clip {clip_id!r} (record {clip_key}): {e}") from e
        regions = masks_lib.region_masks(face, lip, (small, small))
        mouth_small = _any_pool(mouth, cfg.mask_downsample)
        loss_mask = (1.0 - mouth_small) if noisy else np.ones_like(mouth_small)
        if cfg.face_loss_weight != 1.0 or cfg.lip_loss_weight != 1.0:
            loss_mask = loss_mask * masks_lib.combine_region_masks(regions, {"face": cfg.face_loss_weight, "lip": cfg.lip_loss_weight})[0]

        drop_all = rng.random() < cfg.drop_all_p
        drops = [drop_all or rng.random() < p for p in (cfg.drop_reference_p, cfg.drop_audio_p, cfg.drop_emotion_p)]
        # Records written before the speech_emotion feature have a voice that matches the face.
        voice_matches = "speech_emotion" not in record or schema.text_field(record["speech_emotion"]) == schema.text_field(record["emotion"])
        emotion_drop = self._emotion_modes(drops[2], rng, voice_matches)

        audio = audio_window(np.asarray(record["audio"], np.float32), float(record["fps"]), s - cfg.audio_context_frames,
                              f + 2 * cfg.audio_context_frames)  # fmt: skip
        aus = np.asarray(record["action_units"], np.float32)
        has_aus = aus.shape[0] == n
        sample = {
            "frames": frames[m : m + f],
            "motion_frames": frames[:m],
            "reference": frames[-1],
            "audio": audio,
            "face_mask": self.framing_mask.copy() if cfg.face_mask == "framing" else regions["face"],
            **({"mel": frame_log_mel(audio, float(record["fps"]), cfg.mel_bins)} if cfg.mel_bins else {}),
            "lip_mask": regions["lip"],
            "mouth_mask": mouth_small,
            "loss_mask": loss_mask.astype(np.float32),
            "palette": np.asarray(record["palette"], np.float32),
            "emotion_class": np.int32(record["emotion_class"]),
            "intensity": np.float32(record["intensity"]),
            "noisy": np.bool_(noisy),
            "drop_reference": np.bool_(drops[0]),
            "drop_audio": np.bool_(drops[1]),
            "drop_emotion": np.bool_(drops[2]),
            "emotion_drop": emotion_drop,
            "motion_is_reference": np.bool_(motion_is_reference),
            "motion_clip": np.int64(motion_key),
            "reference_clip": np.int64(ref_key),
            "action_units": aus[s : s + f] if has_aus else np.zeros((f, schema.NUM_AUS), np.float32),
            "has_action_units": np.bool_(has_aus),
            "clip_key": np.int64(clip_key),
            "start": np.int32(s),
            "reference_index": np.int32(r),
        }
        if self.tokenizer is not None:
            text = schema.text_field(record["text"])
            ids = np.zeros(cfg.text_length, np.int32)
            tokens = list(self.tokenizer(text))[: cfg.text_length]
            ids[: len(tokens)] = tokens
            sample["text"] = ids
            sample["text_mask"] = (np.arange(cfg.text_length) < len(tokens)).astype(np.bool_)
        if self.features is not None:
            sample.update(self.features.clip(schema.text_field(record["id"]), s, f, cfg.audio_context_frames, n))
        return sample


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """``(n, S, S, 3)`` uint8 → ``(n, size, size, 3)`` (PIL area / bicubic resampling): how training
    samples, evaluation portraits and the reader's frames are all brought to the model's size."""
    if frames.shape[1] == size:
        return frames
    from PIL import Image

    method = Image.Resampling.BOX if size < frames.shape[1] else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), method)) for f in frames])


def _any_pool(mask: np.ndarray, r: int) -> np.ndarray:
    """``(F, H, W)`` → ``(F, H/r, W/r)``: 1 where any pixel of the cell is set (max pooling)."""
    f, h, w = mask.shape
    return mask.reshape(f, h // r, r, w // r, r).max(axis=(2, 4)).astype(np.float32)


# ---- the loader --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """A grain ``DataLoader`` over one split, with what it was built from."""

    loader: grain.DataLoader
    config: PipelineConfig
    key_range: tuple[int, int]
    num_usable: int
    num_skipped: int
    frame_size: int

    def __iter__(self):
        return iter(self.loader)


def open_source(data_dir: str | pathlib.Path, name: str, split: str):
    """``tfds.data_source(name, split)`` with a clear error when the dataset is not there."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=str(data_dir))
    except Exception as e:  # tfds raises several types for a missing dataset / split
        folder = pathlib.Path(str(data_dir)) / name
        versions = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not folder.is_dir():
            why = f"there is no folder {folder}"
        elif versions and not any((folder / v / "dataset_info.json").exists() for v in versions):
            why = f"{folder} holds no finished build (an interrupted one?)"
        else:  # tfds's first line names what it missed (a split, a version); the rest lists its catalogue
            why = str(e).strip().splitlines()[0] + (f" (versions on disk: {', '.join(versions)})" if versions else "")
        raise FileNotFoundError(
            f"cannot open dataset {name!r} split {split!r} under data_dir {str(data_dir)!r}: {why}. "
            "Build it first (moee prepare, or the synthetic_talking_faces builder; a build of an older version is "
            "not read: build it again)."
        ) from e


def make_pipeline(
    source,
    config: PipelineConfig,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
    tokenizer: Callable[[str], Sequence[int]] | None = None,
    index_cache: str | pathlib.Path | None = None,
) -> Pipeline:
    """A batched, sharded, deterministic grain loader over ``source`` (a ``tfds.data_source`` split).

    ``shard_options`` defaults to ``ShardByJaxProcess(drop_remainder=True)``: one disjoint shard of
    records per JAX process. Batches are ``config.batch_size`` samples (per process) stacked on a
    leading axis.
    """
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if config.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
    index = clip_index(source, index_cache)
    key_range = shard_range(len(source), shard_options)
    features = FeatureCache(config.features) if config.features else None
    transform = MakeSample(source, index, config, key_range, tokenizer, features)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=config.shuffle,
        num_epochs=config.num_epochs, seed=config.seed,
    )  # fmt: skip
    loader = grain.DataLoader(
        data_source=_KeySource(len(source), _describe_source(source)),
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(config.batch_size, drop_remainder=True)],
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
    )
    return Pipeline(loader, config, key_range, len(transform.keys), transform.skipped, transform.size)


def _describe_source(source) -> str:
    """A stable description of a data source (no object addresses), for checkpoint validation."""
    import re

    return re.sub(r" at 0x[0-9a-f]+", "", repr(source))


class _KeySource:
    """The record keys themselves: the transform reads the record it finally chooses."""

    def __init__(self, n: int, description: str):
        self._n, self._description = n, description

    def __repr__(self) -> str:  # grain checks it when restoring an iterator state
        return f"RecordKeys({self._n}, {self._description})"

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: int) -> int:
        return int(key)
