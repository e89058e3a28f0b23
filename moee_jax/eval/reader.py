"""Expression reader: a small CNN that reads a generated frame back into the synthetic generator's terms.

The synthetic talking faces (:mod:`moee_jax.data.synthetic`) are drawn from exact ground truth:
action units, an emotion class, a speech-driven jaw opening and the identity's parameters. The
reader is trained on that ground truth, on identities from :data:`TRAIN_IDENTITY_SEEDS` (disjoint
from the small seeds held out for test identities), so that a clip produced by the model can be
scored in the same terms (:mod:`moee_jax.eval.metrics`).

Heads, per frame:

``aus``       ``(11,)`` sigmoid regression of :data:`~moee_jax.data.synthetic.ACTION_UNITS`.
``probs``     ``(7,)`` softmax over :data:`~moee_jax.data.schema.CLASSES` (six emotions, then neutral).
              Trained on basic-emotion and neutral frames only; compound frames train the other
              heads, and compounds are scored from the AUs.
``mouth``     the jaw opening as drawn, i.e. the ``AU26`` output (weighted up in training). The
              generator draws ``AU26 = base + (1 − base) · mouth_opening``: the speech-driven
              opening on top of the expression's own jaw drop (fear 0.5, surprise 0.7 at full
              intensity). Within a clip of one expression that is an affine function of the speech
              opening, so its correlation with the audio is the speech part's; reading the speech
              part alone would also need the expression's ``base`` from the same frame, and that
              estimate's noise costs lip-sync correlation where the base is large (fear, surprise).
``identity``  ``(24,)`` regression of :func:`~moee_jax.data.schema.identity_vector` (trained on
              standardised targets). Its last entry, the speaking pitch ``f0``, is not visible in a
              frame; the reader predicts about its training mean there.

Frames of any square size ``S`` are area-resized to :data:`INPUT_SIZE` inside the model, so a
reader trained at 64² sees the anti-aliased view of the face that a 32² reader sees at its size.

**A reader is only fair on the distribution it was trained on.** The training pipeline draws faces at
the dataset's size and area-shrinks them to the model's (:func:`moee_jax.data.pipeline.resize_frames`);
a face drawn natively at 32² is another picture (hard polygon edges, a mouth that moves in whole
pixels). So the reader's training frames are drawn at ``render_size`` (the dataset's) and shrunk the
same way to ``size`` (the model's): what it reads at evaluation is what it was trained on. Its
ceiling — the metrics on held-out ground truth through that resize (and the run's latent round
trip) — is reported beside every generated number (:mod:`moee_jax.eval.evaluate`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from moee_jax.atomic import atomic_write_bytes
from moee_jax.data import schema, synthetic
from moee_jax.data.pipeline import resize_frames
from moee_jax.emotions import EMOTIONS, NEUTRAL
from moee_jax.xla_options import compiler_options

INPUT_SIZE = 32  # the network's input resolution; frames of other sizes are resized to it
NUM_CLASSES = len(schema.CLASSES)
IDENTITY_DIM = len(schema.identity_vector(dataclasses.asdict(synthetic.Identity.from_seed(0))))
JAW = synthetic.ACTION_UNITS.index("AU26")  # the AU column read as the mouth opening
TRAIN_IDENTITY_SEEDS = range(10_000, 20_000)  # disjoint from the small seeds used for test identities
_FORMAT_VERSION = 1


# Boxes (row start, row end, column start, column end) in the INPUT_SIZE frame: the face with its
# hair line, and the mouth down to the chin, over the generator's range of identities and head poses.
FACE_BOX = (2, 30, 4, 28)
MOUTH_BOX = (15, 29, 9, 23)


class ReaderNet(nn.Module):
    """Frames ``(N, INPUT_SIZE, INPUT_SIZE, 3)`` float32 in ``[-1, 1]`` → head outputs (pre-activation).

    A face branch on :data:`FACE_BOX` (a 3×3 stem, then three stages of a stride-2 and a 3×3
    convolution) and a mouth branch at full resolution on :data:`MOUTH_BOX` (the lips and chin
    move by about two pixels at 32², so the jaw opening is read before any downsampling) meet in a
    dense layer; three linear heads give ``aus`` ``(N, 11)`` logits, ``logits`` ``(N, 7)`` and
    ``identity`` ``(N, 24)`` standardised values.
    """

    widths: Sequence[int] = (24, 48, 96)
    mouth_width: int = 24
    hidden: int = 192

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        r0, r1, c0, c1 = FACE_BOX
        h = nn.relu(nn.Conv(self.widths[0], (3, 3), name="stem")(x[:, r0:r1, c0:c1]))
        for i, width in enumerate(self.widths):
            h = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), name=f"down{i}")(h))
            h = nn.relu(nn.Conv(width, (3, 3), name=f"conv{i}")(h))
        r0, r1, c0, c1 = MOUTH_BOX
        m = nn.relu(nn.Conv(self.mouth_width, (3, 3), name="mouth_stem")(x[:, r0:r1, c0:c1]))
        m = nn.relu(nn.Conv(self.mouth_width, (3, 3), name="mouth_conv")(m))
        m = nn.relu(nn.Conv(2 * self.mouth_width, (3, 3), strides=(2, 2), name="mouth_down")(m))
        z = jnp.concatenate([h.reshape(h.shape[0], -1), m.reshape(m.shape[0], -1)], axis=-1)
        z = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        return {
            "aus": nn.Dense(synthetic.NUM_AUS, name="aus")(z),
            "logits": nn.Dense(NUM_CLASSES, name="emotion")(z),
            "identity": nn.Dense(IDENTITY_DIM, name="identity")(z),
        }


def _prepare(frames: jax.Array, size: int) -> jax.Array:
    """uint8 ``(N, S, S, 3)`` → float32 ``(N, INPUT_SIZE, INPUT_SIZE, 3)`` in ``[-1, 1]``."""
    x = frames.astype(jnp.float32) / 127.5 - 1.0
    if size == INPUT_SIZE:
        return x
    if size % INPUT_SIZE == 0:
        k = size // INPUT_SIZE
        return x.reshape(x.shape[0], INPUT_SIZE, k, INPUT_SIZE, k, 3).mean(axis=(2, 4))
    return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=True)


def _net(architecture: dict) -> ReaderNet:
    """A :class:`ReaderNet` from its fields (defaults for those missing)."""
    fields = dict(architecture)
    if "widths" in fields:
        fields["widths"] = tuple(int(w) for w in fields["widths"])
    return ReaderNet(**fields)


def _architecture(net: ReaderNet) -> dict:
    return {"widths": [int(w) for w in net.widths], "mouth_width": int(net.mouth_width), "hidden": int(net.hidden)}


@dataclasses.dataclass
class Reader:
    """A trained expression reader for ``size × size`` RGB frames.

    ``identity_mean`` / ``identity_std`` ``(24,)`` undo the standardisation of the identity head;
    ``architecture`` holds the :class:`ReaderNet` fields; ``info`` records how it was trained
    (steps, seconds, identity seeds, final losses).
    """

    size: int
    params: dict
    identity_mean: np.ndarray
    identity_std: np.ndarray
    architecture: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        net = _net(self.architecture)
        size = self.size

        def forward(params, frames):
            out = net.apply({"params": params}, _prepare(frames, size))
            aus = jax.nn.sigmoid(out["aus"])
            return {
                "aus": aus,
                "probs": jax.nn.softmax(out["logits"]),
                "mouth": aus[:, JAW],
                "identity": out["identity"],
            }

        self._forward = jax.jit(forward, compiler_options=compiler_options())

    def predict(self, frames: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Read frames ``(N, S, S, 3)`` uint8 (or one frame ``(S, S, 3)``).

        Returns ``aus`` ``(N, 11)`` in ``[0, 1]``, ``probs`` ``(N, 7)`` over
        :data:`~moee_jax.data.schema.CLASSES`, ``mouth`` ``(N,)`` the jaw opening in ``[0, 1]``
        (``aus[:, AU26]``) and ``identity``
        ``(N, 24)`` in the units of :func:`~moee_jax.data.schema.identity_vector`.
        """
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"frames must be (N, {self.size}, {self.size}, 3) for this reader, got {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        chunks = []
        for start in range(0, len(frames), batch_size):
            batch = frames[start : start + batch_size]
            n = len(batch)
            if n < batch_size and len(frames) > batch_size:
                # Pad the last chunk to the common shape so the jitted function is not recompiled.
                batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
            out = jax.device_get(self._forward(self.params, batch))
            chunks.append({k: v[:n] for k, v in out.items()})
        if not chunks:
            return {
                "aus": np.zeros((0, synthetic.NUM_AUS), np.float32),
                "probs": np.zeros((0, NUM_CLASSES), np.float32),
                "mouth": np.zeros((0,), np.float32),
                "identity": np.zeros((0, IDENTITY_DIM), np.float32),
            }
        out = {k: np.concatenate([c[k] for c in chunks]).astype(np.float32) for k in chunks[0]}
        out["identity"] = out["identity"] * self.identity_std + self.identity_mean
        return out


