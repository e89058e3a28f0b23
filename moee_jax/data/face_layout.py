"""The vocabulary of facial annotations in a clip record (:mod:`moee_jax.data.schema`): the action
units of the ``action_units`` feature and the ``synthetic72`` landmark layout (the synthetic
generator's, :mod:`moee_jax.data.synthetic`) with its named groups."""

from __future__ import annotations

# FACS action units carried per frame (synthetic data; empty for real video).
ACTION_UNITS: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU12", "AU15", "AU20", "AU26")
NUM_AUS = len(ACTION_UNITS)


# The synthetic72 landmark layout: index ranges of each part.
_N_CONTOUR, _N_BROW, _N_EYE, _N_NOSE, _N_OUTER, _N_INNER, _N_CHEEK = 24, 5, 6, 4, 12, 8, 2


def _span(start: int, n: int) -> tuple[int, ...]:
    return tuple(range(start, start + n))


_FACE = _span(0, _N_CONTOUR)
_LBROW, _RBROW = _span(24, _N_BROW), _span(29, _N_BROW)
_LEYE, _REYE = _span(34, _N_EYE), _span(40, _N_EYE)
_NOSE = _span(46, _N_NOSE)
_OUTER, _INNER = _span(50, _N_OUTER), _span(62, _N_INNER)
_CHEEKS = _span(70, _N_CHEEK)
NUM_LANDMARKS = 72

LANDMARK_GROUPS: dict[str, tuple[int, ...]] = {
    "face_oval": _FACE,  # clockwise from the forehead top: 6 = right ear, 12 = chin, 18 = left ear
    "left_brow": _LBROW,  # image-left brow, outer → inner
    "right_brow": _RBROW,  # inner → outer
    "brows": _LBROW + _RBROW,
    "left_eye": _LEYE,  # outer corner, upper outer, upper inner, inner corner, lower inner, lower outer
    "right_eye": _REYE,  # inner corner, upper inner, upper outer, outer corner, lower outer, lower inner
    "eyes": _LEYE + _REYE,
    "nose": _NOSE,  # bridge, tip, left nostril, right nostril
    "outer_lips": _OUTER,  # left corner, upper lip ×5 left → right, right corner, lower lip ×5 right → left
    "inner_lips": _INNER,  # left corner, upper ×3 left → right, right corner, lower ×3 right → left
    "lips": _OUTER,  # the outer contour bounds the lip region (masks_from_landmarks' lip_idx)
    "mouth": _OUTER + _INNER,
    "cheeks": _CHEEKS,
}
