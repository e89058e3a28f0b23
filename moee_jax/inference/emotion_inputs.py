"""What a user's emotion request becomes for one video: checked against the model, then turned into
typed :class:`~moee_jax.models.conditioning.EmotionSources` (batch 1).

Emotion-to-Latents models (MoEE):

* ``label`` / ``palette`` — the weights (one-hot for a label, the mix for a compound) through the
  label MLP, and the same weights as the **global gate** of every Emotion MoE: a label activates its
  own expert, a palette mixes experts (MoEE's palette: compound emotions from single-emotion
  experts). The speech emotion source is dropped: the speech a user gives need not carry the
  emotion asked for, and training conditions label samples the same way
  (:mod:`moee_jax.data.pipeline`, emotion modes). Models with the ``single`` or ``no_global`` MoE
  variant ignore the gate.
* ``text`` — T5 features of the description alone; the learned gate acts. Only for models with a
  ``text`` emotion source. A dropped text is present but masked out, as in training.
* ``audio`` — speech only (each clip's own speech is filled in per clip by the animator); the
  learned gate acts. Only for models with a ``speech`` source.

DICE-Talk embedder models: ``video`` encodes a reference clip (its face crops, mouth boxes and
audio) into one emotion for the whole video; ``audio`` uses the embedder's audio-only mode on each
clip's speech.
"""

from __future__ import annotations

import pathlib

import numpy as np

from moee_jax.data.audio import audio_window, frame_log_mel
from moee_jax.data.face_crop import crop_frame
from moee_jax.emotions import NUM_EMOTIONS
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.encoders import ModelEncoders
from moee_jax.inference.inputs import EmotionSpec, InputError
from moee_jax.models.conditioning import EmotionConfig, EmotionSources

# The command-line flag of each kind of request, and the model's emotion source each needs.
FLAG_OF_KIND = {"label": "--emotion", "palette": "--emotion", "text": "--emotion_text", "audio": "--emotion_from_audio",
                "video": "--emotion_video"}  # fmt: skip
SOURCE_OF_KIND = {"label": "label", "palette": "label", "text": "text", "audio": "speech"}
FLAG_OF_SOURCE = {"label": "--emotion", "text": "--emotion_text", "speech": "--emotion_from_audio"}


