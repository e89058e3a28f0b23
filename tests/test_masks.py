"""Face / lip / mouth masks from landmarks and the region gate of the audio attention."""

from __future__ import annotations

import numpy as np
import pytest

from moee_jax.data import masks as M

H = W = 64
FRAMES = 3


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _face_landmarks() -> np.ndarray:
    """(F, 468, 2) pixel landmarks: face oval a circle, lips a small ellipse below its centre, moving."""
    lm = np.full((FRAMES, 468, 2), 32.0)
    for f in range(FRAMES):
        lm[f, list(M.MEDIAPIPE_FACE_OVAL)] = _ellipse(32 + f, 30, 20, 24, len(M.MEDIAPIPE_FACE_OVAL))
        lm[f, list(M.MEDIAPIPE_LIPS)] = _ellipse(32 + f, 42, 7, 3 + f, len(M.MEDIAPIPE_LIPS))
    return lm


def test_polygon_fill_of_a_square_gives_the_square():
    corners = np.array([[2, 2], [9, 2], [9, 9], [2, 9], [5, 5]], np.float64)  # plus an interior point
    mask = M.fill_convex_hull(corners, 12, 14)
    expected = np.zeros((12, 14), np.float32)
    expected[2:10, 2:10] = 1
    np.testing.assert_array_equal(mask, expected)


def test_landmark_masks_are_binary_per_frame_and_lips_lie_in_the_face():
    face, lip = M.masks_from_landmarks(_face_landmarks(), H, W)
    assert face.shape == lip.shape == (FRAMES, H, W)
    assert set(np.unique(face)) == {0.0, 1.0} and set(np.unique(lip)) == {0.0, 1.0}
    assert np.all(lip <= face)
    assert 0 < lip.sum() < face.sum()
    assert lip[0, 42, 32] == 1 and face[0, 30, 32] == 1 and face[0, 2, 2] == 0


def test_landmark_index_sets_are_parameters():
    lm = np.zeros((1, 4, 2))
    lm[0] = [[1, 1], [6, 1], [6, 6], [1, 6]]
    face, lip = M.masks_from_landmarks(lm, 8, 8, face_idx=(0, 1, 2, 3), lip_idx=(0, 1, 2))
    assert face.sum() == 36 and 0 < lip.sum() < 36


def test_missing_landmarks_are_reported_by_frame():
    lm = _face_landmarks()
    lm[1, M.MEDIAPIPE_LIPS[0]] = np.nan
    with pytest.raises(ValueError, match=r"frame\(s\) \[1\]"):
        M.masks_from_landmarks(lm, H, W)


def test_mouth_mask_is_a_box_covering_the_lips():
    lm = _face_landmarks()
    _, lip = M.masks_from_landmarks(lm, H, W)
    mouth = M.mouth_mask(lm, H, W, scale=1.5)
    assert mouth.shape == (FRAMES, H, W)
    assert np.all(lip <= mouth)
    for f in range(FRAMES):
        rows, cols = np.flatnonzero(mouth[f].any(axis=1)), np.flatnonzero(mouth[f].any(axis=0))
        assert mouth[f].sum() == rows.size * cols.size  # a filled rectangle
        assert cols.size >= 1.5 * 14  # lips are 14 px wide
    assert mouth[0].sum() < mouth[2].sum()  # the box follows the opening mouth


def test_region_masks_are_resized_to_latent_size_and_stay_in_unit_range():
    face, lip = M.masks_from_landmarks(_face_landmarks(), H, W)
    regions = M.region_masks(face, lip, (8, 8))
    assert set(regions) == {"full", "face", "lip"}
    for m in regions.values():
        assert m.shape == (FRAMES, 8, 8) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0
    assert np.all(regions["lip"] <= regions["face"]) and np.all(regions["face"] <= regions["full"])
    assert np.all(regions["full"] == 1.0)
    np.testing.assert_allclose(regions["face"].mean(axis=(1, 2)), face.mean(axis=(1, 2)), rtol=1e-5)  # area pooling


def test_region_masks_area_pool_non_integer_factors_and_batched_input():
    rng = np.random.default_rng(0)
    face = (rng.random((2, FRAMES, 60, 44)) > 0.3).astype(np.float32)
    lip = face * (rng.random(face.shape) > 0.5)
    regions = M.region_masks(face, lip, (8, 6))
    assert regions["face"].shape == (2, FRAMES, 8, 6)
    assert np.all(regions["lip"] <= regions["face"])
    np.testing.assert_allclose(regions["face"].mean(axis=(-2, -1)), face.mean(axis=(-2, -1)), rtol=1e-5)


def test_region_masks_clip_lips_outside_the_face():
    face = np.zeros((1, 8, 8), np.float32)
    face[:, :4] = 1
    lip = np.ones((1, 8, 8), np.float32)
    regions = M.region_masks(face, lip, (4, 4))
    np.testing.assert_array_equal(regions["lip"], regions["face"])


def test_region_masks_reject_0_to_255_masks():
    with pytest.raises(ValueError, match="255"):
        M.region_masks(np.full((1, 8, 8), 255.0), np.zeros((1, 8, 8)), (4, 4))


def test_region_gate_with_unit_weights_is_one_everywhere():
    face, lip = M.masks_from_landmarks(_face_landmarks(), H, W)
    gate = M.combine_region_masks(M.region_masks(face, lip, (8, 8)))
    assert gate.shape == (1, FRAMES, 8, 8)
    np.testing.assert_allclose(gate, 1.0, rtol=1e-6)


def test_region_gate_weights_each_disjoint_region():
    face, lip = M.masks_from_landmarks(_face_landmarks(), H, W)
    regions = M.region_masks(face, lip, (8, 8))
    only_lip = M.combine_region_masks(regions, {"full": 0.0, "face": 0.0, "lip": 1.0})
    np.testing.assert_allclose(only_lip[0], regions["lip"])
    gate = M.combine_region_masks(regions, {"full": 0.5, "face": 1.0, "lip": 2.0})
    expected = 0.5 * (1 - regions["face"]) + (regions["face"] - regions["lip"]) + 2.0 * regions["lip"]
    np.testing.assert_allclose(gate[0], expected, rtol=1e-6)
    assert gate.min() >= 0.5 - 1e-6 and gate.max() <= 2.0 + 1e-6


def test_region_gate_rejects_unknown_region_names():
    regions = M.region_masks(np.ones((1, 8, 8)), np.zeros((1, 8, 8)), (4, 4))
    with pytest.raises(ValueError, match="pose"):
        M.combine_region_masks(regions, {"pose": 1.0})
