"""Compound emotions mixed in the guided prediction: one batch row per basic emotion of a palette."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moee_jax.diffusion import make_plan, make_schedule
from moee_jax.diffusion.samplers import SamplerConfig, run_sampler
from moee_jax.emotions import EMOTIONS, parse_palette
from moee_jax.inference.compounds import components, compound_rows, mixed_model_fn
from moee_jax.models.conditioning import EmotionSources


def _sources(weights, keep=True):
    w = np.asarray(weights, np.float32)[None]
    return EmotionSources(drop=np.array([[True, True, not keep]]), palette=w, palette_keep=np.array([keep]), label=w)


def test_a_palette_becomes_one_row_per_emotion_as_training_labels_it_and_one_row_without_emotion():
    happy_surprised = _sources(parse_palette("happy:0.6,surprised:0.4"))
    sad = _sources(np.eye(6)[EMOTIONS.index("sadness")])
    sad_fearful = _sources(parse_palette("sad:0.5,fearful:0.5"))
    rows = compound_rows([sad, happy_surprised, sad_fearful])
    assert rows is not None
    np.testing.assert_array_equal(rows.video, [0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows.output, [0, 1, 4])  # each video's frames come from its first row
    h, s, f, sa = (EMOTIONS.index(e) for e in ("happiness", "surprise", "fear", "sadness"))
    for row, index in ((1, h), (2, s), (4, sa), (5, f)):  # one-hot, as training's labels are
        np.testing.assert_array_equal(rows.emotion.palette[row], np.eye(6)[index])
    np.testing.assert_array_equal(rows.emotion.label, rows.emotion.palette)  # the label MLP sees the same weights
    np.testing.assert_array_equal(rows.emotion.palette_keep, [True, True, True, False, True, True, False])
    assert rows.emotion.drop[3].all() and rows.emotion.drop[6].all() and not rows.emotion.drop[1, 2]  # the dropped rows
    want = np.zeros((7, 7), np.float32)
    want[0, 0] = 1.0
    # s_i = w_i / max w (happy 1, surprised 2/3) and 1 − Σ s for the dropped row: with g-guided rows
    # ε(∅) + g(ε_i − ε(∅)) the mixture is ε(∅) + g Σ s_i (ε_i − ε(∅)).
    want[1:4, 1:4] = [1.0, 0.4 / 0.6, 1.0 - 1.0 - 0.4 / 0.6]
    want[4:7, 4:7] = [1.0, 1.0, -1.0]
    np.testing.assert_allclose(rows.mix, want, rtol=1e-6)


def test_labels_speech_and_dropped_emotions_are_not_split():
    assert compound_rows([_sources(np.eye(6)[0]), _sources(np.zeros(6))]) is None
    assert components(_sources(parse_palette("happy:0.5,surprised:0.5"), keep=False)) == []  # no palette on the gate
    assert components(object()) == []  # another kind of condition (e.g. the analysis's interpolated sources)


def test_mixed_rows_follow_the_combined_prediction_through_the_sampler():
    # A denoiser linear in its rows' conditions: rows 0–2 are one compound (two emotions, one row
    # without emotion) starting from the same noise, row 3 a video of its own. One DDIM step is linear
    # in the prediction, so the compound's result is the same combination of what each row gives alone.
    plan = make_plan(SamplerConfig(name="ddim", num_steps=1, spacing="trailing"), make_schedule(num_train_timesteps=1000))
    target = jnp.asarray([1.0, -2.0, 0.5, 3.0])[:, None]
    x_T = jnp.ones((4, 4)) * 0.3

    def model_fn(x, t):
        return 0.5 * x + target

    weights = [1.0, 0.5, -0.5]
    mix = jnp.zeros((4, 4)).at[:3, :3].set(jnp.asarray([weights] * 3)).at[3, 3].set(1.0)
    mixed = run_sampler(plan, mixed_model_fn(model_fn, mix), x_T)
    alone = run_sampler(plan, model_fn, x_T)
    np.testing.assert_allclose(mixed[0], sum(w * alone[i] for i, w in enumerate(weights)), rtol=1e-5)
    np.testing.assert_allclose(mixed[0], mixed[1])  # the compound's rows stay equal
    np.testing.assert_allclose(mixed[0], mixed[2])
    np.testing.assert_allclose(mixed[3], alone[3])  # a video of its own is untouched