class EmotionInputs:
    """A model's reading of emotion requests.

    ``emotion``: the model's :class:`EmotionConfig`; ``encoders``: where the T5 encoder comes from;
    ``size``, ``downsample``: the face crop's side and the mask's downsampling; ``fps``,
    ``clip_frames``, ``context_frames``, ``mel_bins``, ``text_length``: the model's clip geometry
    (a reference clip is read with the same).
    """

    def __init__(self, emotion: EmotionConfig, encoders: ModelEncoders, *, size: int, downsample: int, fps: float,
                 clip_frames: int, context_frames: int, mel_bins: int, text_length: int):  # fmt: skip
        self.emotion, self.encoders = emotion, encoders
        self.size, self.downsample, self.fps = size, downsample, fps
        self.clip_frames, self.context_frames, self.mel_bins, self.text_length = clip_frames, context_frames, mel_bins, text_length
        self._text_encoder = None

    def check(self, spec: EmotionSpec) -> None:
        """Raise :class:`InputError` when this model cannot take ``spec``, naming the flag to use."""
        flag = FLAG_OF_KIND[spec.kind]
        if self.emotion.uses_embedder:
            if spec.kind not in ("video", "audio"):
                raise InputError(
                    f"{flag}: this model's emotion comes from a reference clip (DICE-Talk embedder, emotion source "
                    "'embedder'); pass --emotion_video ref.mp4 or --emotion_from_audio"
                )
            return
        usable = ", ".join(FLAG_OF_SOURCE[s] for s in self.emotion.sources if s in FLAG_OF_SOURCE)
        sources = ", ".join(self.emotion.sources)
        if spec.kind == "video":
            raise InputError(
                "--emotion_video: only models with the DICE-Talk embedder (config.model.emotion.sources=('embedder',)) take a "
                f"reference video; this model's emotion sources are {sources}: use {usable}"
            )
        need = SOURCE_OF_KIND[spec.kind]
        if need not in self.emotion.sources:
            raise InputError(f"{flag}: this model has no {need!r} emotion source (its sources: {sources}); use {usable}")
        if spec.kind == "text" and self.encoders.text_folder is None:
            raise InputError("--emotion_text needs --text_encoder FOLDER: the T5 encoder (transformers folder) the model was trained with")

    def sources(self, spec: EmotionSpec, *, detect: bool = True) -> EmotionSources:
        """The video's emotion sources (batch 1); per-clip speech is added per clip.

        Emotion-to-Latents models: ``label (1, 6)`` (zeros when the label is dropped), ``drop (1, 3)``
        over (text, speech, label) — one kept — ``text (1, L, D)`` + ``text_mask``, and the MoE
        gate's ``palette (1, 6)`` with ``palette_keep (1,)`` (True for a label or palette). Embedder
        models: ``expression_frames (1, F, S, S, 3)`` in [-1, 1], ``mouth_mask (1, F, S, S)`` and
        ``embedder_audio (1, F, n_mels)`` (when the reference clip has sound) for ``video``.
        """
        self.check(spec)
        weights = np.zeros(NUM_EMOTIONS, np.float32) if spec.weights is None else np.asarray(spec.weights, np.float32)
        if self.emotion.uses_embedder:
            extra = self.reference_clip(spec.video, detect) if spec.kind == "video" else {}
            return EmotionSources(drop=np.zeros((1, 3), bool), palette=weights[None], palette_keep=np.zeros((1,), bool), **extra)
        keep_label = spec.kind in ("label", "palette")
        keep_text = spec.kind == "text"
        keep_speech = spec.kind == "audio"
        text = mask = None
        if keep_text:
            text, mask = self.encode_text(spec.text)
        elif "text" in self.emotion.sources:  # dropped, as in training: present but masked out
            text = np.zeros((1, self.text_length, self.emotion.text_dim), np.float32)
            mask = np.zeros((1, self.text_length), bool)
        return EmotionSources(
            drop=np.array([[not keep_text, not keep_speech, not keep_label]]),
            # The label's weights set the MoE's global gate; without a label the learned gate acts.
            palette=weights[None], palette_keep=np.array([keep_label]),
            label=weights[None] if "label" in self.emotion.sources else None, text=text, text_mask=mask,
        )  # fmt: skip

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """T5 features ``(1, L, D)`` float32 and mask ``(1, L)`` of ``text``; the encoder is loaded once."""
        if self._text_encoder is None:
            self._text_encoder = self.encoders.load_text(text_dim=self.emotion.text_dim)
        features, mask = self._text_encoder.encode([text], max_length=self.text_length)
        return features.astype(np.float32), mask

    def reference_clip(self, path: pathlib.Path, detect: bool) -> dict[str, np.ndarray]:
        """The embedder's view of a reference clip: the middle ``F`` frames at the model's fps,
        face-cropped with one box (detected on the middle frame), their mouth boxes, and the clip's
        own per-frame log-mel (absent when it has no sound: the embedder's video-only mode)."""
        from moee_jax.data.video_io import VideoError, read_video, resample_indices

        try:
            video, fps, sound = read_video(path)
        except VideoError as e:
            raise InputError(f"--emotion_video {e}") from None
        index = resample_indices(video.shape[0], fps, self.fps)
        f, c = self.clip_frames, self.context_frames
        if index.size < f:
            raise InputError(
                f"--emotion_video {path}: {index.size} frames at {self.fps:g} fps; the embedder needs at least {f} ({f / self.fps:.2f} s)"
            )
        start = (index.size - f) // 2
        middle = video[index[start + f // 2]]
        portrait = inputs_lib.prepare_portrait(middle, self.size, detect=detect, name=f"--emotion_video {path}")
        crops = np.stack([crop_frame(video[i], portrait.box, self.size) for i in index[start : start + f]])
        mouth = inputs_lib.mouth_region_mask(self.size, self.downsample)
        out = {
            "expression_frames": (crops.astype(np.float32) / 127.5 - 1.0)[None],
            "mouth_mask": np.broadcast_to(mouth, (1, f) + mouth.shape).copy(),
        }
        if sound is not None:
            mel = frame_log_mel(audio_window(sound, self.fps, start - c, f + 2 * c), self.fps, self.mel_bins)
            out["embedder_audio"] = mel[None, c : c + f]
        return out