# ---- data -------------------------------------------------------------------------------------


def _check_draw(identity_seeds, classes, intensity_range) -> np.ndarray:
    seeds = np.asarray(list(identity_seeds), np.int64)
    if seeds.size == 0:
        raise ValueError("identity_seeds is empty")
    unknown = [c for c in classes if c not in schema.CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes must be a non-empty subset of {schema.CLASSES}, got {tuple(classes)}")
    lo, hi = intensity_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"intensity_range must satisfy 0 <= low <= high <= 1, got {intensity_range}")
    return seeds


def _draw_emotion(rng, classes, compound_fraction, intensity_range, blend_fraction: float = 0.0) -> tuple[str, int, float]:
    """``(emotion, label, intensity)``: a compound (label −1) with probability ``compound_fraction``,
    a palette blend of two emotions (``"happiness:0.4,fear:0.6"``, weights in [0.3, 0.7], label −1)
    with probability ``blend_fraction``, else one of ``classes``; neutral always at intensity 1 (it
    has no AUs to scale)."""
    u = rng.random()
    if u < blend_fraction:
        a, b = rng.choice(len(EMOTIONS), 2, replace=False)
        w = float(rng.uniform(0.3, 0.7))
        emotion, label = f"{EMOTIONS[a]}:{w:.3f},{EMOTIONS[b]}:{1 - w:.3f}", -1
    elif u < blend_fraction + compound_fraction:
        emotion, label = _COMPOUNDS[rng.integers(len(_COMPOUNDS))], -1
    else:
        emotion = classes[rng.integers(len(classes))]
        label = schema.CLASSES.index(emotion)
    intensity = 1.0 if emotion == NEUTRAL else float(rng.uniform(*intensity_range))
    return emotion, label, intensity


