"""`moee animate`: input checks, long audio in clips without seams, emotion conditions, outputs.

The model is the tiny stage-2 config with initialised parameters, exported as `moee train` exports
a finished stage. "Early training": the residual outputs that start at exactly zero (audio
attention, Emotion MoE experts, motion modules, face locator, biases) get small random values, so
every conditioning path changes the output; the video is still noise-like.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import traverse_util
from PIL import Image

from moee_jax.checkpoint.run import RunError
from moee_jax.data.audio import SAMPLE_RATE, audio_window, frame_log_mel, num_video_frames
from moee_jax.data.synthetic import generate_clip
from moee_jax.data.video_io import read_video
from moee_jax.emotions import parse_palette
from moee_jax.inference import inputs as inputs_lib
from moee_jax.inference.animator import Animator
from moee_jax.inference.batch import animate_batch
from moee_jax.inference.inputs import InputError, parse_emotion
from moee_jax.inference.job import Animation
from moee_jax.inference.long_audio import clip_audio_features, plan_clips, roll_clips
from moee_jax.inference.outputs import animate_to_file, save_animation

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 2


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """``RUN/stage2/{final, config.json}`` of the tiny stage-2 config, as `moee train` leaves it."""
    return tiny_run


@pytest.fixture(scope="module")
def animator(run_dir):
    return Animator.from_run(run_dir)


def _write_wav(path, wave, sr=SAMPLE_RATE):
    sf.write(path, np.asarray(wave, np.float32), sr)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Portraits and speech: a face crop, a photo with a face in it, and clips of synthetic speech."""
    d = tmp_path_factory.mktemp("media")
    clip = generate_clip(1, "happy", num_frames=50, size=128)  # 2 s of speech
    face = clip.frames[0]
    Image.fromarray(face).save(d / "face.png")
    photo = np.full((240, 320, 3), 90, np.uint8)
    photo[40:200, 100:260] = generate_clip(2, "neutral", num_frames=1, size=160).frames[0]
    Image.fromarray(photo).save(d / "photo.png")
    _write_wav(d / "speech.wav", clip.audio)
    _write_wav(d / "short.wav", clip.audio[: SAMPLE_RATE // 2])
    _write_wav(d / "speech30.wav", np.tile(clip.audio, 15))  # exactly 30 s
    return {"dir": d, "face": face, "photo": photo, "audio": clip.audio}


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- long audio: plan, features, hand-over (no model) ---------------------------------------------------


def test_clips_cover_exactly_the_frames_of_the_audio():
    plan = plan_clips(30 * SAMPLE_RATE, 25.0, clip_frames=16, motion_frames=2, context_frames=2)
    assert plan.num_frames == 750 and plan.num_clips == 47 and plan.padded_frames == 752
    assert plan.boundaries()[:2] == [16, 32] and plan.boundaries()[-1] == 736
    odd = plan_clips(SAMPLE_RATE + 1, 25.0, clip_frames=4, motion_frames=2, context_frames=2)
    assert odd.num_frames == num_video_frames(SAMPLE_RATE + 1, SAMPLE_RATE, 25.0) == 26 and odd.num_clips == 7


def test_clip_audio_features_are_the_training_windows_with_context_from_the_neighbouring_audio(media):
    audio = media["audio"]
    plan = plan_clips(audio.size, 25.0, clip_frames=4, motion_frames=2, context_frames=2)
    mel = clip_audio_features(audio, plan, 32)
    assert mel.shape == (plan.num_clips, 4 + 2 * 2, 32) and mel.dtype == np.float32
    # Each clip's features are the pipeline's for the window [kF − c, kF + F + c) of the record.
    np.testing.assert_array_equal(mel[3], frame_log_mel(audio_window(audio, 25.0, 3 * 4 - 2, 8), 25.0, 32))
    # Away from the window's own edges (frames 1 … F + 2c − 2), a frame's feature is that of the
    # whole recording: the context before clip k is the end of clip k − 1's speech, not silence.
    whole = frame_log_mel(audio_window(audio, 25.0, -2, plan.padded_frames + 4), 25.0, 32)  # frame j at row j + 2
    for k in range(1, plan.num_clips):
        start = plan.clip_start(k)
        np.testing.assert_allclose(mel[k, 1:-1], whole[start + 1 : start + 7], atol=1e-5)  # frames kF − 1 … kF + 4
    # Clips padded with silence instead would differ there.
    isolated = np.stack([
        frame_log_mel(audio_window(audio[plan.clip_start(k) * 640 : (plan.clip_start(k) + 4) * 640], 25.0, -2, 8), 25.0, 32)
        for k in range(1, plan.num_clips - 1)
    ])  # fmt: skip
    assert np.abs(mel[1:-1, :2] - isolated[:, :2]).max() > 0.5


def test_roll_clips_hands_the_last_motion_latents_to_the_next_clip():
    plan = plan_clips(10 * 640, 25.0, clip_frames=4, motion_frames=2, context_frames=2)  # 10 frames → 3 clips
    reference = jnp.full((1, 2, 1), -1.0)
    seen = []

    def fake_sampler(k, motion):
        seen.append(np.asarray(motion))
        return jnp.arange(4.0)[None, :, None] + 10 * k  # clip k's latents: 10k, 10k+1, 10k+2, 10k+3

    clips = [np.asarray(latents) for _, latents in roll_clips(fake_sampler, reference, plan)]
    assert len(clips) == 3
    np.testing.assert_array_equal(seen[0], reference)
    np.testing.assert_array_equal(seen[1][0, :, 0], [2, 3])
    np.testing.assert_array_equal(seen[2][0, :, 0], [12, 13])
    # More motion frames than a clip has: they reach back into the clip before.
    long_plan = plan_clips(12 * 640, 25.0, clip_frames=2, motion_frames=3, context_frames=0)
    seen.clear()
    list(roll_clips(lambda k, m: (seen.append(np.asarray(m)), jnp.array([[[10.0 * k], [10.0 * k + 1]]]))[1],
                    jnp.zeros((1, 3, 1)), long_plan))  # fmt: skip
    np.testing.assert_array_equal(seen[2][0, :, 0], [1, 10, 11])
    # motion="reference": every clip starts from the portrait, as clip 0 does; nothing generated is handed on.
    seen.clear()
    list(roll_clips(fake_sampler, reference, plan, motion="reference"))
    assert len(seen) == 3 and all(np.array_equal(m, reference) for m in seen)
    with pytest.raises(ValueError, match="chain"):
        list(roll_clips(fake_sampler, reference, plan, motion="last"))


# ---- input checks ------------------------------------------------------------------------------------------


def _bad_image(d):
    path = d / "not_an_image.png"
    path.write_text("this is text, not pixels")
    return {"image": path}, ("not_an_image.png", "not an image")


def _no_face(d):
    y, x = np.mgrid[0:128, 0:128]
    path = d / "gradient.png"
    Image.fromarray(np.stack([x * 2, y * 2, np.full_like(x, 90)], -1).astype(np.uint8)).save(path)
    return {"image": path, "detect": True}, ("no face", "--no_detect")


def _tiny_image(d):
    path = d / "tiny.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(path)
    return {"image": path}, ("tiny.png", "50×40", "64 px")


def _unknown_emotion(d):
    return {"emotion": "hapy"}, ("--emotion", "'hapy'", "unknown emotion", "happiness")


def _malformed_compound(d):
    return {"emotion": "happy:0.6,surprised:"}, ("--emotion", "malformed item", "label:weight")


def _corrupt_audio(d):
    path = d / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return {"audio": path}, ("--audio", "corrupt.wav", "could not decode")


def _empty_audio(d):
    path = d / "empty.wav"
    path.touch()
    return {"audio": path}, ("--audio", "empty.wav", "empty")


BAD_INPUTS = {
    "image_not_an_image": _bad_image,
    "image_without_a_face": _no_face,
    "image_too_small": _tiny_image,
    "unknown_emotion": _unknown_emotion,
    "malformed_compound_emotion": _malformed_compound,
    "corrupt_audio": _corrupt_audio,
    "empty_audio": _empty_audio,
    "audio_shorter_than_a_frame": lambda tmp: (
        {"audio": _write_wav(tmp / "1ms.wav", np.full(16, 0.1))},
        ["1ms.wav", "shorter than one video frame"],
    ),
    "nan_guidance_scale": lambda tmp: ({"guidance": {"audio": float("nan")}}, ["--cfg_audio", "finite"]),
    "unknown_motion_source": lambda tmp: ({"motion": "previous"}, ["--motion", "'previous'", "chain", "reference"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_leaves_no_output(case, animator, media, tmp_path):
    change, phrases = BAD_INPUTS[case](tmp_path)
    args = {"image": media["dir"] / "face.png", "audio": media["dir"] / "short.wav", "emotion": "happy", "detect": False, **change}
    out_dir = tmp_path / "out"
    with pytest.raises(InputError) as err:
        spec = parse_emotion(args["emotion"])
        animate_to_file(animator, args["image"], args["audio"], spec, out_dir / "video.mp4", frames_dir=out_dir / "frames",
                        steps=STEPS, detect=args["detect"], guidance=args.get("guidance"), motion=args.get("motion", "chain"))  # fmt: skip
    for phrase in phrases:
        assert phrase in str(err.value), (phrase, str(err.value))
    assert _files(out_dir) == []


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="directory not found") as err:
        Animator.from_run(tmp_path / "no_such_run")
    assert str(tmp_path / "no_such_run") in str(err.value)


def test_stage1_run_is_refused_as_the_wrong_stage_naming_what_to_run(tmp_path):
    final = tmp_path / "run" / "stage1" / "final"
    (final / "params").mkdir(parents=True)
    (final / "metadata.json").write_text(json.dumps({"stage": "stage1", "parts": ["unet"], "step": 100}))
    (final.parent / "config.json").write_text("{}")
    with pytest.raises(RunError) as err:
        Animator.from_run(tmp_path / "run")
    message = str(err.value)
    assert "wrong stage" in message and "stage1" in message and "no emotion modules" in message
    assert "configs/stage2.py" in message and "moee train" in message


def test_unfinished_stage2_is_a_clear_error(tmp_path):
    (tmp_path / "run" / "stage2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunError, match="not finished"):
        Animator.from_run(tmp_path / "run")


def test_emotion_sources_the_model_lacks_are_clear_errors(animator, media, tmp_path):
    assert animator.emotion.sources == ("label", "speech")
    with pytest.raises(InputError, match="no 'text' emotion source"):
        animator.animate(media["dir"] / "face.png", media["dir"] / "short.wav", parse_emotion(emotion_text="joyful"), detect=False)
    video = tmp_path / "ref.mp4"
    video.write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="embedder"):
        animator.animate(media["dir"] / "face.png", media["dir"] / "short.wav", parse_emotion(emotion_video=video), detect=False)
    with pytest.raises(InputError, match="exactly one emotion source"):
        parse_emotion("happy", emotion_from_audio=True)


# ---- accepted inputs ------------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white_and_grayscale_becomes_rgb(media, tmp_path):
    rgba = np.concatenate([media["face"], np.full((128, 128, 1), 255, np.uint8)], axis=-1)
    rgba[:10, :10, 3] = 0  # a transparent corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = inputs_lib.load_image(tmp_path / "rgba.png")
    assert loaded.shape == (128, 128, 3)
    np.testing.assert_array_equal(loaded[:10, :10], 255)
    np.testing.assert_array_equal(loaded[20:], media["face"][20:])
    Image.fromarray(media["face"]).convert("L").save(tmp_path / "gray.png")
    gray = inputs_lib.load_image(tmp_path / "gray.png")
    assert gray.shape == (128, 128, 3) and (gray[..., 0] == gray[..., 2]).all()


def test_stereo_48k_and_silent_audio_are_accepted(media, tmp_path):
    stereo = np.stack([media["audio"], 0.5 * media["audio"]], axis=1)
    import librosa

    stereo48 = librosa.resample(stereo.T, orig_sr=SAMPLE_RATE, target_sr=48000).T
    speech = inputs_lib.load_speech(_write_wav(tmp_path / "stereo48.wav", stereo48, 48000))
    assert speech.wave.ndim == 1 and abs(speech.wave.size - media["audio"].size) <= 2 and not speech.warnings
    silent = inputs_lib.load_speech(_write_wav(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE)))
    assert silent.wave.size == SAMPLE_RATE
    assert "silent" in silent.warnings[0] and "closed mouth" in silent.warnings[0]


@pytest.mark.slow  # renders a second portrait layout (~0.7 CPU minute); the loading itself is specified just below
def test_rgba_portrait_with_silent_stereo_48k_audio_makes_a_valid_video(animator, media, tmp_path):
    rgba = np.concatenate([media["face"], np.full((128, 128, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    _write_wav(tmp_path / "silent48.wav", np.zeros((48000 // 2, 2)), 48000)
    result = animator.animate(tmp_path / "rgba.png", tmp_path / "silent48.wav", parse_emotion("sad"), steps=STEPS, detect=False)
    assert result.frames.shape == (13, 32, 32, 3) and result.frames.dtype == np.uint8
    assert any("silent" in w for w in result.warnings) and result.settings["warnings"] == result.warnings


def test_rgba_is_composited_on_white_and_silent_stereo_48k_loads_as_mono_16k_with_a_warning(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[:32, :, 3], rgba[32:, :, 3] = 200, 255, 0  # opaque red top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgb = inputs_lib.load_image(tmp_path / "rgba.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(rgb[-1, -1], [255, 255, 255])
    speech = inputs_lib.load_speech(_write_wav(tmp_path / "silent48.wav", np.zeros((48000 // 2, 2)), 48000))
    assert speech.wave.shape == (SAMPLE_RATE // 2,) and any("silent" in w for w in speech.warnings)


def test_face_is_detected_cropped_and_pasted_back_into_the_photo(media):
    photo = media["photo"]
    portrait = inputs_lib.prepare_portrait(photo, 64)
    cx, cy, side = portrait.box
    assert abs(cx - 180) < 16 and abs(cy - 120) < 20 and 100 < side < 260  # the face drawn at [100, 260) × [40, 200)
    assert portrait.crop.shape == (64, 64, 3)
    big = inputs_lib.prepare_portrait(photo, int(side))  # a crop at the box's own resolution
    pasted = inputs_lib.paste_back(photo, big.crop[None], big.box)
    assert pasted.shape == (1,) + photo.shape
    assert np.abs(pasted[0].astype(float) - photo).mean() < 2.0  # the crop goes back where it came from
    x0 = int(round(cx + 0.5 - round(side) / 2))
    np.testing.assert_array_equal(pasted[0][:, : max(x0, 0)], photo[:, : max(x0, 0)])  # left of the box: untouched
    assert portrait.detected and not inputs_lib.prepare_portrait(photo, 64, detect=False).detected


# ---- long audio end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_video(animator, media, tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "speech30.mp4"
    calls = []
    animation = animate_to_file(
        animator, media["dir"] / "face.png", media["dir"] / "speech30.wav", parse_emotion("happy"), out,
        steps=STEPS, detect=False, progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    return animation, out, calls


@pytest.mark.slow  # minutes of CPU: run with `make test-slow`
def test_30s_audio_gives_750_frames_and_an_mp4_with_the_speech(long_video, animator):
    animation, out, calls = long_video
    assert animation.frames.shape == (750, 32, 32, 3)
    assert calls[-1] == (188, 188) and len(calls) == 188
    frames, fps, audio = read_video(out)
    assert frames.shape[0] == 750 and fps == 25.0
    assert audio is not None and abs(audio.size - 30 * SAMPLE_RATE) < 0.02 * 30 * SAMPLE_RATE
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["frames"] == 750 and settings["steps"] == STEPS and settings["emotion"]["kind"] == "label"
    assert settings["motion"] == "chain"
    assert animator._clip_step._cache_size() == 1  # one compilation served all 188 clips


@pytest.mark.slow  # minutes of CPU: run with `make test-slow`
def test_no_seam_at_clip_boundaries(long_video, animator):
    animation, _, _ = long_video
    frames = animation.frames.astype(np.float32)
    step = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # step[t]: frame t → t + 1
    across = np.array(animation.plan.boundaries()) - 1
    within = np.setdiff1d(np.arange(step.size), across)
    # The video is noise-like: a seam would make the steps across clip boundaries stand out from
    # the steps within clips; they must look like the typical within-clip step.
    assert step[across].mean() <= np.quantile(step[within], 0.95), (step[across].mean(), np.quantile(step[within], [0.5, 0.95]))
    assert np.median(step[across]) <= np.quantile(step[within], 0.9)


def _temporal_smoother(params, strength: float = 2.0):
    """Motion modules that add to every frame the mean of its window (motion frames included):
    uniform temporal attention (q = k = 0) with identity projections, the plainest temporal
    coherence a trained motion module has."""
    flat = traverse_util.flatten_dict(params["unet"])
    for path, value in flat.items():
        name = "/".join(path)
        if "motion_modules" not in name or path[-1] != "kernel":
            continue
        if name.endswith(("proj_in/kernel", "to_v/kernel", "to_out_0/kernel")):
            flat[path] = jnp.eye(value.shape[0], dtype=value.dtype)
        elif name.endswith(("to_q/kernel", "to_k/kernel", "ff/net_2/kernel")):
            flat[path] = jnp.zeros_like(value)
        elif name.endswith("proj_out/kernel"):
            flat[path] = strength * jnp.eye(value.shape[0], dtype=value.dtype)
    return dict(params, unet=traverse_util.unflatten_dict(flat))


@pytest.mark.slow  # minutes of CPU: run with `make test-slow`
def test_motion_frame_hand_over_is_what_links_consecutive_clips(animator, media):
    original = animator.params
    animator.params = _temporal_smoother(original)
    try:
        job = animator.prepare(media["dir"] / "face.png", media["dir"] / "speech.wav", parse_emotion("happy"), steps=STEPS, detect=False)
        latents, frames, motions = [], [], []

        def sample(k, motion):
            motions.append(motion)
            clip_latents, pixels = animator.render_clip(job, k, motion)
            latents.append(clip_latents)
            frames.append(pixels.astype(np.float32))
            return clip_latents

        list(roll_clips(sample, animator.first_motion(job), job.plan))
        n, m = job.plan.num_clips, animator.motion_frames
        np.testing.assert_array_equal(motions[0], jnp.repeat(job.ref_latents[:, None], m, axis=1))
        for k in range(1, n):
            np.testing.assert_array_equal(motions[k], latents[k - 1][:, -m:])
        handed, swapped, unrelated = [], [], []
        for k in range(n - 1):
            other = (k + n // 2) % n
            _, redo = animator.render_clip(job, k + 1, latents[other][:, -m:])  # same noise, another clip's motion frames
            last = frames[k][-1]
            handed.append(np.abs(frames[k + 1][0] - last).mean())
            swapped.append(np.abs(redo[0].astype(np.float32) - last).mean())
            unrelated.append(np.abs(frames[k + 1][0] - frames[other][-1]).mean())
        handed, swapped, unrelated = map(np.array, (handed, swapped, unrelated))
        # Clip k + 1 starts closer to where clip k ended than to where an unrelated clip ended, and
        # it is the hand-over that does it: with an unrelated clip's motion frames it starts further away.
        assert handed.mean() < unrelated.mean(), (handed.mean(), unrelated.mean())
        assert handed.mean() < swapped.mean() and (handed < swapped).mean() >= 0.8, (handed, swapped)
    finally:
        animator.params = original


# ---- emotion conditions ---------------------------------------------------------------------------------------


def _gates(animator, job):
    """The global gates ``g`` every Emotion MoE used on clip 0: a list of ``(frames, 6)``."""

    @jax.jit
    def run(p, emotion, mel, ref_latents, face_features):
        motion = jnp.repeat(ref_latents[:, None], animator.motion_frames, axis=1)
        cond = animator.clip_conditions(p, emotion, mel, ref_latents, face_features, motion)
        noisy = jnp.zeros((1, animator.clip_frames) + ref_latents.shape[1:])
        return animator.system.denoise(p, cond, noisy, jnp.array([500]), capture=True).intermediates

    inter = run(animator.params, job.emotion, jnp.asarray(job.mel[:1]), job.ref_latents, job.face_features)
    flat = traverse_util.flatten_dict(inter)
    return [np.asarray(v[0]) for k, v in flat.items() if k[-1] == "global_gates"]


def test_compound_palette_reaches_every_emotion_moe_as_the_global_gate(animator, media):
    face, audio = media["dir"] / "face.png", media["dir"] / "short.wav"
    spec = parse_emotion("happy:0.6,surprised:0.4")
    assert spec.kind == "palette"
    job = animator.prepare(face, audio, spec, steps=STEPS, detect=False)
    palette = parse_palette("happy:0.6,surprised:0.4")
    np.testing.assert_array_equal(job.emotion.palette, palette[None])
    np.testing.assert_array_equal(job.emotion.label, palette[None])  # and the label MLP sees it
    gates = _gates(animator, job)
    assert len(gates) >= 2
    for g in gates:
        np.testing.assert_allclose(g, np.broadcast_to(palette, g.shape), atol=1e-6)
    # A single label is a one-hot palette: its own expert alone (MoEE: "single emotion activates only
    # its corresponding expert"); neutral switches every expert off.
    for label, want in (("happy", np.eye(6)[0]), ("neutral", np.zeros(6))):
        single = animator.prepare(face, audio, parse_emotion(label), steps=STEPS, detect=False)
        for g in _gates(animator, single):
            np.testing.assert_allclose(g, np.broadcast_to(want, g.shape), atol=1e-6)
    # Without a label (emotion from the speech) the gate network acts.
    spoken = animator.prepare(face, audio, parse_emotion(emotion_from_audio=True), steps=STEPS, detect=False)
    np.testing.assert_array_equal(spoken.emotion.palette_keep, [False])
    learned = _gates(animator, spoken)
    assert all(np.all((g > 0) & (g < 1)) for g in learned)


@pytest.mark.slow  # a second sampler compile (~0.5 CPU minute); with the null-branch specs of test_reference_sampling
def test_dropped_audio_branch_is_what_training_saw_when_audio_was_dropped(animator, media):
    """Training drops audio by zeroing the windows before the projection (MoEESystem.encode); the
    unconditional audio branch of guidance must use the same tokens, not zeros."""
    job = animator.prepare(media["dir"] / "face.png", media["dir"] / "short.wav", parse_emotion("happy"), steps=STEPS, detect=False)
    mel = jnp.asarray(job.mel[:1])
    motion = jnp.repeat(job.ref_latents[:, None], animator.motion_frames, axis=1)  # clip 0's: the reference repeated
    cond = animator.clip_conditions(animator.params, job.emotion, mel, job.ref_latents, job.face_features, motion)
    windows = animator.system.audio_windows(mel)
    sources = animator.system.clip_emotion(job.emotion, mel)
    trained_null = animator.system.conditioning.apply(
        {"params": animator.params["conditioning"]}, windows * 0.0, sources, train=False
    ).audio
    np.testing.assert_allclose(np.asarray(cond.null_audio), np.asarray(trained_null), rtol=1e-6, atol=1e-7)
    assert cond.null_audio.shape == cond.audio.shape
    assert float(jnp.abs(cond.null_audio).max()) > 0  # the projection's biases: zero tokens would differ


@pytest.mark.slow  # a third sampler compile, speech-only (~0.7 CPU minute)
def test_emotion_from_audio_drops_the_label_and_keeps_the_speech(animator, media):
    face, audio = media["dir"] / "face.png", media["dir"] / "speech.wav"
    job = animator.prepare(face, audio, parse_emotion(emotion_from_audio=True), steps=STEPS, detect=False)
    np.testing.assert_array_equal(job.emotion.drop, [[True, False, True]])  # (text, speech, label)
    labelled = animator.prepare(face, audio, parse_emotion("angry"), steps=STEPS, detect=False)
    # A label is the emotion alone: the speech source is dropped, as training's label mode drops it.
    np.testing.assert_array_equal(labelled.emotion.drop, [[True, True, False]])

    def tokens(sources, clip):
        cond = animator.clip_conditions(
            animator.params, sources, jnp.asarray(job.mel[clip : clip + 1]), job.ref_latents, job.face_features, animator.first_motion(job)
        )
        return np.asarray(cond.emotion.tokens), np.asarray(cond.null_emotion.tokens)

    from_audio, null = tokens(job.emotion, 0)
    # The label is dropped: whatever label weights ride along, the tokens are those of the speech alone.
    with_label = dataclasses.replace(job.emotion, label=labelled.emotion.label)
    np.testing.assert_allclose(tokens(with_label, 0)[0], from_audio, atol=1e-6)
    assert np.abs(tokens(labelled.emotion, 0)[0] - from_audio).max() > 1e-4
    # The speech is kept: another clip's speech gives other tokens, and they are not the null tokens.
    assert np.abs(tokens(job.emotion, 5)[0] - from_audio).max() > 1e-4
    assert np.abs(from_audio - null).max() > 1e-4


@pytest.mark.slow  # compiles a second batch size (~1 CPU minute)
def test_batched_rendering_gives_each_video_what_rendering_it_alone_gives(animator, media):
    face, audio = media["dir"] / "face.png", media["dir"] / "short.wav"
    jobs = [animator.prepare(face, audio, parse_emotion(e), steps=STEPS, seed=s, detect=False) for e, s in (("happy", 0), ("sad", 1))]
    together = animator.render_jobs(jobs)
    for job, video in zip(jobs, together):
        alone = animator.render_job(job)
        assert video.shape == alone.shape
        assert np.abs(video.astype(int) - alone.astype(int)).max() <= 1  # float rounding of a larger batch at most
    assert np.abs(together[0].astype(int) - together[1].astype(int)).max() > 0


@pytest.mark.slow  # compiles a one-step sampler with the mixing (~1 CPU minute)
def test_a_compound_is_guided_towards_each_of_its_emotions_at_full_strength(animator, media):
    face, audio = media["dir"] / "face.png", media["dir"] / "short.wav"
    prepare = functools.partial(animator.prepare, face, audio, steps=1, detect=False)  # one DDIM step: linear in the prediction
    compound = prepare(parse_emotion("happy:0.5,surprised:0.5"))
    happy, surprised = prepare(parse_emotion("happy")), prepare(parse_emotion("surprised"))
    rows = animator.compound_rows([compound.emotion])
    assert rows is not None and len(rows.video) == 3

    def first_clip(emotion, jobs, mix=None):
        stack = lambda xs: jnp.concatenate(xs)  # noqa: E731
        ref = stack([j.ref_latents for j in jobs])
        motion = jnp.repeat(ref[:, None], animator.motion_frames, axis=1)
        latents, _ = animator._clip_step(animator.params, emotion, jnp.asarray(np.concatenate([j.clip_audio(0) for j in jobs])), ref,
                                         stack([j.face_features for j in jobs]), motion, jnp.stack([j.key for j in jobs]), jnp.int32(0),
                                         compound.plan_arrays, scales=tuple(sorted(compound.scales.items())), mix=mix)  # fmt: skip
        return np.asarray(latents)

    mixed = first_clip(jax.tree_util.tree_map(jnp.asarray, rows.emotion), [compound] * 3, jnp.asarray(rows.mix))
    null = jax.tree_util.tree_map(jnp.asarray, rows.emotion)
    singles = first_clip(jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), happy.emotion, surprised.emotion,
                                                jax.tree_util.tree_map(lambda x: x[2:3], null)), [happy, surprised, compound])  # fmt: skip
    np.testing.assert_allclose(mixed[0], mixed[1], atol=1e-5)
    # ε(∅) + g[(ε_happy − ε(∅)) + (ε_surprised − ε(∅))]: each emotion's guided result, less the unguided one once
    np.testing.assert_allclose(mixed[0], singles[0] + singles[1] - singles[2], atol=1e-4)
    assert np.abs(singles[0] - singles[1]).max() > 1e-3  # the two emotions do differ
    video = animator.render_job(compound)  # a compound alone renders through the same rows
    assert video.shape[0] == compound.plan.num_frames


# ---- outputs ----------------------------------------------------------------------------------------------------


def _small_animation(media) -> Animation:
    portrait = inputs_lib.prepare_portrait(media["face"], 32, detect=False)
    plan = plan_clips(SAMPLE_RATE // 5, 25.0, 4, 2, 2)
    frames = np.repeat(portrait.crop[None], plan.num_frames, axis=0)
    return Animation(frames, media["audio"][: SAMPLE_RATE // 5], 25.0, portrait, plan, {"frames": plan.num_frames}, [])


def test_a_group_photo_animates_the_largest_face_and_says_so(media):
    group = np.full((240, 480, 3), 90, np.uint8)
    group[40:200, 20:180] = media["photo"][40:200, 100:260]  # the 160 px face
    group[80:180, 300:400] = generate_clip(3, "neutral", num_frames=1, size=100).frames[0]  # a smaller one
    portrait = inputs_lib.prepare_portrait(group, 64)
    assert len(inputs_lib.detect_faces(group)) == 2
    assert portrait.box[0] < 240  # the left, larger face
    assert any("2 faces found; animating the largest" in w for w in portrait.warnings)
    assert not any("faces found" in w for w in inputs_lib.prepare_portrait(media["photo"], 64).warnings)


def test_paste_back_streams_one_photo_at_a_time_with_the_same_frames(media):
    photo = media["photo"]
    portrait = inputs_lib.prepare_portrait(photo, 64)
    crops = np.stack([np.roll(portrait.crop, 3 * i, axis=1) for i in range(3)])
    whole = inputs_lib.paste_back(photo, crops, portrait.box)
    stream = inputs_lib.iter_paste_back(photo, iter(crops), portrait.box)
    first = next(stream)
    assert first.shape == photo.shape  # one photo, not the video
    np.testing.assert_array_equal(np.stack([first, *stream]), whole)


def test_writing_reports_progress_per_frame(media, tmp_path):
    calls = []
    save_animation(_small_animation(media), tmp_path / "v.mp4", paste=True, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_a_failed_write_leaves_nothing_behind(media, tmp_path, monkeypatch):
    from moee_jax.inference import outputs as outputs_lib

    def broken(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(outputs_lib, "atomic_write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        save_animation(_small_animation(media), tmp_path / "out" / "video.mp4", frames_dir=tmp_path / "out" / "frames")
    assert _files(tmp_path / "out") == []


def test_outputs_are_the_video_its_settings_and_optional_frames(media, tmp_path):
    animation = _small_animation(media)
    paths = save_animation(animation, tmp_path / "v.mp4", frames_dir=tmp_path / "frames", paste=True)
    assert sorted(paths) == ["frames_dir", "settings", "video"]
    frames, _, audio = read_video(tmp_path / "v.mp4")
    assert frames.shape == (5, 128, 128, 3) and audio is not None  # pasted back into the 128 px photo
    assert len(_files(tmp_path / "frames")) == 5
    assert json.loads((tmp_path / "v.json").read_text())["paste_back"] is True
    with pytest.raises(InputError, match="not an empty folder"):
        save_animation(animation, tmp_path / "w.mp4", frames_dir=tmp_path / "frames")
    with pytest.raises(InputError, match=r"\.mp4"):
        save_animation(animation, tmp_path / "w.avi")
    assert not (tmp_path / "w.mp4").exists()


def test_batch_skips_bad_rows_reports_them_and_finishes_the_rest(animator, media, tmp_path):
    d = media["dir"]
    (tmp_path / "manifest.csv").write_text(
        "image,audio,emotion,out\n"
        f'{d / "face.png"},{d / "short.wav"},"happy:0.6,surprised:0.4",ok.mp4\n'
        f"{d / 'missing.png'},{d / 'short.wav'},happy,missing.mp4\n"
        f"{d / 'face.png'},{d / 'short.wav'},elated,bad_emotion.mp4\n"
        f"{d / 'face.png'},{d / 'short.wav'},audio,from_audio.mp4\n"
    )
    report = animate_batch(animator, tmp_path / "manifest.csv", steps=STEPS, detect=False)
    assert [e["line"] for e in report["done"]] == [2, 5]
    assert [e["line"] for e in report["failed"]] == [3, 4]
    assert "missing.png" in report["failed"][0]["error"] and "'elated'" in report["failed"][1]["error"]
    assert (tmp_path / "ok.mp4").exists() and (tmp_path / "from_audio.mp4").exists()
    assert not (tmp_path / "missing.mp4").exists() and not (tmp_path / "bad_emotion.mp4").exists()
    assert json.loads((tmp_path / "manifest.report.json").read_text())["failed"] == report["failed"]


# ---- the command line -------------------------------------------------------------------------------------------


def _moee(*args: str) -> subprocess.CompletedProcess:
    # The test session's compilation cache and matmul precision (tests/conftest.py), so the command
    # reuses what this process compiled.
    cache = os.environ.get("MOEE_JAX_TEST_CACHE", str(REPO / ".cache" / "jax"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_DEFAULT_MATMUL_PRECISION="highest")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "moee_jax.cli", "animate", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_flags_may_be_spelt_with_hyphens_or_underscores():
    from moee_jax.cli import underscored

    assert underscored("--emotion-from-audio") == "--emotion_from_audio"
    assert underscored("--emotion-text=a calm-ish voice") == "--emotion_text=a calm-ish voice"  # the value is kept
    assert [underscored(a) for a in ("-v", "--", "happy:0.6,surprised:0.4")] == ["-v", "--", "happy:0.6,surprised:0.4"]


@pytest.mark.slow  # minutes of CPU: run with `make test-slow`
def test_cli_animates_a_photo_with_a_compound_emotion_pasting_the_face_back(run_dir, media, tmp_path):
    out = tmp_path / "result" / "talk.mp4"
    proc = _moee(
        "--checkpoint", str(run_dir), "--image", str(media["dir"] / "photo.png"), "--audio", str(media["dir"] / "short.wav"),
        "--emotion", "happy:0.6,surprised:0.4", "--out", str(out), "--steps", str(STEPS), "--cfg_audio", "2.5",
        "--paste-back", "--frames-dir", str(tmp_path / "frames"),  # the spelling; underscores work too
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames, fps, audio = read_video(out)
    assert frames.shape == (13, 240, 320, 3) and audio is not None
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["emotion"]["palette_gate_override"] and settings["guidance"]["audio"] == 2.5 and settings["detect_face"]
    assert settings["compound_mixing"] == "guidance"  # one guided prediction per emotion, mixed (config default)
    assert len(_files(tmp_path / "frames")) == 13


def test_cli_input_error_exits_nonzero_with_a_message_and_no_output(run_dir, media, tmp_path):
    proc = _moee(
        "--checkpoint", str(run_dir), "--image", str(media["dir"] / "face.png"), "--audio", str(media["dir"] / "short.wav"),
        "--emotion", "happy:0.6,grumpy:0.4", "--out", str(tmp_path / "o.mp4"),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "moee animate: --emotion" in proc.stderr and "grumpy" in proc.stderr and "Traceback" not in proc.stderr
    assert _files(tmp_path) == []


def test_cli_benchmark_prints_one_line_with_frames_rates_and_peak_memory(run_dir, media, tmp_path):
    # The batch test's row 1 (same portrait, speech, palette, steps): its compiled program is reused.
    proc = _moee(
        "--checkpoint", str(run_dir), "--image", str(media["dir"] / "face.png"), "--audio", str(media["dir"] / "short.wav"),
        "--emotion", "happy:0.6,surprised:0.4", "--out", str(tmp_path / "b.mp4"), "--steps", str(STEPS), "--no_detect", "--benchmark",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("benchmark:")]
    assert len(lines) == 1, proc.stdout
    m = re.fullmatch(
        r"benchmark: (\d+) frames; sampling ([\d.]+) s \(([\d.e+-]+) frames/s, ([\d.e+-]+) s/frame; ([\d.e+-]+) s/frame after the first clip\); "
        r"end to end ([\d.]+) s \(([\d.e+-]+) frames/s, ([\d.e+-]+) s/frame\); peak memory ([\d.]+) (GiB|MiB) \((device|max RSS)\)",
        lines[0],
    )  # fmt: skip
    assert m, lines[0]
    frames, sampling, sampling_fps, sampling_spf, steady, total, total_fps, total_spf, peak, unit, _ = m.groups()
    assert int(frames) == 13  # 0.5 s at 25 fps, in four 4-frame clips
    sampling, total = float(sampling), float(total)
    assert 0 < sampling < total and float(steady) <= float(sampling_spf)
    assert float(sampling_spf) == pytest.approx(sampling / 13, rel=0.02) and float(total_fps) == pytest.approx(13 / total, rel=0.02)
    settings = json.loads((tmp_path / "b.json").read_text())
    assert settings["sampling_seconds"] == pytest.approx(sampling, abs=0.01) and settings["sampling_seconds"] <= settings["seconds"]
    assert 100 <= float(peak) * (1024 if unit == "GiB" else 1) < 64 * 1024  # MiB: a Python process with JAX, well under the host


def test_benchmark_line_times_sampling_end_to_end_and_the_clips_after_the_first():
    from moee_jax.inference.benchmark import AnimateBenchmark, peak_memory

    now = [100.0]
    bench = AnimateBenchmark(started=90.0, clock=lambda: now[0])
    seen = []
    progress = bench.progress(lambda done, total: seen.append((done, total)))
    for k, t in enumerate((104.0, 105.0, 106.0), 1):  # clip 1 holds the compilation
        now[0] = t
        progress(k, 3)
    now[0] = 110.0
    line = bench.line(12, 6.0, clip_frames=4)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert line.startswith("benchmark: 12 frames; sampling 6.00 s (2 frames/s, 0.5 s/frame; 0.25 s/frame after the first clip); ")
    assert "end to end 20.0 s (0.6 frames/s, 1.67 s/frame); peak memory " in line
    assert peak_memory()[0] > 0 and peak_memory()[1] in ("device", "max RSS")
    assert "after the first clip" not in AnimateBenchmark(clock=lambda: now[0]).line(4, 1.0, clip_frames=4)  # one clip: no steady rate
    with pytest.raises(ValueError, match="frames=0"):
        bench.line(0, 1.0)
