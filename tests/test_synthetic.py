"""Synthetic talking faces: determinism, shapes, and that frames, landmarks and audio carry the signal."""

from __future__ import annotations

import numpy as np
import pytest

from moee_jax.data import masks as M
from moee_jax.data import synthetic as S
from moee_jax.data.audio import SAMPLE_RATE, num_video_frames
from moee_jax.emotions import EMOTIONS, NEUTRAL

G = S.LANDMARK_GROUPS
BASIC = (NEUTRAL, *EMOTIONS)


def _au(aus: np.ndarray, name: str) -> np.ndarray:
    return aus[..., S.ACTION_UNITS.index(name)]


def _inner_gap(lm: np.ndarray) -> np.ndarray:
    """(F,) lip separation: middle lower inner-lip point minus middle upper one (rows)."""
    inner = G["inner_lips"]
    return lm[:, inner[6], 1] - lm[:, inner[2], 1]


def _geometry_features(lm: np.ndarray) -> np.ndarray:
    """Pose-normalised expression features of one clip: medians over frames of landmark distances
    divided by the inter-ocular distance, after undoing the in-plane roll."""
    eyes_l, eyes_r = lm[:, list(G["left_eye"])].mean(1), lm[:, list(G["right_eye"])].mean(1)
    mid, axis = (eyes_l + eyes_r) / 2, eyes_r - eyes_l
    iod = np.linalg.norm(axis, axis=-1)
    c, s = axis[:, 0] / iod, axis[:, 1] / iod
    rel = lm - mid[:, None]
    x = (rel[..., 0] * c[:, None] + rel[..., 1] * s[:, None]) / iod[:, None]
    y = (-rel[..., 0] * s[:, None] + rel[..., 1] * c[:, None]) / iod[:, None]
    lb, rb, le, re = (list(G[k]) for k in ("left_brow", "right_brow", "left_eye", "right_eye"))
    outer, nose = list(G["outer_lips"]), list(G["nose"])
    eye_y = (y[:, le].mean(1) + y[:, re].mean(1)) / 2
    feats = [
        eye_y - (y[:, lb[-1]] + y[:, rb[0]]) / 2,  # inner brow height (AU1 up, AU4 down)
        eye_y - (y[:, lb[0]] + y[:, rb[-1]]) / 2,  # outer brow height (AU2)
        x[:, rb[0]] - x[:, lb[-1]],  # inner brow distance (AU4)
        (y[:, le[4]] - y[:, le[2]] + y[:, re[5]] - y[:, re[1]]) / 2,  # eye opening (AU5, AU6, AU7)
        eye_y - (y[:, le[2]] + y[:, re[1]]) / 2,  # upper lid height (AU5)
        y[:, nose[2]] - y[:, nose[0]],  # nostril height (AU9)
        x[:, nose[3]] - x[:, nose[2]],  # nostril width (AU9)
        x[:, outer[6]] - x[:, outer[0]],  # mouth width (AU12, AU20)
        (y[:, outer[0]] + y[:, outer[6]]) / 2 - (y[:, outer[3]] + y[:, outer[9]]) / 2,  # corners vs centre (AU12/15)
        y[:, outer[3]] - y[:, nose[1]],  # upper lip to nose tip (AU9's lip raise)
        (y[:, outer[9]] - y[:, outer[3]]),  # lip thickness (press, stretch; jaw)
        _inner_gap(lm) / iod,  # lip separation (AU26)
        y[:, G["cheeks"][0]] - eye_y,  # cheek height (AU6)
    ]
    f = np.stack(feats, 1)
    # Speech moves the jaw, so the mouth features use their quietest frames, the rest the median.
    return np.concatenate([np.median(f[:, :9], 0), np.percentile(f[:, 9:12], 5, axis=0), np.median(f[:, 12:], 0)])


