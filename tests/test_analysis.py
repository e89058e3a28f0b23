"""Latent-space analysis (`moee_jax.analysis`) and its notebook, executed end to end.

Numeric properties are checked on synthetic latents with a known answer; extraction, gates and
interpolation on a tiny run (`embedder` + `stage2` exported with initialised parameters, as
test_animate does: no training, the properties hold for any parameters).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.analysis import clustering, extract, figures, gates, interpolation, projection, report
from moee_jax.analysis.animator import AnalysisAnimator
from moee_jax.analysis.extract import ClipLatents
from moee_jax.data import schema
from moee_jax.data.schema import CLASSES
from moee_jax.inference.inputs import EmotionSpec, parse_emotion

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "latent_space_analysis.ipynb"
STEPS = 2
SECONDS = 0.3  # 8 frames: two clips of the tiny model


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """A run with the `embedder` and `stage2` stages of the tiny configs, as `moee train` leaves them."""
    return tiny_run


@pytest.fixture(scope="module")
def animator(run_dir):
    return AnalysisAnimator.from_run(run_dir)


@pytest.fixture(scope="module")
def latents(run_dir, animator):
    return extract.extract_latents(run_dir, split="test", windows_per_clip=2, animator=animator)


@pytest.fixture(scope="module")
def face_and_speech(synthetic_tfds, animator):
    return interpolation.portrait_and_speech(*synthetic_tfds, animator.size, seconds=SECONDS)


def _blobs(rng, classes=3, per_class=20, dim=8, spread=0.3, distance=10.0):
    """Well-separated Gaussian clusters: ``(x (N, dim), labels (N,))``."""
    centres = rng.normal(size=(classes, dim)) * distance
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + spread * rng.normal(size=(labels.size, dim)), np.asarray([f"c{i}" for i in labels])


def _fake_latents(emotions, global_gates, local_gates: dict[str, np.ndarray], size=8) -> ClipLatents:
    n = len(emotions)
    classes = np.asarray([CLASSES.index(e) if e in CLASSES else -1 for e in emotions])
    return ClipLatents(
        clip_id=np.asarray([f"s/{i}" for i in range(n)]), speaker=np.asarray(["s"] * n), emotion=np.asarray(emotions),
        emotion_class=classes, intensity=np.ones(n, np.float32), palette=np.zeros((n, 6), np.float32), start=np.zeros(n, np.int64),
        frames=np.zeros((n, size, size, 3), np.uint8), mu={}, sigma={}, tokens={}, global_gates=np.asarray(global_gates, np.float32),
        local_gates=local_gates, layers=tuple(local_gates), timestep=500,
    )  # fmt: skip


# ---- projection ------------------------------------------------------------------------------------------


def test_pca_axes_are_orthonormal_ordered_by_variance_and_reconstruct_the_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([10.0, 5.0, 2.0, 1.0, 0.5]) @ np.linalg.qr(rng.normal(size=(5, 5)))[0]
    fit = projection.fit_pca(x)
    np.testing.assert_allclose(fit.components @ fit.components.T, np.eye(5), atol=1e-10)
    assert np.all(np.diff(fit.variance) <= 0)
    y = projection.pca(x, 2)
    np.testing.assert_allclose(y.var(axis=0, ddof=1), fit.variance[:2], rtol=1e-10)
    np.testing.assert_allclose(np.corrcoef(y.T)[0, 1], 0.0, atol=1e-10)
    np.testing.assert_allclose(fit.inverse(fit.transform(x)), x, atol=1e-9)


def test_explained_variance_sums_to_one_and_needs_only_the_true_rank():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 12))  # rank 3 in 12 dimensions
    explained = projection.explained_variance(x)
    assert math.isclose(explained.sum(), 1.0, rel_tol=1e-9) and np.all(np.diff(explained) <= 1e-12)
    reach = projection.components_to_reach(explained, (0.5, 0.9, 0.999999))
    assert reach[0.999999] == 3 and reach[0.5] <= reach[0.9] <= 3
    assert projection.components_to_reach(np.full(4, 0.25), (0.5, 1.0)) == {0.5: 2, 1.0: 4}


def test_tsne_keeps_well_separated_clusters_apart():
    x, labels = _blobs(np.random.default_rng(2), per_class=12)
    y = projection.tsne(x, seed=0)
    d = np.linalg.norm(y[:, None] - y[None], axis=-1) + np.eye(len(y)) * 1e9
    assert np.all(labels[d.argmin(axis=1)] == labels)  # every point's nearest neighbour is of its cluster


# ---- clustering strength ---------------------------------------------------------------------------------


def test_clustering_strength_follows_its_definition_on_a_hand_computed_example():
    # Centroids (0,0), (4,0), (0,3); every member 1 from its centroid.
    x = np.array([[0, 1], [0, -1], [4, 1], [4, -1], [1, 3], [-1, 3]], float)
    s = clustering.clustering_strength(x, ["a", "a", "b", "b", "c", "c"])
    assert s == pytest.approx({"a": (4 + 3) / 2, "b": (4 + 5) / 2, "c": (3 + 5) / 2})


def test_clustering_strength_of_separated_clusters_is_larger_than_with_shuffled_labels():
    rng = np.random.default_rng(3)
    x, labels = _blobs(rng)
    separated = clustering.clustering_strength(x, labels)
    shuffled = clustering.clustering_strength(x, rng.permutation(labels))
    assert min(separated.values()) > 10 * max(shuffled.values())
    assert max(shuffled.values()) < 1.5  # centroids of random halves nearly coincide


def test_within_speaker_strength_ignores_offsets_between_identities():
    rng = np.random.default_rng(4)
    x, labels = _blobs(rng, per_class=10, distance=1.0, spread=0.1)
    speakers = np.asarray([f"s{i % 5}" for i in range(len(labels))])
    shifted = x + 50.0 * rng.normal(size=(5, x.shape[1]))[np.arange(len(labels)) % 5]  # each identity moved far away
    within = clustering.clustering_strength(shifted, labels, groups=speakers)
    pooled = clustering.clustering_strength(shifted, labels)
    alone = clustering.clustering_strength(x, labels, groups=speakers)
    assert within == pytest.approx(alone)
    assert min(within.values()) > 5 * max(pooled.values())


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_clustering_table_and_markdown_have_the_table_5_layout(latents):
    table = clustering.clustering_table(latents)
    assert list(table) == ["audio", "video", "both"]
    columns = [c for c in CLASSES if c in set(latents.emotion.tolist())] + ["mean"]
    assert all(list(row) == columns for row in table.values())
    assert all(math.isfinite(v) and v > 0 for row in table.values() for v in row.values())
    for row in table.values():
        assert row["mean"] == pytest.approx(np.mean([row[c] for c in columns[:-1]]))
    md = clustering.clustering_markdown(table)
    lines = md.strip().splitlines()
    assert lines[0] == "| input | " + " | ".join(columns) + " |" and len(lines) == 5
    assert lines[2].startswith("| audio | ") and lines[4].startswith("| both | ")
    assert f"{table['video']['mean']:.2f}" in lines[3]
    special = clustering.clustering_markdown({"tokens": {"happiness": math.inf, "sadness": math.nan, "mean": 2.0}})
    assert "| tokens | ∞ | – | 2.00 |" in special


# ---- extraction -----------------------------------------------------------------------------------------


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_extraction_has_a_row_per_window_with_the_records_metadata(latents, synthetic_tfds):
    from moee_jax.data.pipeline import open_source

    source = open_source(*synthetic_tfds, "test")
    assert len(latents) == 2 * len(source)
    by_id = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    for row in range(len(latents)):
        record = by_id[latents.clip_id[row]]
        assert latents.emotion[row] == record["emotion"].decode() and latents.speaker[row] == record["speaker"].decode()
        assert latents.emotion_class[row] == record["emotion_class"]
        np.testing.assert_array_equal(latents.palette[row], record["palette"])
    compounds = latents.emotion[~latents.basic]
    assert len(compounds) == 2 * 2 * 4 and not set(compounds.tolist()) & set(CLASSES)  # 2 speakers × 4 compounds × 2 windows
    assert latents.frames.shape == (len(latents), 32, 32, 3) and latents.frames.dtype == np.uint8
    assert extract.emotion_order(latents)[: len(extract.class_names(latents))] == extract.class_names(latents)


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_windows_are_drawn_as_the_pipeline_draws_them_and_are_seeded(run_dir, animator, synthetic_tfds):
    from moee_jax.data.pipeline import open_source

    assert extract.run_dataset(run_dir) == synthetic_tfds
    source = open_source(*synthetic_tfds, "test")
    windows = extract.window_samples(source, animator.config, [0, 1], 3, seed=7)
    assert [int(w["clip_key"]) for w in windows] == [0, 0, 0, 1, 1, 1]
    assert all(w["frames"].shape == (4, 32, 32, 3) and not w["drop_audio"] and not w["noisy"] for w in windows)
    again = extract.window_samples(source, animator.config, [0, 1], 3, seed=7)
    assert [int(w["start"]) for w in again] == [int(w["start"]) for w in windows]
    other = extract.window_samples(source, animator.config, [0, 1], 3, seed=8)
    assert [int(w["start"]) for w in other] != [int(w["start"]) for w in windows]
    first = schema.decode_frames(source[0]["frames"], [int(windows[0]["start"])])[0]
    assert abs(windows[0]["frames"][0].astype(float).mean() - first.astype(float).mean()) < 2.0  # that frame, resized to 32²


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_the_embedder_comes_from_the_embedder_stage_and_is_absent_without_one(run_dir, animator, tmp_path):
    embedder = extract.load_embedder(run_dir, animator)
    assert embedder.module.dim == 16 and "visual" in embedder.params
    (tmp_path / "stage2").symlink_to(run_dir / "stage2")  # a run without the embedder stage
    assert extract.load_embedder(tmp_path, animator) is None and not animator.uses_embedder
    assert extract.token_kinds(animator) == ("label", "audio")


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_video_emotion_sources_are_the_clips_own_masked_frames_and_speech(animator):
    sample = {
        "frames": np.full((4, 32, 32, 3), 255, np.uint8),
        "mouth_mask": np.eye(16, dtype=np.float32)[None].repeat(4, 0),
        "mel": np.arange(8 * 32, dtype=np.float32).reshape(8, 32),
        "palette": np.eye(6, dtype=np.float32)[0],
    }
    sources = extract.clip_emotion_sources(animator, sample, "video")
    np.testing.assert_allclose(sources.expression_frames, 1.0)
    assert sources.mouth_mask.shape == (1, 4, 32, 32) and sources.mouth_mask[0, 0, 5, 4] == 1.0  # 2× nearest upsampling
    np.testing.assert_array_equal(sources.embedder_audio[0], sample["mel"][2:6])  # the F target frames, context dropped
    assert not sources.palette_keep.any()  # the clip carries the emotion: the gate network acts
    with pytest.raises(ValueError, match="kind"):
        extract.clip_emotion_sources(animator, sample, "text")


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_selecting_rows_keeps_every_per_row_array_aligned(latents):
    picked = latents.select(latents.emotion == "happiness")
    assert len(picked) == int((latents.emotion == "happiness").sum()) > 0 and set(picked.emotion.tolist()) == {"happiness"}
    rows = np.nonzero(latents.emotion == "happiness")[0]
    np.testing.assert_array_equal(picked.mu["both"], latents.mu["both"][rows])
    np.testing.assert_array_equal(picked.tokens["label"], latents.tokens["label"][rows])
    layer = latents.layers[0]
    np.testing.assert_array_equal(picked.local_gates[layer], latents.local_gates[layer][rows])
    np.testing.assert_array_equal(picked.frames, latents.frames[rows])


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_embedder_priors_are_the_embedder_stage_on_training_inputs(latents, run_dir, synthetic_tfds):
    """Row 0 recomputed the way the embedder stage computes it from a pipeline batch, per mode; the
    video-only prior has σ² = 0 (absent audio is zeroed audio: uniform queries), so σ = √eps."""
    from moee_jax.data.pipeline import open_source
    from moee_jax.models.features import embedder_inputs

    embedder = extract.load_embedder(run_dir)
    source = open_source(*synthetic_tfds, "test")
    keys = [i for i in range(len(source)) if source[i]["id"].decode() == latents.clip_id[0]]
    sample = extract.window_samples(source, embedder.config, keys, 1, 0)[0]
    d = embedder.config.data
    batch = {k: jnp.asarray(v)[None] for k, v in sample.items()}
    audio, frames, mouth = embedder_inputs(batch, d.num_frames, d.audio_context_frames, d.mask_downsample)
    for mode, args in (("audio", (audio, None, None)), ("video", (None, frames, mouth)), ("both", (audio, frames, mouth))):
        prior = embedder.module.apply({"params": embedder.params}, *args, deterministic=True)
        np.testing.assert_allclose(latents.mu[mode][0], np.asarray(prior.mu[0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(latents.sigma[mode][0], np.asarray(prior.sigma[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latents.sigma["video"], math.sqrt(embedder.module.eps), rtol=1e-3)
    assert not np.allclose(latents.mu["both"], latents.mu["video"]) and not np.allclose(latents.mu["both"], latents.mu["audio"])


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_label_tokens_are_the_conditioning_of_a_training_sample(latents, animator, run_dir, synthetic_tfds):
    """Emotion-to-Latents over the clip's palette alone, as training's label mode conditions it;
    speech-only tokens are those of the speech with the label dropped."""
    from moee_jax.data.pipeline import open_source
    from moee_jax.models.conditioning import EmotionSources

    source = open_source(*synthetic_tfds, "test")
    keys = [i for i in range(len(source)) if source[i]["id"].decode() == latents.clip_id[0]]
    sample = extract.window_samples(source, animator.config, keys, 1, 0)[0]
    speech = animator.system.speech_features(jnp.asarray(sample["mel"])[None])
    params = {"params": animator.params["conditioning"]}
    for kind, label, drop in (("label", sample["palette"], [True, True, False]), ("audio", np.zeros(6), [True, False, True])):
        label = jnp.asarray(label, jnp.float32)[None]
        sources = EmotionSources(drop=jnp.asarray([drop]), palette=label, palette_keep=jnp.asarray([False]), label=label, speech=speech)
        tokens = animator.system.conditioning.apply(params, None, sources, train=False).emotion.tokens[0]
        np.testing.assert_allclose(latents.tokens[kind][0], np.asarray(tokens), rtol=1e-5, atol=1e-6)
    assert not np.allclose(latents.tokens["label"], latents.tokens["audio"])


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_gates_are_a_softmax_over_experts_and_sigmoid_maps_at_each_layers_resolution(latents):
    n = len(latents)
    assert latents.global_gates.shape == (n, len(latents.layers), 6)
    # A softmax over the six experts and "no expert" (neutral): the experts' shares sum to at most 1.
    assert (latents.global_gates >= 0).all() and (latents.global_gates.sum(-1) <= 1.0 + 1e-5).all()
    # The tiny U-Net: 16² latents at level 0 (down and up blocks), 8² in the middle block.
    sizes = {layer: latents.local_gates[layer].shape[1:3] for layer in latents.layers}
    assert sizes["mid_block/attentions_0/transformer_blocks_0"] == (8, 8)
    assert sizes["down_blocks_0/attentions_0/transformer_blocks_0"] == (16, 16)
    for maps in latents.local_gates.values():
        assert maps.shape[0] == n and maps.shape[-1] == 6 and np.all((maps > 0) & (maps < 1))
    # The model's own gates differ between clips (no palette forces them).
    assert np.ptp(latents.global_gates[:, 0, 0]) > 0


# ---- gates -------------------------------------------------------------------------------------------------


def test_global_gate_matrix_averages_each_emotions_clips_in_class_order():
    g = np.zeros((4, 2, 6))
    g[0, :, 0] = g[1, :, 2] = 1.0  # two happy clips: expert 0, then 2
    g[2, :, 1] = g[3, :, 1] = 1.0  # two sad clips: expert 1
    g[:, 1] = g[:, 1, ::-1]  # layer 1 reversed
    fake = _fake_latents(
        ["happiness", "sadness", "happiness", "sadness"], g[[0, 2, 1, 3]], {"a": np.zeros((4, 2, 2, 6)), "b": np.zeros((4, 2, 2, 6))}
    )
    names, matrix = gates.global_gate_matrix(fake)
    assert names == ("happiness", "sadness")
    np.testing.assert_allclose(matrix[0], [0.25, 0, 0.25, 0.25, 0, 0.25])
    np.testing.assert_allclose(matrix[1], [0, 0.5, 0, 0, 0.5, 0])
    _, first = gates.global_gate_matrix(fake, layers=["a"])
    np.testing.assert_allclose(first[0], [0.5, 0, 0.5, 0, 0, 0])


def test_expert_maps_bring_layers_to_one_resolution_before_averaging():
    fine = np.zeros((1, 4, 4, 6))
    fine[0, :, :2, 3] = 1.0  # expert 3 on the left half
    coarse = np.full((1, 2, 2, 6), 0.5)
    fake = _fake_latents(["anger"], np.full((1, 2, 6), 1 / 6), {"fine": fine, "coarse": coarse})
    maps = gates.expert_maps(fake)
    assert maps.shape == (1, 4, 4, 6)
    np.testing.assert_allclose(maps[0, :, :2, 3], 0.75)
    np.testing.assert_allclose(maps[0, :, 2:, 3], 0.25)
    np.testing.assert_allclose(maps[..., 0], 0.25)
    np.testing.assert_array_equal(gates.expert_maps(fake, ["fine"]), fine)
    names, mean = gates.mean_maps(fake)
    assert names == ("anger",) and mean.shape == (1, 4, 4, 6)
    with pytest.raises(ValueError, match="unknown layer"):
        gates.expert_maps(fake, ["nope"])


def test_overlay_blends_the_face_with_a_heat_map_peaked_where_the_gate_is():
    rng = np.random.default_rng(5)
    face = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heat = np.zeros((8, 8))
    heat[1, 6] = 1.0
    np.testing.assert_array_equal(gates.overlay(face, heat, alpha=0.0), face)
    colour = gates.overlay(face, heat, alpha=1.0, cmap="gray")
    brightest = np.unravel_index(colour.sum(-1).argmax(), colour.shape[:2])
    assert 4 <= brightest[0] < 8 and 24 <= brightest[1] < 28  # inside the cell (1, 6) of the 8×8 grid
    assert colour.shape == face.shape and colour.dtype == np.uint8
    flat = gates.overlay(face, np.full((8, 8), 0.3), alpha=1.0, cmap="gray", vmin=0.0, vmax=1.0)
    assert np.all(np.abs(flat.astype(int) - round(0.3 * 255)) <= 1)
    np.testing.assert_allclose(gates.resize_map(np.full((3, 5, 2), 0.7), (12, 20)), 0.7, rtol=1e-6)


# ---- interpolation ------------------------------------------------------------------------------------------


def assert_same_render(batched, alone):
    """Videos rendered in one batch and alone are equal up to float rounding: at most one grey level
    on a few pixels."""
    assert batched.shape == alone.shape
    assert np.abs(batched.astype(int) - alone).max() <= 1 and np.mean(batched != alone) < 1e-3


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_latent_interpolation_ends_are_the_two_emotions_renders(animator, face_and_speech):
    face, speech = face_and_speech
    happy, sad = parse_emotion("happy"), parse_emotion("sad")
    interp = interpolation.interpolate(animator, face, speech, happy, sad, alphas=3, steps=STEPS)
    assert interp.frames.shape == (3, 8, 32, 32, 3) and interp.mode == "latent"
    ends = [animator.animate(face, speech, e, steps=STEPS, detect=False).frames for e in (happy, sad)]
    assert_same_render(interp.frames[0], ends[0])
    assert_same_render(interp.frames[-1], ends[1])
    assert all(np.abs(interp.frames[1].astype(int) - end).mean() > 1 for end in ends)


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_palette_interpolation_is_the_mixed_palette_with_one_emotion_palettes_at_the_ends(animator, face_and_speech):
    face, speech = face_and_speech
    interp = interpolation.interpolate(animator, face, speech, parse_emotion("happy"), parse_emotion("sad"), alphas=[0.0, 0.25],
                                       mode="palette", steps=STEPS)  # fmt: skip
    for frames, spec in zip(interp.frames, ("happy:1,sad:0", "happy:0.75,sad:0.25")):
        assert_same_render(frames, animator.animate(face, speech, parse_emotion(spec), steps=STEPS, detect=False).frames)
    assert interpolation.palette_spec(np.eye(6)[1]).spec == "sadness:1"


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_latent_interpolation_refuses_a_palette_at_one_end_only(animator, face_and_speech):
    face, speech = face_and_speech
    with pytest.raises(ValueError, match="gate at one end only"):  # a label sets the gate, speech alone does not
        interpolation.interpolate(animator, face, speech, parse_emotion("happy"), EmotionSpec("audio"), alphas=2, steps=STEPS)
    with pytest.raises(ValueError, match="label or palette"):
        interpolation.interpolate(animator, face, speech, parse_emotion("happy"), EmotionSpec("audio"), alphas=2, mode="palette")


def test_frame_strip_and_video_lay_the_renders_out_by_alpha(tmp_path):
    from moee_jax.data.video_io import read_video

    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (3, 10, 16, 16, 3), dtype=np.uint8)
    interp = interpolation.Interpolation(np.linspace(0, 1, 3), frames, np.zeros(6400, np.float32), 25.0, "latent", ("a", "b"))
    strip = interpolation.frame_strip(interp, columns=4)
    assert strip.shape == (3 * 16, 4 * 16, 3)
    np.testing.assert_array_equal(strip[16:32, 48:64], frames[1, 9])  # row α₁, last column = last frame
    np.testing.assert_array_equal(strip[:16, 16:32], frames[0, 3])
    video, fps, audio = read_video(interpolation.save_video(interp, tmp_path / "v.mp4"))
    assert video.shape == (10, 16, 48, 3) and fps == pytest.approx(25.0) and audio is not None


def test_portrait_and_speech_come_from_a_neutral_clip_of_the_split(synthetic_tfds):
    from moee_jax.data.pipeline import open_source

    face, speech = interpolation.portrait_and_speech(*synthetic_tfds, 32, seconds=0.5)
    assert face.shape == (32, 32, 3) and speech.wave.shape == (8000,)
    source = open_source(*synthetic_tfds, "test")
    record = next(source[i] for i in range(len(source)) if source[i]["id"].decode() in str(speech.path))
    assert record["emotion"].decode() == "neutral"
    np.testing.assert_array_equal(speech.wave, record["audio"][:8000])
    big = schema.decode_frames(record["frames"], [0])[0]
    assert abs(face.astype(float).mean() - big.astype(float).mean()) < 2.0  # the same frame, area-downsampled


# ---- figures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_projection_figure_draws_each_emotion_and_the_compounds(latents, plt):
    fig = figures.projection(projection.pca(latents.mu["both"]), latents)
    labels = [c.get_label() for c in fig.axes[0].collections]
    assert labels == [*extract.class_names(latents), "compound"]
    offsets = {c.get_label(): c.get_offsets() for c in fig.axes[0].collections}
    assert len(offsets["compound"]) == int((~latents.basic).sum()) and len(offsets["happiness"]) == 4
    both = figures.projections(latents, report.latent_sets(latents), "pca")
    assert [ax.get_title() for ax in both.axes] == ["PCA: embedder μ (audio+video)", "PCA: tokens (label)", "PCA: tokens (audio)"]


def test_table_and_gate_figures_show_their_numbers(plt, tmp_path):
    table = {"audio": {"happiness": 2.0, "sadness": 3.0, "mean": 2.5}, "video": {"happiness": 6.0, "sadness": math.nan, "mean": 6.0}}
    bars = figures.clustering_bars(table)
    assert sorted(p.get_height() for p in bars.axes[0].patches) == [0.0, 2.0, 2.5, 3.0, 6.0, 6.0]
    matrix = np.random.default_rng(7).dirichlet(np.ones(6), size=3)
    heat = figures.global_gates(("happiness", "sadness", "anger"), matrix)
    np.testing.assert_array_equal(heat.axes[0].images[0].get_array(), matrix)
    assert len(heat.axes[0].texts) == 18
    path = figures.save(heat, tmp_path / "figs", "gates")
    assert path == tmp_path / "figs" / "gates.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = figures.explained_variance({"x": np.array([0.7, 0.2, 0.1])})
    np.testing.assert_allclose(curves.axes[1].lines[0].get_ydata(), [0.7, 0.9, 1.0])


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_gate_overlay_and_strip_figures_hold_the_overlays_and_the_strip(latents, plt):
    fig = figures.gate_overlays(latents, emotions=["happiness", "sadness"])
    assert len(fig.axes) == 2 * 7  # rows: emotions; columns: the face, then the six experts
    _, maps = gates.mean_maps(latents, ["happiness", "sadness"])
    face = latents.frames[np.nonzero(latents.emotion == "sadness")[0][0]]
    np.testing.assert_array_equal(fig.axes[7].images[0].get_array(), face)
    expected = gates.overlay(face, maps[1, ..., 2], alpha=0.55, vmin=maps.min(), vmax=maps.max())  # sadness × E_anger
    np.testing.assert_array_equal(fig.axes[7 + 3].images[0].get_array(), expected)
    layers = figures.layer_maps(latents, 1)
    assert len(layers.axes) == len(latents.layers) * 6
    frames = np.random.default_rng(8).integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    interp = interpolation.Interpolation(np.array([0.0, 1.0]), frames, np.zeros(3200, np.float32), 25.0, "palette", ("a", "b"))
    strip = figures.strip(interp, columns=3)
    np.testing.assert_array_equal(strip.axes[0].images[0].get_array(), interpolation.frame_strip(interp, 3))
    assert [t.get_text() for t in strip.axes[0].get_yticklabels()] == ["α=0.00", "α=1.00"]


# ---- report, CLI and the notebook -----------------------------------------------------------------------------


def test_components_markdown_counts_components_per_threshold():
    md = report.components_markdown({"x": np.array([0.6, 0.3, 0.1])}, thresholds=(0.5, 0.9, 1.0))
    assert md.splitlines() == ["| latents | 50% | 90% | 100% |", "|---|---|---|---|", "| x | 1 | 2 | 3 |"]


def test_report_json_is_strict_json_with_undefined_and_infinite_strengths_spelt_out():
    text = json.dumps(report.jsonable({"a": {"x": math.nan, "y": math.inf, "z": np.float32(1.5), "n": np.int64(3)}}), allow_nan=False)
    assert json.loads(text) == {"a": {"x": None, "y": "inf", "z": 1.5, "n": 3}}


@pytest.mark.slow  # the whole split's latent extraction (~5 CPU minutes, shared); the CLI test extracts 8 clips
def test_clustering_report_holds_the_embedder_table_then_the_pooled_and_token_tables(latents):
    tables = report.clustering_tables(latents)
    md = report.clustering_report(tables, split="test", rows=len(latents))
    first, pooled, tokens = (md.index(clustering.clustering_markdown(tables[k], first_column=c)) for k, c in
                             (("within_speaker", "input"), ("pooled", "input"), ("tokens", "latents")))  # fmt: skip
    assert first < pooled < tokens and f"{len(latents)} windows" in md
    assert set(tables["tokens"]) == {"tokens: label", "tokens: audio"}


@pytest.mark.slow  # needs the trained-run fixture and renders (~1–3 CPU minutes each, shared)
def test_cli_writes_the_clustering_table_and_figures(run_dir, animator, tmp_path, capsys, monkeypatch):
    from moee_jax.analysis.__main__ import main

    loaded = []
    monkeypatch.setattr(AnalysisAnimator, "from_run", classmethod(lambda cls, path: loaded.append(path) or animator))  # compiled once
    out = tmp_path / "analysis"
    assert main([str(run_dir), "--out", str(out), "--max_clips", "8", "--windows_per_clip", "2", "--no_interpolation"]) == 0
    md = (out / "clustering.md").read_text()
    assert "| audio |" in md and "| video |" in md and "| both |" in md and "| tokens: label |" in md
    assert md in capsys.readouterr().out
    tables = json.loads((out / "clustering.json").read_text())
    assert set(tables["within_speaker"]) == {"audio", "video", "both"}
    assert all((out / f"{name}.png").stat().st_size > 1000 for name in report.FIGURE_NAMES)
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["windows"] == 16 and loaded == [str(run_dir)]
    # The gate is a softmax over the six experts and "no expert": the experts' shares sum to at most 1.
    assert all(0.0 < sum(row.values()) <= 1.0 + 1e-5 for row in summary["global_gates"].values())


@pytest.mark.slow  # runs the whole notebook in a fresh kernel (~2 CPU minutes); the CLI test covers the same report
def test_notebook_executes_end_to_end_and_holds_the_figures_and_the_clustering_table(run_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "notebook_out"
    # The kernel is a fresh Python: it must import this checkout and share the tests' JAX settings
    # (and so their persistent compilation cache).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(jax.config.jax_compilation_cache_dir))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    for name, value in {"RUN_DIR": run_dir, "ANALYSIS_OUT": out, "ANALYSIS_WINDOWS": 2, "ANALYSIS_STEPS": STEPS,
                        "ANALYSIS_SECONDS": SECONDS, "ANALYSIS_ALPHAS": 3}.items():  # fmt: skip
        monkeypatch.setenv(f"MOEE_{name}", str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "the notebook is stored without outputs"
    # A cell that hangs fails after 3 minutes; the run time itself is reported by --durations, not asserted.
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 9  # clustering, 2 projections, variance, 3 gate figures, 2 strips
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    table = next(t for t in tables if "DICE-Talk Table 5" in t)
    for row in ("audio", "video", "both"):
        assert f"\n| {row} | " in table
    assert (out / "clustering.md").read_text() == table
    for name in (*report.FIGURE_NAMES, "interpolation_latent", "interpolation_palette"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert (out / "interpolation_latent.mp4").stat().st_size > 0
