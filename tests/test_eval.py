"""Expression reader and evaluation metrics, against the synthetic generator's ground truth."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moee_jax.data import schema, synthetic
from moee_jax.eval import metrics as M
from moee_jax.eval import reader as R

SIZE = 32
HELD_OUT_IDENTITIES = range(0, 100)  # the small seeds; the reader trains on TRAIN_IDENTITY_SEEDS


@pytest.fixture(scope="module")
def reader():
    return R.train_reader(SIZE, seed=0)


@pytest.fixture(scope="module")
def held_out():
    """Clips of unseen identities, the seven classes at intensity ≥ 0.6, with their reader outputs."""
    return R.reader_dataset(SIZE, HELD_OUT_IDENTITIES, num_clips=105, frames_per_clip=12, intensity_range=(0.6, 1.0), seed=2024)


@pytest.fixture(scope="module")
def held_out_read(reader, held_out):
    return reader.predict(held_out["frames"])


def _per_clip(data, values):
    return [values[data["clip"] == i] for i in np.unique(data["clip"])]


def _clip_labels(data):
    return [int(data["label"][data["clip"] == i][0]) for i in np.unique(data["clip"])]


# ---- the reader ------------------------------------------------------------------------------


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_identity_seeds_are_disjoint_from_held_out_identities(reader):
    low, high = reader.info["identity_seeds"]
    assert low > max(HELD_OUT_IDENTITIES)
    assert list(R.TRAIN_IDENTITY_SEEDS)[0] == low


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_classifies_held_out_identities(held_out, held_out_read):
    result = M.emotion_accuracy(_per_clip(held_out, held_out_read["probs"]), _clip_labels(held_out))
    assert result["accuracy"] >= 0.95, result
    frame_accuracy = np.mean(held_out_read["probs"].argmax(1) == held_out["label"])
    assert frame_accuracy >= 0.85


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_mouth_opening_follows_the_drawn_jaw(held_out, held_out_read):
    r = np.corrcoef(held_out_read["mouth"], held_out["aus"][:, R.JAW])[0, 1]
    assert r >= 0.9, r
    np.testing.assert_array_equal(held_out_read["mouth"], held_out_read["aus"][:, R.JAW])


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_action_units_and_identity_are_close(held_out, held_out_read):
    assert M.au_error(held_out_read["aus"], held_out["aus"])["mae"] < 0.12
    identity = [
        M.identity_error(p, t[0]) for p, t in zip(_per_clip(held_out, held_out_read["identity"]), _per_clip(held_out, held_out["identity"]))
    ]
    assert np.mean([r["mae"] for r in identity]) < 0.08


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_output_shapes_and_ranges(reader, held_out):
    out = reader.predict(held_out["frames"][:5])
    assert out["aus"].shape == (5, synthetic.NUM_AUS)
    assert out["probs"].shape == (5, len(schema.CLASSES))
    assert out["mouth"].shape == (5,)
    assert out["identity"].shape == (5, R.IDENTITY_DIM)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, rtol=1e-5)
    assert (out["aus"] >= 0).all() and (out["aus"] <= 1).all()


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_rejects_frames_of_another_size(reader):
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        reader.predict(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        reader.predict(np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_round_trips_through_a_file(reader, held_out, tmp_path):
    path = tmp_path / "reader.msgpack"
    R.save_reader(reader, path)
    loaded = R.load_reader(path)
    assert loaded.size == reader.size and loaded.info == reader.info
    a, b = reader.predict(held_out["frames"][:8]), loaded.predict(held_out["frames"][:8])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_load_reader_names_a_foreign_file(tmp_path):
    path = tmp_path / "not_a_reader.msgpack"
    path.write_bytes(b"\x00 definitely not msgpack of a reader")
    with pytest.raises(ValueError, match="not_a_reader.msgpack"):
        R.load_reader(path)


def test_recombined_frames_are_drawn_as_generate_clip_draws_them():
    clip = synthetic.generate_clip(10_123, "anger", 0.7, seed=3, num_frames=8, size=SIZE)
    motion = {"head_pose": clip.head_pose, "mouth": clip.mouth_opening}
    data = R.recombined_dataset(
        SIZE, [10_123], motion, num_identities=2, frames_per_identity=6, classes=("anger",), intensity_range=(0.7, 0.7)
    )
    for frame, aus, mouth in zip(data["frames"], data["aus"], data["mouth"]):
        row = int(np.argmin(np.abs(clip.mouth_opening - mouth)))
        np.testing.assert_array_equal(aus, clip.action_units[row])
        # Poses round-trip through float32, which may move an edge pixel at most.
        assert np.mean(np.any(frame != clip.frames[row], axis=-1)) < 0.01
    assert (data["label"] == schema.CLASSES.index("anger")).all()


def test_reader_reads_64_pixel_frames_through_the_internal_resize():
    data = R.reader_dataset(64, R.TRAIN_IDENTITY_SEEDS, num_clips=4, frames_per_clip=2, seed=3)
    small = R.fit_reader(data, steps=2, batch_size=4)
    out = small.predict(data["frames"])
    assert small.size == 64 and out["aus"].shape == (8, synthetic.NUM_AUS)


# ---- training-frame degradations --------------------------------------------------------------


def test_gaussian_blur_keeps_flat_images_and_smooths_edges_more_as_sigma_grows():
    import jax.numpy as jnp

    flat = jnp.full((1, 16, 16, 3), 0.25)
    np.testing.assert_allclose(R.gaussian_blur(flat, jnp.array([0.8])), flat, atol=1e-6)
    step = jnp.broadcast_to((jnp.arange(16) >= 8).astype(jnp.float32)[None, None, :, None], (3, 16, 16, 3)) * 2 - 1
    out = R.gaussian_blur(step, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(out[0], step[0], atol=1e-6)  # σ = 0 leaves the frame as it was
    edge = jnp.abs(out[:, 8, 8, 0] - out[:, 8, 7, 0])  # the jump across the edge
    assert edge[0] == pytest.approx(2.0) and edge[0] > edge[1] > edge[2] > 0.5
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), step.mean(axis=(1, 2, 3)), atol=1e-6)  # no light is lost


def test_degrade_touches_a_share_p_of_the_frames_and_stays_in_range():
    import jax

    x = jax.random.uniform(jax.random.key(0), (400, 8, 8, 3), minval=-1, maxval=1)
    key = jax.random.key(1)
    np.testing.assert_array_equal(R.degrade(key, x, R.Augment(p=0.0)), x)
    y = np.asarray(R.degrade(key, x, R.Augment(p=0.5)))
    changed = np.any(np.abs(y - np.asarray(x)) > 1e-6, axis=(1, 2, 3))
    assert 0.4 < changed.mean() < 0.6
    assert y.min() >= -1.0 and y.max() <= 1.0
    np.testing.assert_array_equal(y, R.degrade(key, x, R.Augment(p=0.5)))  # one key, one draw


def test_augment_names_bad_fields():
    with pytest.raises(ValueError, match="Augment.p"):
        R.Augment(p=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        R.Augment(blur_sigma=-1)
    with pytest.raises(ValueError, match="blurr"):
        R.Augment.from_dict({"blurr": 1.0})
    assert R.Augment.from_dict(None) is None and R.Augment.from_dict({"p": 0.3}) == R.Augment(p=0.3)
    from ml_collections import ConfigDict

    assert R.Augment.from_dict(ConfigDict({"p": 0.3})) == R.Augment(p=0.3)  # as configs/demo.py would give it


def test_a_reader_trained_on_degraded_frames_records_how():
    data = R.reader_dataset(SIZE, R.TRAIN_IDENTITY_SEEDS, num_clips=4, frames_per_clip=2, seed=3)
    small = R.fit_reader(data, steps=2, batch_size=4, augment=R.Augment(p=1.0))
    assert R.Augment.from_dict(small.info["augment"]) == R.Augment(p=1.0)
    plain = R.fit_reader(data, steps=2, batch_size=4)
    assert plain.info["augment"] is None
    # Same seed, same batches: only the degraded frames can make the weights differ.
    assert not np.allclose(small.params["stem"]["kernel"], plain.params["stem"]["kernel"])


def test_cached_reader_retrains_when_the_degradations_differ(tmp_path, monkeypatch):
    from moee_jax.eval import evaluate as E

    data = R.reader_dataset(SIZE, R.TRAIN_IDENTITY_SEEDS, num_clips=4, frames_per_clip=2, seed=3)
    trained = []

    def train(size, *, steps, render_size, blend_fraction, augment):
        trained.append(augment)
        reader = R.fit_reader(data, steps=steps, batch_size=4, augment=augment)
        reader.info["render_size"] = render_size
        return reader

    monkeypatch.setattr(R, "train_reader", train)
    path = tmp_path / "reader.msgpack"
    E.cached_reader(path, SIZE, 2)
    E.cached_reader(path, SIZE, 2)  # the same request: loaded, not trained
    E.cached_reader(path, SIZE, 2, augment={"p": 0.5})
    E.cached_reader(path, SIZE, 2, augment={"p": 0.5})
    assert trained == [None, R.Augment(p=0.5)]


# ---- metrics: perfect and chance predictions -------------------------------------------------


def test_perfect_predictions_score_perfectly():
    clip = synthetic.generate_clip(3, "anger", 0.8, seed=1, num_frames=10, size=SIZE)
    onehot = np.eye(len(schema.CLASSES))[[schema.CLASSES.index("anger")] * 10]
    assert M.emotion_accuracy([onehot], ["anger"])["accuracy"] == 1.0
    assert M.au_error(clip.action_units, clip.action_units)["mae"] == 0.0
    truth = schema.identity_vector(clip.identity)
    assert M.identity_error(np.repeat(truth[None], 10, 0), clip.identity)["mae"] == 0.0


def test_shuffled_labels_give_chance_accuracy():
    rng = np.random.default_rng(0)
    k = len(schema.CLASSES)
    labels = np.repeat(np.arange(k), 200)
    probs = [np.eye(k)[[c] * 4] for c in labels]
    shuffled = rng.permutation(labels)
    result = M.emotion_accuracy(probs, shuffled)
    assert abs(result["accuracy"] - 1 / k) < 0.04
    assert M.emotion_accuracy(probs, labels)["accuracy"] == 1.0


def test_emotion_accuracy_counts_the_confusion_of_clip_means():
    k = len(schema.CLASSES)
    happy, sad = schema.CLASSES.index("happiness"), schema.CLASSES.index("sadness")
    # First frame says sadness, the other three happiness: the clip mean is happiness.
    clip = np.eye(k)[[sad, happy, happy, happy]]
    result = M.emotion_accuracy([clip, clip], ["happiness", "sad"])
    assert result["accuracy"] == 0.5
    assert result["confusion"][happy][happy] == 1 and result["confusion"][sad][happy] == 1
    # The first frames (carried over from the reference) are left out when asked.
    sad_start = np.eye(k)[[sad, sad, sad, happy, happy]]
    assert M.emotion_accuracy([sad_start], ["happiness"])["predictions"] == [sad]
    assert M.emotion_accuracy([sad_start], ["happiness"], skip_frames=3)["accuracy"] == 1.0


def test_emotion_accuracy_names_bad_inputs():
    k = len(schema.CLASSES)
    with pytest.raises(ValueError, match=r"probs_per_clip\[1\]"):
        M.emotion_accuracy([np.ones((3, k)) / k, np.ones((3, 5))], [0, 1])
    with pytest.raises(ValueError, match=r"target_classes\[0\]"):
        M.emotion_accuracy([np.ones((3, k)) / k], ["bored"])
    with pytest.raises(ValueError, match="2 clips but target_classes has 1"):
        M.emotion_accuracy([np.ones((3, k)) / k] * 2, [0])


# ---- metrics: compounds ----------------------------------------------------------------------


def test_compound_clip_shows_both_components_and_a_single_emotion_does_not():
    compound = synthetic.generate_clip(5, "happily_surprised", 0.8, seed=2, num_frames=20, size=SIZE)
    happy = synthetic.generate_clip(5, "happiness", 0.8, seed=2, num_frames=20, size=SIZE)
    yes = M.compound_components(compound.action_units, "happily_surprised", intensity=0.8)
    no = M.compound_components(happy.action_units, "happily_surprised", intensity=0.8)
    assert yes["both_present"] and yes["components"]["surprise"]["score"] == 1.0
    assert not no["both_present"]
    assert no["components"]["happiness"]["present"] and no["components"]["surprise"]["score"] == 0.0


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_judges_a_generated_compound_clip(reader):
    compound = synthetic.generate_clip(7, "happily_surprised", 0.9, seed=4, num_frames=20, size=SIZE)
    happy = synthetic.generate_clip(7, "happiness", 0.9, seed=4, num_frames=20, size=SIZE)
    read_c, read_h = reader.predict(compound.frames), reader.predict(happy.frames)
    yes = M.compound_components(read_c["aus"], "happily_surprised", intensity=0.9, probs=read_c["probs"])
    no = M.compound_components(read_h["aus"], "happily_surprised", intensity=0.9, probs=read_h["probs"])
    assert yes["both_present"], yes
    assert not no["both_present"], no
    assert "top2" in yes and len(yes["top2"]) == 2


def test_clips_of_one_component_alone_are_the_compound_checks_false_alarms():
    from moee_jax.eval.evaluate import component_alone_judgements

    clips = {e: synthetic.generate_clip(5, e, 1.0, seed=3, num_frames=12, size=SIZE) for e in ("happiness", "surprise", "fear")}
    basic = {e: c.action_units for e, c in clips.items()}
    judged = component_alone_judgements(basic, "happily_surprised")
    assert len(judged) == 2 and not any(j["both_present"] for j in judged)
    assert component_alone_judgements(basic, "sadly_fearful")[0]["components"]["fear"]["present"]  # sadness's clip is missing
    compound = synthetic.generate_clip(5, "happy:0.5,surprised:0.5", 1.0, seed=3, num_frames=12, size=SIZE)
    summary = M.summarize(compounds=[M.compound_components(compound.action_units, "happily_surprised")],
                          compound_false_positives=judged + [M.compound_components(compound.action_units, "happily_surprised")])  # fmt: skip
    assert summary["headline"]["compound_both_present_rate"] == 1.0  # a 50/50 palette passes on its true AUs
    assert summary["headline"]["compound_false_positive_rate"] == pytest.approx(1 / 3)
    assert "judged to show both: 0.333 (3 clips)" in M.to_markdown(summary)


def test_compound_check_ignores_the_speaking_jaw():
    # A fully open speaking mouth (AU26 = 1) is not surprise: the check reads brows and lids.
    aus = np.zeros((10, synthetic.NUM_AUS))
    aus[:, synthetic.ACTION_UNITS.index("AU26")] = 1.0
    aus[:, synthetic.ACTION_UNITS.index("AU12")] = 1.0
    aus[:, synthetic.ACTION_UNITS.index("AU6")] = 0.8
    result = M.compound_components(aus, "happily_surprised")
    assert "AU26" not in result["components"]["surprise"]["aus"]
    assert not result["both_present"]


def test_compound_components_names_an_unknown_compound():
    with pytest.raises(ValueError, match="sleepily_bored"):
        M.compound_components(np.zeros((3, synthetic.NUM_AUS)), "sleepily_bored")


# ---- metrics: lip sync -----------------------------------------------------------------------


def test_true_mouth_is_in_sync_and_a_shuffled_one_is_not():
    clip = synthetic.generate_clip(11, "happiness", 0.7, seed=5, num_frames=125, size=SIZE)
    synced = M.lip_sync(clip.mouth_opening, clip.audio, clip.fps)
    assert synced["pearson"] > 0.8 and synced["best_lag"] == 0
    shuffled = np.random.default_rng(0).permutation(clip.mouth_opening)
    assert abs(M.lip_sync(shuffled, clip.audio, clip.fps)["pearson"]) < 0.3


def test_lip_sync_finds_a_delayed_mouth():
    clip = synthetic.generate_clip(12, "anger", 0.7, seed=6, num_frames=125, size=SIZE)
    late = np.concatenate([np.zeros(2), clip.mouth_opening[:-2]])
    result = M.lip_sync(late, clip.audio, clip.fps)
    assert result["best_lag"] == 2 and result["best_lag_pearson"] > result["pearson"]


def test_lip_sync_of_a_still_mouth_is_zero():
    clip = synthetic.generate_clip(13, "neutral", seed=7, num_frames=30, size=SIZE)
    assert M.lip_sync(np.full(30, 0.3), clip.audio, clip.fps)["pearson"] == 0.0


def test_lip_sync_refuses_audio_shorter_than_the_video():
    clip = synthetic.generate_clip(13, "neutral", seed=7, num_frames=30, size=SIZE)
    with pytest.raises(ValueError, match="fewer than the 40 mouth frames"):
        M.lip_sync(np.zeros(40), clip.audio, clip.fps)


@pytest.mark.slow  # trains the reader (~4 CPU minutes); the demo measures the trained reader's ceiling
def test_reader_mouth_is_in_sync_with_the_audio(reader):
    clip = synthetic.generate_clip(17, "happiness", 0.8, seed=8, num_frames=75, size=SIZE)
    result = M.lip_sync(reader.predict(clip.frames)["mouth"], clip.audio, clip.fps)
    assert result["pearson"] > 0.8, result


# ---- metrics: identity and summary -----------------------------------------------------------


def test_identity_error_measures_visible_parameters_only():
    ident = dataclasses.asdict(synthetic.Identity.from_seed(21))
    truth = schema.identity_vector(ident)
    other = truth.copy()
    other[-1] += 50.0  # a different pitch is invisible
    assert M.identity_error(other, truth)["mae"] == 0.0
    other[0] += 0.23  # face_width
    result = M.identity_error(other, truth)
    assert result["per_field"]["face_width"] == pytest.approx(0.23, abs=1e-6)
    assert result["mae"] == pytest.approx(0.23 / (M.IDENTITY_DIM - 1), abs=1e-6)


def test_summary_is_json_ready_and_renders_as_markdown():
    clip = synthetic.generate_clip(3, "happily_surprised", 0.8, seed=1, num_frames=25, size=SIZE)
    k = len(schema.CLASSES)
    summary = M.summarize(
        emotion=M.emotion_accuracy([np.eye(k)[[0] * 5]], ["happiness"]),
        action_units=[M.au_error(clip.action_units, clip.action_units)],
        compounds=[M.compound_components(clip.action_units, clip.emotion, intensity=0.8, probs=np.eye(k)[[0, 5] * 3])],
        lip_sync=[M.lip_sync(clip.mouth_opening, clip.audio, clip.fps)],
        identity=[M.identity_error(schema.identity_vector(clip.identity), clip.identity)],
    )
    assert json.loads(json.dumps(summary)) == summary
    head = summary["headline"]
    assert head["emotion_accuracy"] == 1.0 and head["au_mae"] == 0.0 and head["identity_mae"] == 0.0
    assert head["compound_both_present_rate"] == 1.0 and head["compound_top2_match_rate"] == 1.0
    text = M.to_markdown(summary)
    assert "| emotion_accuracy | 1.000 |" in text and "happily_surprised" in text