def test_same_seed_same_clip_and_different_seed_differs():
    a = S.generate_clip(3, "happiness", 0.8, seed=5, num_frames=8)
    b = S.generate_clip(3, "happiness", 0.8, seed=5, num_frames=8)
    for name in ("frames", "audio", "landmarks", "action_units", "palette", "head_pose"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = S.generate_clip(3, "happiness", 0.8, seed=6, num_frames=8)
    assert not np.array_equal(a.audio, c.audio) and not np.array_equal(a.landmarks, c.landmarks)
    d = S.generate_clip(4, "happiness", 0.8, seed=5, num_frames=8)
    assert a.identity != d.identity and not np.array_equal(a.frames, d.frames)


@pytest.mark.parametrize(("frames", "fps", "size"), [(10, 25.0, 64), (7, 30.0, (48, 80))])
def test_shapes_and_dtypes(frames, fps, size):
    clip = S.generate_clip(1, "surprised", 0.7, seed=0, num_frames=frames, fps=fps, size=size)
    h, w = (size, size) if isinstance(size, int) else size
    assert clip.frames.shape == (frames, h, w, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.ndim == 1 and clip.audio.dtype == np.float32
    assert num_video_frames(len(clip.audio), SAMPLE_RATE, fps) == frames
    assert clip.landmarks.shape == (frames, S.NUM_LANDMARKS, 2) and clip.landmarks.dtype == np.float32
    assert clip.action_units.shape == (frames, len(S.ACTION_UNITS)) and clip.action_units.dtype == np.float32
    assert 0.0 <= clip.action_units.min() and clip.action_units.max() <= 1.0
    assert clip.palette.shape == (6,) and clip.palette[EMOTIONS.index("surprise")] == 1.0
    assert clip.emotion == "surprise" and clip.text == "a surprised person speaking" and clip.intensity == 0.7
    assert np.abs(clip.audio).max() <= 1.0
    # The image is drawn from the landmarks: all of them lie inside it.
    assert (clip.landmarks >= 0).all() and (clip.landmarks[..., 0] <= w - 1).all() and (clip.landmarks[..., 1] <= h - 1).all()


def test_labels_palettes_and_text():
    clip = S.generate_clip(0, "sadly_surprised", 1.0, seed=0, num_frames=2)
    assert clip.text == "a sadly surprised person speaking" and clip.emotion == "sadly_surprised"
    assert S.generate_clip(0, "neutral", seed=0, num_frames=2).palette.sum() == 0
    mix = S.generate_clip(0, "happy:0.5,surprised:0.5", 1.0, seed=0, num_frames=2)
    assert mix.emotion == "happily_surprised"
    arr = np.zeros(6, np.float32)
    arr[EMOTIONS.index("anger")] = 1.0
    assert S.generate_clip(0, arr, 0.5, seed=0, num_frames=2).emotion == "anger"
    with pytest.raises(ValueError, match="intensity"):
        S.generate_clip(0, "anger", 1.5, num_frames=2)


@pytest.mark.parametrize("name", ["happily_surprised", "angrily_disgusted", "sadly_fearful", "fearfully_surprised"])
def test_compound_has_the_action_units_of_both_components(name):
    a, b = S.COMPOUND_EMOTIONS[name]
    clip = S.generate_clip(2, name, 0.9, seed=1, num_frames=4)
    aus = clip.action_units[0]
    for part in (a, b):
        active = S.EMOTION_AUS[part] > 0
        assert (aus[active] >= 0.9 * S.EMOTION_AUS[part][active] - 1e-6).all(), (name, part)
    assert set(np.flatnonzero(clip.palette)) == {EMOTIONS.index(a), EMOTIONS.index(b)}


def test_landmark_geometry_separates_the_basic_emotions_on_held_out_identities():
    """Nearest-centroid on normalised landmark geometry, trained on 8 identities, tested on 6 others."""
    rng = np.random.default_rng(0)

    def dataset(identities):
        xs, ys = [], []
        for ident in identities:
            for k, emotion in enumerate(BASIC):
                clip = S.generate_clip(ident, emotion, float(rng.uniform(0.6, 1.0)), seed=ident * 7 + k, num_frames=16, size=64)
                xs.append(_geometry_features(clip.landmarks))
                ys.append(k)
        return np.array(xs), np.array(ys)

    x_train, y_train = dataset(range(8))
    x_test, y_test = dataset(range(100, 106))
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    centroids = np.stack([((x_train - mu) / sd)[y_train == k].mean(0) for k in range(len(BASIC))])
    dist = (((x_test - mu) / sd)[:, None] - centroids[None]) ** 2
    accuracy = (dist.sum(-1).argmin(1) == y_test).mean()
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize("emotion", ["happiness", "sadness", "surprise"])
def test_mouth_opening_follows_the_audio_envelope(emotion):
    clip = S.generate_clip(5, emotion, 1.0, seed=2, num_frames=75)
    rms = S.frame_rms(clip.audio, 75)
    rho = np.corrcoef(_inner_gap(clip.landmarks), rms)[0, 1]
    assert rho > 0.8, rho
    assert np.corrcoef(_au(clip.action_units, "AU26"), rms)[0, 1] > 0.8


def _voiced_f0(wave: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Median f0 (Hz) over loud 40 ms windows by autocorrelation, searched in 70–500 Hz."""
    n = int(0.04 * sr)
    frames = wave[: len(wave) // n * n].reshape(-1, n)
    energy = (frames**2).mean(1)
    loud = frames[energy > 0.3 * energy.max()]
    lags = np.arange(sr // 500, sr // 70)
    f0s = []
    for fr in loud:
        fr = fr - fr.mean()
        ac = np.array([np.dot(fr[:-lag], fr[lag:]) for lag in lags])
        f0s.append(sr / lags[ac.argmax()])
    return float(np.median(f0s))


def test_prosody_depends_on_emotion():
    clips = {e: S.generate_clip(7, e, 1.0, seed=3, num_frames=75) for e in ("sadness", "anger", "surprise")}
    energy = {e: float(np.sqrt((c.audio**2).mean())) for e, c in clips.items()}
    f0 = {e: _voiced_f0(c.audio) for e, c in clips.items()}
    assert energy["sadness"] < energy["anger"] and energy["sadness"] < energy["surprise"], energy
    assert f0["sadness"] < f0["anger"] and f0["sadness"] < f0["surprise"], f0
    # Sad speech is slower: fewer loud-to-quiet transitions (syllables) in the same time.
    def syllables(c):
        rms = S.frame_rms(c.audio, 75)
        on = rms > 0.3 * rms.max()
        return int((on[1:] & ~on[:-1]).sum())

    assert syllables(clips["sadness"]) < syllables(clips["anger"])


def test_a_neutral_voice_under_an_emotional_face():
    angry = S.generate_clip(7, "anger", 1.0, seed=3, num_frames=20, speech_emotion="neutral")
    neutral = S.generate_clip(7, "neutral", 0.0, seed=3, num_frames=20)
    expressive = S.generate_clip(7, "anger", 1.0, seed=3, num_frames=20)
    np.testing.assert_array_equal(angry.audio, neutral.audio)  # the neutral voice, word for word
    np.testing.assert_array_equal(angry.mouth_opening, neutral.mouth_opening)  # the mouth follows it
    assert angry.emotion == expressive.emotion == "anger" and angry.speech_emotion == "neutral"
    jaw = S.ACTION_UNITS.index("AU26")
    static = [i for i in range(len(S.ACTION_UNITS)) if i != jaw]
    np.testing.assert_array_equal(angry.action_units[:, static], expressive.action_units[:, static])  # the angry face
    assert expressive.speech_emotion == "anger"


def test_masks_from_the_landmark_groups_nest():
    clip = S.generate_clip(9, "fearfully_surprised", 1.0, seed=4, num_frames=6)
    face, lip = M.masks_from_landmarks(clip.landmarks, 64, 64, G["face_oval"], G["lips"])
    assert (face.sum((1, 2)) > 0).all() and (lip.sum((1, 2)) > 0).all()
    for f in range(6):
        raw_lip = M.fill_convex_hull(clip.landmarks[f, list(G["lips"])], 64, 64)
        assert (raw_lip <= face[f]).all()  # the lips lie inside the face before any clipping
    mouth = M.mouth_mask(clip.landmarks, 64, 64, G["lips"])
    assert (mouth >= lip).all() and (mouth.sum((1, 2)) < face.sum((1, 2))).all()
