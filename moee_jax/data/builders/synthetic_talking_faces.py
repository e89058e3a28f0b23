"""TFDS builder ``synthetic_talking_faces``: generated emotional talking faces with exact ground truth.

Each record is one clip of :func:`moee_jax.data.synthetic.generate_clip` in the common record format
(:mod:`moee_jax.data.schema`): PNG frames, 16 kHz speech, exact landmarks (layout ``synthetic72``),
per-frame action units and the identity parameters.

Splits
------
* ``train``: identities ``0 … train_identities − 1``; every basic emotion and neutral, at the
  intensities of the config; compound emotions only when ``compounds_in_train`` is set.
* ``test``: held-out identities ``train_identities …`` (never seen in training); every basic emotion
  and neutral at full intensity, plus each compound of ``compounds`` — by default the compounds
  appear *only* here, to measure whether the model composes emotions it never saw. A compound is a
  name (``happily_surprised``: the union of its components' AUs) or a palette spec
  (``happy:0.5,surprised:0.5``: their weighted sum, stored under ``happiness:0.5,surprise:0.5``),
  the ground truth of what a palette asks a model for.

A voice's prosody follows the face's emotion (:data:`moee_jax.data.synthetic.PROSODY`), which
makes the speech a second cue to the expression. ``neutral_voice_p`` draws that share of the
training split's emotional clips with an emotion-neutral voice instead (recorded in the
``speech_emotion`` feature), so that a model must read the expression from the emotion condition
— as it must at inference, where a label is combined with any speech. ``other_voice_p`` draws that
share of them with the voice of another class (uniformly, neutral included): loudness, pitch and the
jaw opening they drive then say nothing about the upper face (sadness's quiet voice barely opens the
jaw, anger's loud one opens it wide, and only angry, fearful and surprised faces raise the lids), so
a model cannot learn to draw an expression from the voice alone.

Everything is deterministic in ``seed``: the same config writes bit-identical records.

Build (needs ``tensorflow-cpu``, the ``prepare`` extra)::

    from moee_jax.data.builders.synthetic_talking_faces import SyntheticTalkingFaces
    SyntheticTalkingFaces(config="tiny", data_dir="data/tfds").download_and_prepare()

Reading (``tfds.data_source`` or :mod:`moee_jax.data.pipeline`) does not need TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from moee_jax.data import schema, synthetic
from moee_jax.emotions import NEUTRAL

BASIC_CLASSES = schema.CLASSES  # six emotions + neutral
DEFAULT_COMPOUNDS = ("happily_surprised", "angrily_disgusted", "sadly_fearful", "fearfully_surprised")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Size and composition of a synthetic dataset (see the module docstring for the splits)."""

    size: int = 64  # frame side S, pixels
    num_frames: int = 50  # frames per clip (2 s at 25 fps)
    fps: float = 25.0
    train_identities: int = 8
    test_identities: int = 2
    clips_per_emotion: int = 2  # per identity, emotion and intensity (train)
    intensities: tuple[float, ...] = (0.6, 1.0)
    compounds: tuple[str, ...] = DEFAULT_COMPOUNDS
    compounds_in_train: bool = False
    neutral_voice_p: float = 0.0  # share of emotional train clips spoken with an emotion-neutral voice
    other_voice_p: float = 0.0  # share of emotional train clips spoken with another class's voice, drawn uniformly
    seed: int = 0
    splits: tuple[str, ...] = ("train", "test")  # ("test",): the held-out split alone (evaluating a trained model)