_COMPOUNDS = tuple(sorted(synthetic.COMPOUND_EMOTIONS))
_KEYS = ("frames", "aus", "label", "mouth", "identity", "clip", "intensity")


def reader_dataset(
    size: int,
    identity_seeds: Sequence[int],
    *,
    num_clips: int,
    frames_per_clip: int = 8,
    classes: Sequence[str] = schema.CLASSES,
    compound_fraction: float = 0.0,
    blend_fraction: float = 0.0,
    intensity_range: tuple[float, float] = (0.3, 1.0),
    seed: int = 0,
    render_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Frames with their ground truth, from ``num_clips`` clips of :func:`~moee_jax.data.synthetic.generate_clip`.

    Each clip draws an identity from ``identity_seeds``, then with probability
    ``compound_fraction`` a compound of :data:`~moee_jax.data.synthetic.COMPOUND_EMOTIONS`, with
    ``blend_fraction`` a palette blend of two emotions, else one of ``classes`` (names in
    :data:`~moee_jax.data.schema.CLASSES`), an intensity uniform in ``intensity_range`` and a speech
    seed; all its ``frames_per_clip`` frames are kept. Frames are drawn at ``render_size`` (default
    ``size``) and area-shrunk to ``size`` (:func:`~moee_jax.data.pipeline.resize_frames`).

    Returns ``frames`` ``(N, S, S, 3)`` uint8, ``aus`` ``(N, 11)``, ``label`` ``(N,)`` int32 (index
    into ``CLASSES``, −1 for a compound), ``mouth`` ``(N,)`` the speech-driven opening
    (``mouth_opening``; the drawn jaw is ``aus[:, JAW]``), ``identity`` ``(N, 24)``, ``clip``
    ``(N,)`` int32 clip index, ``intensity`` ``(N,)`` and ``head_pose`` ``(N, 6)``, with
    ``N = num_clips · frames_per_clip``.
    """
    seeds = _check_draw(identity_seeds, classes, intensity_range)
    rng = np.random.default_rng([seed, 0xEA1])
    out: dict[str, list] = {k: [] for k in (*_KEYS, "head_pose")}
    for i in range(num_clips):
        ident = int(rng.choice(seeds))
        emotion, label, intensity = _draw_emotion(rng, classes, compound_fraction, intensity_range, blend_fraction)
        clip = synthetic.generate_clip(
            ident, emotion, intensity, seed=int(rng.integers(2**31)), num_frames=frames_per_clip, size=render_size or size, text=False
        )
        out["frames"].append(resize_frames(clip.frames, size))
        out["aus"].append(clip.action_units)
        out["label"].append(np.full(frames_per_clip, label, np.int32))
        out["mouth"].append(clip.mouth_opening)
        out["identity"].append(np.repeat(schema.identity_vector(clip.identity)[None], frames_per_clip, 0))
        out["clip"].append(np.full(frames_per_clip, i, np.int32))
        out["intensity"].append(np.full(frames_per_clip, intensity, np.float32))
        out["head_pose"].append(clip.head_pose)
    return {k: np.concatenate(v) for k, v in out.items()}


def recombined_dataset(
    size: int,
    identity_seeds: Sequence[int],
    motion: dict[str, np.ndarray],
    *,
    num_identities: int,
    frames_per_identity: int = 16,
    classes: Sequence[str] = schema.CLASSES,
    compound_fraction: float = 0.0,
    blend_fraction: float = 0.0,
    intensity_range: tuple[float, float] = (0.3, 1.0),
    seed: int = 0,
    render_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Frames of many identities, each with a different expression in every frame.

    A generated clip keeps one expression on one face, so a reader trained on clips alone can tie
    an expression to a face. Here every frame of an identity draws its own emotion and intensity
    (as :func:`reader_dataset` draws them per clip), and a head pose and speech mouth opening from
    ``motion`` (``head_pose`` ``(M, 6)`` and ``mouth`` ``(M,)`` rows of generated clips at this
    ``size``, e.g. a :func:`reader_dataset` result); the frame is then built the way
    :func:`~moee_jax.data.synthetic.generate_clip` builds one (the emotion's AUs with the speech
    opening added on AU26, :func:`~moee_jax.data.synthetic.face_landmarks`,
    :func:`~moee_jax.data.synthetic.render_frame`), at ``render_size`` (``motion`` drawn at that
    size) and area-shrunk to ``size``. Same keys as :func:`reader_dataset`; ``clip`` numbers the
    identities.
    """
    seeds = _check_draw(identity_seeds, classes, intensity_range)
    poses = np.asarray(motion["head_pose"], np.float64)
    mouths = np.asarray(motion["mouth"], np.float32)
    if poses.ndim != 2 or poses.shape[1] != 6 or len(poses) != len(mouths) or len(poses) == 0:
        raise ValueError(f"motion must hold head_pose (M, 6) and mouth (M,), got {poses.shape} and {mouths.shape}")
    rng = np.random.default_rng([seed, 0x2EC])
    out: dict[str, list] = {k: [] for k in _KEYS}
    n = frames_per_identity
    for i in range(num_identities):
        ident_seed = int(rng.choice(seeds))
        ident = synthetic.Identity.from_seed(ident_seed)
        draws = [_draw_emotion(rng, classes, compound_fraction, intensity_range, blend_fraction) for _ in range(n)]
        aus = np.stack([synthetic.resolve_emotion(e, s)[2] for e, _, s in draws])
        rows = rng.integers(len(poses), size=n)
        base = aus[:, JAW].copy()
        aus[:, JAW] = base + (1 - base) * mouths[rows]
        draw = (render_size or size,) * 2
        landmarks = synthetic.face_landmarks(ident, aus, poses[rows], draw)
        frames = np.stack([synthetic.render_frame(landmarks[f], ident, aus[f], draw) for f in range(n)])
        out["frames"].append(resize_frames(frames, size))
        out["aus"].append(aus.astype(np.float32))
        out["label"].append(np.array([d[1] for d in draws], np.int32))
        out["mouth"].append(mouths[rows])
        out["identity"].append(np.repeat(schema.identity_vector(dataclasses.asdict(ident))[None], n, 0))
        out["clip"].append(np.full(n, i, np.int32))
        out["intensity"].append(np.array([d[2] for d in draws], np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}


# ---- degradations ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
    """Degradations of the reader's training frames, so that it reads the drawn expression and not the
    generator's pixel statistics.

    A generated frame is never the ground truth's exact picture: a diffusion model's samples lose some
    of the fine detail and carry a little noise and colour drift, and a reader trained on clean frames
    alone leans on that detail (measured below). A share ``p`` of the training frames gets, each with
    its own draw, at the network's input (``INPUT_SIZE``², values in ``[-1, 1]``):

    ``blur_sigma``  a Gaussian blur of σ uniform in ``[0, blur_sigma]`` pixels (separable, 7 taps,
                    edges repeated);
    ``noise_std``   additive Gaussian noise of standard deviation uniform in ``[0, noise_std]``
                    (0.03 ≈ 4 grey levels);
    ``contrast``    a gain uniform in ``1 ± contrast`` about the frame's mean;
    ``brightness``  a per-channel offset uniform in ``± brightness``.

    The labels are unchanged: none of these moves a landmark. Its ground-truth ceiling on clean frames
    (:func:`moee_jax.eval.evaluate.ground_truth_ceiling`) shows what the robustness costs there.

    Measured with the defaults (12,000 steps, as the demo's reader; benchmarks/RESULTS.md, "A reader
    that reads through the texture"): on the validation identities' ground truth at 32² its accuracy
    is 0.982 at every blur σ from 0 to 1.0 px (the clean-frame reader: 1.000, 0.875 at σ 0.7, 0.375 at
    σ 1.0), but it finds both components of a compound in 0.69 of the clips against 0.75. It reads
    the then shipped (4,000-step) model's validation clips *lower* (0.607 against 0.750): the
    generated errors are in the drawn expression, not in its sharpness. The
    demo's reader is therefore trained without degradations (``config.reader.augment`` unset); this
    reader is the instrument that tells the two apart.
    """

    p: float = 0.5
    blur_sigma: float = 1.0
    noise_std: float = 0.03
    contrast: float = 0.1
    brightness: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"Augment.p must lie in [0, 1], got {self.p}")
        for name in ("blur_sigma", "noise_std", "contrast", "brightness"):
            if getattr(self, name) < 0:
                raise ValueError(f"Augment.{name} must be non-negative, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, fields) -> Augment | None:
        """An :class:`Augment` from its fields (a dict, a ``ConfigDict`` or a reader's ``info``); None stays None."""
        if fields is None:
            return None
        fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown reader augmentation field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: float(v) for k, v in fields.items()})