class SyntheticTalkingFaces(tfds.core.GeneratorBasedBuilder):
    """Synthetic emotional talking faces (held-out identities and compounds in ``test``)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "The speech_emotion feature (what the voice expresses)."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="tiny", description="64 px, 32-frame clips, 6+2 identities: tests and smoke runs.",
                        num_frames=32, train_identities=6, test_identities=2, clips_per_emotion=1, neutral_voice_p=0.5),
        SyntheticConfig(name="demo", description="64 px, 2 s clips, 24+4 identities: the built-in demo.",
                        train_identities=24, test_identities=4, clips_per_emotion=2, neutral_voice_p=0.5),
        SyntheticConfig(name="256", description="256 px, 2 s clips, 64+8 identities.", size=256,
                        train_identities=64, test_identities=8, clips_per_emotion=2),
        SyntheticConfig(name="512", description="512 px, 2 s clips, 128+16 identities.", size=512,
                        train_identities=128, test_identities=16, clips_per_emotion=2),
    ]  # fmt: skip
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=schema.features(),
            homepage="https://github.com/moee-jax/moee_jax",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        unknown = set(self.builder_config.splits) - {"train", "test"}
        if unknown or not self.builder_config.splits:
            raise ValueError(f"SyntheticConfig.splits={self.builder_config.splits}: choose from ('train', 'test')")
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str):
        for key, spec in enumerate(clip_specs(self.builder_config, split)):
            yield key, render_record(spec, self.builder_config)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one synthetic record shows."""

    identity: int
    emotion: str
    intensity: float
    seed: int
    speech_emotion: str | None = None  # None: the voice expresses ``emotion``