_BLUR_TAPS = np.arange(-3, 4, dtype=np.float32)


def gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Blur ``x`` ``(N, H, W, C)`` with a separable Gaussian of per-frame ``sigma`` ``(N,)`` pixels
    (7 taps, edges repeated); ``sigma`` → 0 leaves a frame unchanged."""
    s = jnp.maximum(sigma, 1e-3)[:, None]
    w = jnp.exp(-0.5 * (jnp.asarray(_BLUR_TAPS)[None] / s) ** 2)
    w = w / w.sum(axis=1, keepdims=True)  # (N, 7)
    r = len(_BLUR_TAPS) // 2
    h, wd = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(w[:, k, None, None, None] * xp[:, k : k + h] for k in range(len(_BLUR_TAPS)))
    xp = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    return sum(w[:, k, None, None, None] * xp[:, :, k : k + wd] for k in range(len(_BLUR_TAPS)))


def degrade(key: jax.Array, x: jax.Array, augment: Augment) -> jax.Array:
    """:class:`Augment`'s degradations of frames ``x`` ``(N, S, S, 3)`` in ``[-1, 1]``; same shape."""
    n = x.shape[0]
    k = jax.random.split(key, 6)
    u = lambda key, shape=(n,): jax.random.uniform(key, shape)  # noqa: E731
    y = gaussian_blur(x, augment.blur_sigma * u(k[0]))
    y = y + augment.noise_std * u(k[1])[:, None, None, None] * jax.random.normal(k[2], x.shape)
    mean = y.mean(axis=(1, 2, 3), keepdims=True)
    y = mean + (1.0 + augment.contrast * (2 * u(k[3]) - 1))[:, None, None, None] * (y - mean)
    y = y + augment.brightness * (2 * u(k[4], (n, 1, 1, 3)) - 1)
    chosen = u(k[5]) < augment.p
    return jnp.where(chosen[:, None, None, None], jnp.clip(y, -1.0, 1.0), x)


# ---- training ---------------------------------------------------------------------------------


def _loss(params, net: ReaderNet, x: jax.Array, batch: dict, identity_weight: float, mouth_weight: float):
    out = net.apply({"params": params}, x)
    au = optax.sigmoid_binary_cross_entropy(out["aus"], batch["aus"]).mean()
    mouth = optax.sigmoid_binary_cross_entropy(out["aus"][:, JAW], batch["aus"][:, JAW]).mean()
    labelled = batch["label"] >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], jnp.maximum(batch["label"], 0))
    cls = jnp.sum(jnp.where(labelled, ce, 0.0)) / jnp.maximum(labelled.sum(), 1)
    ident = jnp.mean((out["identity"] - batch["identity"]) ** 2)
    total = au + mouth_weight * mouth + cls + identity_weight * ident
    return total, {"au": au, "mouth": mouth, "cls": cls, "identity": ident}


def train_reader(
    size: int = INPUT_SIZE,
    *,
    seed: int = 0,
    steps: int = 1400,
    batch_size: int = 64,
    identity_seeds: Sequence[int] = TRAIN_IDENTITY_SEEDS,
    num_clips: int = 500,
    frames_per_clip: int = 16,
    num_identities: int = 2000,
    frames_per_identity: int = 16,
    compound_fraction: float = 0.2,
    blend_fraction: float = 0.0,
    learning_rate: float = 2e-3,
    mouth_weight: float = 3.0,
    identity_weight: float = 0.2,
    render_size: int | None = None,
    architecture: dict | None = None,
    augment: Augment | None = None,
) -> Reader:
    """Train a reader for ``size × size`` frames on faces generated from ``identity_seeds``, drawn at
    ``render_size`` (the dataset's size; default ``size``) and area-shrunk to ``size``.

    The training frames, generated once: ``num_clips`` clips of ``frames_per_clip`` frames
    (:func:`reader_dataset`) and ``num_identities`` × ``frames_per_identity`` frames with an
    expression of their own each (:func:`recombined_dataset`, head poses and mouth openings taken
    from those clips); the seven classes at intensities in ``[0.3, 1]``, plus a share
    ``compound_fraction`` of compounds and ``blend_fraction`` of two-emotion palette blends. Then :func:`fit_reader`
    (``architecture``: :class:`ReaderNet` fields to change; ``augment``: degradations of the training
    frames, :class:`Augment`). With the defaults this takes about 70 s of one CPU core at 32².
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    seeds = list(identity_seeds)
    start = time.perf_counter()
    draw = dict(compound_fraction=compound_fraction, blend_fraction=blend_fraction, seed=seed, render_size=render_size)
    clips = reader_dataset(size, seeds, num_clips=num_clips, frames_per_clip=frames_per_clip, **draw)
    mixed = recombined_dataset(size, seeds, clips, num_identities=num_identities,
                               frames_per_identity=frames_per_identity, **draw)  # fmt: skip
    data = {k: np.concatenate([clips[k], mixed[k]]) for k in _KEYS}
    data_seconds = time.perf_counter() - start
    reader = fit_reader(
        data, seed=seed, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        mouth_weight=mouth_weight, identity_weight=identity_weight, architecture=architecture, augment=augment,
    )  # fmt: skip
    reader.info.update(
        render_size=int(render_size or size),
        blend_fraction=float(blend_fraction),
        identity_seeds=[int(min(seeds)), int(max(seeds))],
        data_seconds=round(data_seconds, 2),
        train_seconds=round(time.perf_counter() - start, 2),
    )
    return reader


def fit_reader(
    data: dict[str, np.ndarray],
    *,
    seed: int = 0,
    steps: int = 1400,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    identity_weight: float = 0.2,
    mouth_weight: float = 3.0,
    architecture: dict | None = None,
    augment: Augment | None = None,
) -> Reader:
    """Fit a reader to ``data`` in the layout of :func:`reader_dataset` (the frame size is read from it).

    ``steps`` Adam steps (warm-up, then cosine decay of ``learning_rate``) on batches of
    ``batch_size`` frames drawn without replacement per epoch. Loss: binary cross-entropy on the
    AUs, cross-entropy on the class (compound frames, label −1, left out), ``mouth_weight`` ×
    binary cross-entropy on the jaw opening (AU26) once more, and ``identity_weight`` × squared
    error on the standardised identity vector. ``architecture``: :class:`ReaderNet` fields to change.
    ``augment``: degradations of the training frames (:class:`Augment`; none by default), drawn afresh
    at every step; recorded in ``info["augment"]``.
    """
    frames = np.asarray(data["frames"])
    if frames.ndim != 4 or frames.shape[1] != frames.shape[2] or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"data['frames'] must be square uint8 RGB (N, S, S, 3), got {frames.shape} {frames.dtype}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    start = time.perf_counter()
    size = frames.shape[1]
    mean = data["identity"].mean(0)
    std = np.maximum(data["identity"].std(0), 1e-3)
    arrays = {
        "frames": frames,
        "aus": np.asarray(data["aus"], np.float32),
        "label": np.asarray(data["label"], np.int32),
        "identity": ((data["identity"] - mean) / std).astype(np.float32),
    }

    net = _net(architecture or {})
    params = net.init(jax.random.key(seed), _prepare(jnp.zeros((1, size, size, 3), jnp.uint8), size))["params"]
    warmup = min(100, steps // 10 + 1)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1), learning_rate * 0.02))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def step(params, opt_state, batch, key):
        x = _prepare(batch["frames"], size)
        if augment is not None:
            x = degrade(key, x, augment)
        (_, parts), grads = jax.value_and_grad(_loss, has_aux=True)(params, net, x, batch, identity_weight, mouth_weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    n = len(frames)
    batch_size = min(batch_size, n)
    rng = np.random.default_rng([seed, 0x7EA])
    order, cursor = rng.permutation(n), 0
    parts = {}
    keys = jax.random.split(jax.random.key(seed + 1), steps)
    for i in range(steps):
        if cursor + batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        params, opt_state, parts = step(params, opt_state, {k: v[idx] for k, v in arrays.items()}, keys[i])
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "num_frames": n,
        "fit_seconds": round(time.perf_counter() - start, 2),
        "augment": dataclasses.asdict(augment) if augment is not None else None,
        "final_losses": {k: float(v) for k, v in jax.device_get(parts).items()},
    }
    return Reader(
        size, jax.device_get(params), mean.astype(np.float32), std.astype(np.float32),
        architecture=_architecture(net), info=info,
    )  # fmt: skip


# ---- persistence ------------------------------------------------------------------------------


def save_reader(reader: Reader, path: str | os.PathLike) -> None:
    """Write ``reader`` to ``path`` as one msgpack file (parameters, normalisation, sizes, info)."""
    payload = {
        "version": _FORMAT_VERSION,
        "size": reader.size,
        "architecture": _architecture(_net(reader.architecture)),
        "params": reader.params,
        "identity_mean": np.asarray(reader.identity_mean, np.float32),
        "identity_std": np.asarray(reader.identity_std, np.float32),
        "info": reader.info,
    }
    atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_reader(path: str | os.PathLike) -> Reader:
    """Read a reader written by :func:`save_reader`; a ``ValueError`` naming ``path`` if it is not one."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on foreign bytes
        raise ValueError(f"{path}: not an expression-reader file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("version") != _FORMAT_VERSION or "params" not in payload:
        raise ValueError(f"{path}: not an expression-reader file of format version {_FORMAT_VERSION}")
    architecture = {
        k: [int(w) for w in np.asarray(v).reshape(-1)] if k == "widths" else int(v)
        for k, v in dict(payload.get("architecture", {})).items()
    }
    reader = Reader(
        size=int(payload["size"]),
        params=payload["params"],
        identity_mean=np.asarray(payload["identity_mean"], np.float32),
        identity_std=np.asarray(payload["identity_std"], np.float32),
        architecture=architecture,
        info=payload.get("info", {}),
    )
    net = _net(architecture)
    dummy = _prepare(jnp.zeros((1, reader.size, reader.size, 3), jnp.uint8), reader.size)
    want = jax.tree.map(lambda s: s.shape, jax.eval_shape(lambda: net.init(jax.random.key(0), dummy)["params"]))
    if jax.tree.map(np.shape, reader.params) != want:
        raise ValueError(f"{path}: parameter shapes do not match the reader network {architecture}")
    return reader