def clip_specs(config: SyntheticConfig, split: str) -> list[ClipSpec]:
    """The clips of ``split`` in record order (deterministic in ``config.seed``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 <= config.neutral_voice_p <= 1.0:
        raise ValueError(f"SyntheticConfig.neutral_voice_p must lie in [0, 1], got {config.neutral_voice_p}")
    if not 0.0 <= config.other_voice_p <= 1.0 - config.neutral_voice_p:
        raise ValueError(f"SyntheticConfig.other_voice_p must lie in [0, 1 - neutral_voice_p = {1 - config.neutral_voice_p:g}], "
                         f"got {config.other_voice_p}")  # fmt: skip
    specs = []
    if split == "train":
        ids = range(config.train_identities)
        emotions = list(BASIC_CLASSES) + (list(config.compounds) if config.compounds_in_train else [])
        for i in ids:
            for e_index, emotion in enumerate(emotions):
                levels = (0.0,) if emotion == NEUTRAL else config.intensities  # neutral has no intensity
                for k, intensity in enumerate(levels):
                    for c in range(config.clips_per_emotion):
                        seed = _seed(config.seed, i, e_index, k, c)
                        specs.append(ClipSpec(i, emotion, intensity, seed, _voice(config, emotion, seed)))
    else:
        start = config.train_identities
        for i in range(start, start + config.test_identities):
            for e_index, emotion in enumerate(list(BASIC_CLASSES) + list(config.compounds)):
                specs.append(ClipSpec(i, emotion, 0.0 if emotion == NEUTRAL else 1.0, _seed(config.seed, i, e_index, 99, 0)))
    for spec in specs:
        schema.emotion_fields(spec.emotion)  # unknown compound names fail here, before any rendering
    return specs


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p + 1 for p in parts]).generate_state(1)[0])


def _unit(seed: int) -> float:
    """A uniform number in ``[0, 1)`` fixed by ``seed`` (independent of the clip's own draws)."""
    return float(np.random.default_rng([seed, 0x701CE]).random())


def _voice(config: SyntheticConfig, emotion: str, seed: int) -> str | None:
    """The ``speech_emotion`` of a training clip: None (the face's own), neutral with
    ``neutral_voice_p``, another basic class drawn uniformly with ``other_voice_p`` (emotional faces
    only: a neutral face has intensity 0, and so would its voice)."""
    u = _unit(seed)
    if emotion == NEUTRAL:
        return None
    if u < config.neutral_voice_p:
        return NEUTRAL
    if u >= 1.0 - config.other_voice_p:  # the top of [0, 1): disjoint from the neutral share for every class
        others = [c for c in BASIC_CLASSES if c != emotion]
        return others[int(np.random.default_rng([seed, 0x0F0CE]).integers(len(others)))]
    return None


def render_record(spec: ClipSpec, config: SyntheticConfig) -> dict[str, object]:
    """Generate the clip of ``spec`` and pack it as a :func:`~moee_jax.data.schema.make_record` dict."""
    clip = synthetic.generate_clip(
        spec.identity, spec.emotion, spec.intensity, seed=spec.seed, num_frames=config.num_frames, fps=config.fps,
        size=config.size, speech_emotion=spec.speech_emotion,
    )
    return schema.make_record(
        clip_id=f"id{spec.identity:04d}/{spec.emotion}_{spec.intensity:.2f}_{spec.seed:010d}",
        speaker=f"id{spec.identity:04d}",
        frames=clip.frames,
        audio=clip.audio,
        landmarks=clip.landmarks,
        landmark_layout="synthetic72",
        emotion=spec.emotion if clip.emotion == "mixed" or ":" in spec.emotion else clip.emotion,
        intensity=clip.intensity,
        text=clip.text,
        fps=clip.fps,
        action_units=clip.action_units,
        identity=schema.identity_vector(clip.identity),
        frame_format="png",
        speech_emotion=None if spec.speech_emotion is None else clip.speech_emotion,
    )


def build(config: str | SyntheticConfig = "tiny", data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Build (or reuse) the dataset under ``data_dir`` as ArrayRecord; returns the builder."""
    builder = SyntheticTalkingFaces(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def parse_clip_id(clip_id: str) -> tuple[int, str, float, int]:
    """``(identity, emotion, intensity, seed)`` of a record id written by :func:`render_record`
    (``id0168/sadness_1.00_0123456789``); ValueError for any other form."""
    try:
        speaker, rest = clip_id.split("/", 1)
        emotion, intensity, seed = rest.rsplit("_", 2)
        if not speaker.startswith("id"):
            raise ValueError
        return int(speaker[2:]), emotion, float(intensity), int(seed)
    except ValueError:
        raise ValueError(f"clip id {clip_id!r} is not of the form id<identity>/<emotion>_<intensity>_<seed>") from None


def speech_matched_clip(record: dict, emotion: str, intensity: float = 1.0) -> synthetic.SyntheticClip | None:
    """The ground truth of the labelled request "``record``'s speaker, showing ``emotion``, saying
    ``record``'s speech": the same identity drawn with ``emotion`` at ``intensity`` while speaking
    exactly ``record``'s words with ``record``'s voice (:func:`~moee_jax.data.synthetic.generate_clip`
    with the record's seed and ``speech_emotion``; the seed fixes words, pitch accents and head
    motion, so the audio is ``record``'s own sample for sample).

    This is what ``moee eval`` asks of a model when it drives every labelled clip with a speaker's
    *neutral* clip; the stored emotional clips speak with their own, emotional voice (another jaw
    opening, see :data:`~moee_jax.data.synthetic.PROSODY`). Returns None when ``record`` was not
    written by this builder or regenerating it does not reproduce its audio (another generator
    version): the truth cannot be drawn then.
    """
    try:
        identity, _, _, seed = parse_clip_id(schema.text_field(record["id"]))
    except ValueError:
        return None
    audio = np.asarray(record["audio"], np.float32)
    frame = schema.decode_frames(record["frames"], [0])[0]
    voice = schema.text_field(record.get("speech_emotion", b"")) or schema.text_field(record["emotion"])  # older records: the face's own voice
    clip = synthetic.generate_clip(identity, emotion, float(intensity), seed=seed, num_frames=len(record["frames"]),
                                   fps=float(record["fps"]), size=frame.shape[:2], text=False, speech_emotion=voice)  # fmt: skip
    if clip.audio.shape != audio.shape or not np.allclose(clip.audio, audio, atol=1e-6):
        return None
    return clip
