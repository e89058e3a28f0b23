"""Bad input to every subcommand: a one-line message naming the flag, file or CSV column, a non-zero
exit, no traceback and nothing left behind.

Each case runs ``moee <command> …`` as a process from its own empty folder, with the shared run and
media read-only beside it. ``MOEE_BAD_INPUTS_DOC=docs/bad_inputs.md pytest -m slow
tests/test_bad_inputs.py`` also writes the table of every case, its exit code and its message.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~90 processes: a few CPU minutes


@dataclasses.dataclass(frozen=True)
class Paths:
    """What a case may point at: the shared finished run, media files, and the case's own folder."""

    run: pathlib.Path  # a finished tiny run (embedder + stage2)
    stage1_run: pathlib.Path  # a run whose only export is stage 1
    media: pathlib.Path
    here: pathlib.Path  # the case's working folder (empty)


@dataclasses.dataclass(frozen=True)
class Case:
    command: str
    args: Callable[[Paths], list[str]]
    names: str  # what the message must name (a flag, file or column)
    what: str  # the bad input, in words (the table's first column)


def _m(p: Paths, name: str) -> str:
    return str(p.media / name)


def _animate(**changes) -> Callable[[Paths], list[str]]:
    """``moee animate`` arguments: a good single-video call with ``changes`` (None drops a flag)."""

    def args(p: Paths) -> list[str]:
        base = {"checkpoint": str(p.run), "image": _m(p, "face.png"), "audio": _m(p, "speech.wav"), "emotion": "happy",
                "out": str(p.here / "out.mp4"), "no_detect": True}  # fmt: skip
        base.update({k: (v(p) if callable(v) else v) for k, v in changes.items()})
        return [f"--{k}" if v is True else f"--{k}={v}" for k, v in base.items() if v is not None]

    return args


def _batch(rows: str, header: str = "image,audio,emotion,out") -> Callable[[Paths], list[str]]:
    def args(p: Paths) -> list[str]:
        text = rows.format(face=_m(p, "face.png"), speech=_m(p, "speech.wav"), here=p.here)
        manifest = p.media / f"manifest_{abs(hash(header + rows))}.csv"
        manifest.write_text(header + "\n" + text + "\n")
        return [f"--checkpoint={p.run}", f"--batch={manifest}", f"--report={p.here}/report.json", "--no_detect"]

    return args


def _run_cmd(*extra: str, run: str = "run") -> Callable[[Paths], list[str]]:
    """``RUN`` (the finished run, ``stage1``: the stage-1-only run, or a literal path) then ``extra``."""

    def args(p: Paths) -> list[str]:
        path = {"run": p.run, "stage1": p.stage1_run}.get(run, run)
        return [str(path), *[e.format(here=p.here, media=p.media) for e in extra]]

    return args


def _fixed(*args: str) -> Callable[[Paths], list[str]]:
    return lambda p: [a.format(here=p.here, media=p.media, run=p.run) for a in args]


CASES: dict[str, Case] = {}


def _add(name: str, command: str, args, names: str, what: str) -> None:
    assert name not in CASES
    CASES[name] = Case(command, args, names, what)


# ---- the command line itself ----
_add("unknown_subcommand", "trian", _fixed(), "trian", "a misspelt subcommand")
_add("unknown_flag", "train", _fixed("--run_dir={here}/r", "--stepz=3"), "--stepz", "an unknown flag")
_add("flag_without_value", "train", _fixed("--run_dir"), "--run_dir", "a flag without its value")
_add("integer_flag_given_text", "train", _fixed("--run_dir={here}/r", "--max_steps=many"), "--max_steps", "text for an integer flag")

# ---- train ----
_add("train_no_run_dir", "train", _fixed(), "--run_dir", "no --run_dir")
_add("train_missing_config_file", "train", _fixed("--run_dir={here}/r", "--config=no_such.py"), "--config", "a config file that does not exist")
_add("train_unknown_variant", "train", _fixed("--run_dir={here}/r", "--config=stage1.py:huge"), "huge", "an unknown config variant")
_add("train_unknown_config_field", "train", _fixed("--run_dir={here}/r", "--config.train.stepz=3"), "--config.train.stepz", "a misspelt config field")
_add("train_config_wrong_type", "train", _fixed("--run_dir={here}/r", "--config.train.steps=many"), "--config.train.steps", "text for an integer config field")
_add("train_negative_learning_rate", "train", _fixed("--run_dir={here}/r", "--config.train.learning_rate=-1"), "learning_rate", "a negative learning rate")
_add("train_nan_learning_rate", "train", _fixed("--run_dir={here}/r", "--config.train.learning_rate=nan"), "learning_rate", "a NaN learning rate")
_add("train_zero_batch", "train", _fixed("--run_dir={here}/r", "--config.train.batch_size=0"), "batch_size", "a batch of 0")
_add("train_negative_steps", "train", _fixed("--run_dir={here}/r", "--config.train.steps=-5"), "steps", "negative steps")
_add("train_negative_max_steps", "train", _fixed("--run_dir={here}/r", "--max_steps=-1"), "--max_steps", "negative --max_steps")
_add("train_missing_dataset", "train", _fixed("--run_dir={here}/r", "--config.data.data_dir={here}/no_data"), "no_data", "a data_dir without the dataset")
_add("train_run_dir_is_a_file", "train", _fixed("--run_dir={media}/face.png"), "face.png", "a file as the run directory")
_add("train_unknown_stage", "train", _fixed("--run_dir={here}/r", "--config.stage=stage3"), "stage3", "an unknown stage")

# ---- demo ----
_add("demo_unknown_variant", "demo", _fixed("--out={here}/o", "--config=demo.py:tpu"), "tpu", "an unknown demo variant")
_add("demo_missing_checkpoint", "demo", _fixed("--out={here}/o", "--checkpoint={here}/no_such_run"), "no_such_run", "a --checkpoint that does not exist")
_add("demo_out_is_a_file", "demo", _fixed("--out={media}/face.png"), "face.png", "a file as --out")
_add("demo_unknown_config_field", "demo", _fixed("--out={here}/o", "--config.animate.stepz=3"), "--config.animate.stepz", "a misspelt config field")

# ---- convert ----
_add("convert_no_unet", "convert", _fixed("--out={here}/ckpt"), "--unet", "no --unet")
_add("convert_missing_unet", "convert", _fixed("--unet={here}/no_unet", "--out={here}/ckpt"), "no_unet", "a --unet that does not exist")
_add("convert_unet_is_text", "convert", _fixed("--unet={media}/notes.txt", "--out={here}/ckpt"), "notes.txt", "a text file as --unet")
_add("convert_out_exists", "convert", _fixed("--unet={media}/notes.txt", "--out={media}"), "--out", "an --out that exists")
_add("convert_missing_vae", "convert", _fixed("--unet={media}/notes.txt", "--vae={here}/no_vae", "--out={here}/ckpt"), "no_vae", "a --vae that does not exist")

# ---- prepare ----
_add("prepare_missing_input", "prepare", _fixed("--input={here}/no_videos", "--out={here}/p"), "no_videos", "an --input that does not exist")
_add("prepare_folder_without_manifest", "prepare", _fixed("--input={media}/empty_folder", "--out={here}/p"), "manifest", "a folder with no manifest")
_add("prepare_manifest_missing_column", "prepare", _fixed("--input={media}/manifest_no_emotion.csv", "--out={here}/p"), "emotion", "a manifest without the emotion column")
_add("prepare_manifest_unknown_emotion", "prepare", _fixed("--input={media}/manifest_bad_emotion.csv", "--out={here}/p"), "grumpy", "an unknown emotion in the manifest")
_add("prepare_manifest_bad_intensity", "prepare", _fixed("--input={media}/manifest_bad_intensity.csv", "--out={here}/p"), "intensity", "an intensity of 3 in the manifest")
_add("prepare_manifest_missing_video", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p"), "clip.mp4", "a manifest whose only video is missing")
_add("prepare_manifest_is_binary", "prepare", _fixed("--input={media}/corrupt.wav", "--out={here}/p"), "corrupt.wav", "a binary file as the manifest")
_add("prepare_zero_size", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--size=0"), "--size", "--size 0")
_add("prepare_zero_workers", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--workers=0"), "--workers", "--workers 0")
_add("prepare_negative_margin", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--margin=-1"), "--margin", "a negative --margin")
_add("prepare_missing_face_fraction", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--max_missing_face=2"), "--max_missing_face", "--max_missing_face above 1")
_add("prepare_missing_landmark_model", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--landmark_model={here}/no.task"), "no.task", "a --landmark_model that does not exist")
_add("prepare_encoder_without_data_dir", "prepare", _fixed("--input={media}/manifest_missing_video.csv", "--out={here}/p", "--audio_encoder={here}/w2v"), "--data_dir", "--audio_encoder without --data_dir")

# ---- features ----
_add("features_no_data_dir", "features", _fixed("--audio_encoder={here}/w2v"), "--data_dir", "no --data_dir")
_add("features_no_encoder", "features", _fixed("--data_dir={here}"), "--audio_encoder", "no encoder")
_add("features_missing_encoder", "features", _fixed("--data_dir={here}", "--audio_encoder={here}/no_w2v"), "no_w2v", "an --audio_encoder folder that does not exist")

# ---- animate: the run ----
_add("animate_no_checkpoint", "animate", _animate(checkpoint=None), "--checkpoint", "no --checkpoint")
_add("animate_missing_checkpoint", "animate", _animate(checkpoint=lambda p: str(p.here / "no_run")), "no_run", "a --checkpoint that does not exist")
_add("animate_checkpoint_is_a_file", "animate", _animate(checkpoint=lambda p: _m(p, "face.png")), "face.png", "a file as --checkpoint")
_add("animate_stage1_run", "animate", _animate(checkpoint=lambda p: str(p.stage1_run)), "stage1", "a run with only stage 1")
_add("animate_empty_run", "animate", _animate(checkpoint=lambda p: _m(p, "empty_folder")), "empty_folder", "an empty folder as the run")
# ---- animate: the portrait ----
_add("animate_no_image", "animate", _animate(image=None), "--image", "no --image")
_add("animate_missing_image", "animate", _animate(image=lambda p: str(p.here / "me.png")), "me.png", "an --image that does not exist")
_add("animate_image_is_text", "animate", _animate(image=lambda p: _m(p, "notes.txt")), "notes.txt", "a text file as --image")
_add("animate_image_is_empty", "animate", _animate(image=lambda p: _m(p, "empty.png")), "empty.png", "an empty --image")
_add("animate_image_too_small", "animate", _animate(image=lambda p: _m(p, "tiny.png")), "tiny.png", "a 40×50 portrait")
_add("animate_image_no_face", "animate", _animate(image=lambda p: _m(p, "gradient.png"), no_detect=None), "--no_detect", "a portrait without a face")
_add("animate_image_is_a_folder", "animate", _animate(image=lambda p: str(p.media)), "--image", "a folder as --image")
# ---- animate: the speech ----
_add("animate_no_audio", "animate", _animate(audio=None), "--audio", "no --audio")
_add("animate_missing_audio", "animate", _animate(audio=lambda p: str(p.here / "me.wav")), "me.wav", "an --audio that does not exist")
_add("animate_audio_is_text", "animate", _animate(audio=lambda p: _m(p, "notes.txt")), "notes.txt", "a text file as --audio")
_add("animate_audio_corrupt", "animate", _animate(audio=lambda p: _m(p, "corrupt.wav")), "corrupt.wav", "random bytes as --audio")
_add("animate_audio_empty", "animate", _animate(audio=lambda p: _m(p, "empty.wav")), "empty.wav", "an empty --audio")
_add("animate_audio_1ms", "animate", _animate(audio=lambda p: _m(p, "1ms.wav")), "1ms.wav", "1 ms of speech")
_add("animate_audio_nan", "animate", _animate(audio=lambda p: _m(p, "nan.wav")), "nan.wav", "speech with NaN samples")
_add("animate_audio_is_an_image", "animate", _animate(audio=lambda p: _m(p, "face.png")), "face.png", "a PNG as --audio")
# ---- animate: the emotion ----
_add("animate_no_emotion", "animate", _animate(emotion=None), "--emotion", "no emotion source")
_add("animate_unknown_emotion", "animate", _animate(emotion="hapy"), "--emotion", "a misspelt label")
_add("animate_malformed_palette", "animate", _animate(emotion="happy:0.6,surprised:"), "--emotion", "a palette item without a weight")
_add("animate_zero_palette", "animate", _animate(emotion="happy:0,sad:0"), "--emotion", "a palette summing to zero")
_add("animate_negative_palette", "animate", _animate(emotion="happy:-1"), "--emotion", "a negative palette weight")
_add("animate_nan_palette", "animate", _animate(emotion="happy:nan"), "--emotion", "a NaN palette weight")
_add("animate_two_emotion_sources", "animate", _animate(emotion_from_audio=True), "--emotion", "a label and --emotion_from_audio")
_add("animate_text_without_source", "animate", _animate(emotion=None, emotion_text="a happy person"), "--emotion_text", "text for a model without a text source")
_add("animate_missing_emotion_video", "animate", _animate(emotion=None, emotion_video=lambda p: str(p.here / "ref.mp4")), "ref.mp4", "an --emotion_video that does not exist")
# ---- animate: numbers ----
_add("animate_zero_steps", "animate", _animate(steps=0), "--steps", "--steps 0")
_add("animate_negative_steps", "animate", _animate(steps=-5), "--steps", "negative --steps")
_add("animate_huge_steps", "animate", _animate(steps=100000), "--steps", "more steps than the schedule has")
_add("animate_nan_guidance", "animate", _animate(cfg_emotion="nan"), "--cfg_emotion", "a NaN guidance scale")
_add("animate_inf_guidance", "animate", _animate(cfg_audio="inf"), "--cfg_audio", "an infinite guidance scale")
_add("animate_negative_guidance", "animate", _animate(cfg_reference=-2), "--cfg_reference", "a negative guidance scale")
_add("animate_unknown_sampler", "animate", _animate(sampler="euler"), "--sampler", "an unknown sampler")
_add("animate_negative_seed", "animate", _animate(seed=-1), "--seed", "a negative seed")
# ---- animate: outputs ----
_add("animate_no_out", "animate", _animate(out=None), "--out", "no --out")
_add("animate_out_not_mp4", "animate", _animate(out=lambda p: str(p.here / "out.gif")), "out.gif", "an --out that is not .mp4")
_add("animate_out_in_missing_folder_under_a_file", "animate", _animate(out=lambda p: _m(p, "face.png") + "/out.mp4"), "face.png", "an --out under a file")
_add("animate_out_is_a_folder", "animate", _animate(out=lambda p: str(p.media) + "/"), "--out", "a folder as --out")
_add("animate_out_unwritable", "animate", _animate(out="/proc/out.mp4"), "/proc", "an --out where nothing can be written")
_add("animate_frames_dir_exists", "animate", _animate(frames_dir=lambda p: str(p.media)), "--frames_dir", "a --frames_dir that exists")
# ---- animate: batch ----
_add("batch_missing_manifest", "animate", lambda p: [f"--checkpoint={p.run}", f"--batch={p.here}/rows.csv"], "rows.csv", "a --batch manifest that does not exist")
_add("batch_missing_column", "animate", _batch("{face},{speech},happy", header="image,audio,emotion"), "out", "a manifest without the out column")
_add("batch_with_image", "animate", lambda p: [f"--checkpoint={p.run}", f"--batch={p.media}/rows.csv", f"--image={p.media}/face.png"], "--image", "--batch with --image")
_add("batch_every_row_bad", "animate", _batch("{here}/gone.png,{speech},happy,{here}/a.mp4\n{face},{speech},grumpy,{here}/b.mp4"), "gone.png", "a manifest whose rows all fail")

# ---- eval / ablate / ladder / analyze / verify / serve ----
_add("eval_no_run", "eval", _fixed(), "RUN", "no run directory")
_add("eval_missing_run", "eval", _run_cmd(run="/nonexistent/run"), "/nonexistent/run", "a run that does not exist")
_add("eval_stage1_run", "eval", _run_cmd(run="stage1"), "stage1", "a run with only stage 1")
_add("eval_zero_steps", "eval", _run_cmd("--steps=0"), "--steps", "--steps 0")
_add("eval_unknown_sampler", "eval", _run_cmd("--sampler=euler"), "--sampler", "an unknown sampler")
_add("eval_reader_is_garbage", "eval", _run_cmd("--reader={media}/corrupt.wav"), "corrupt.wav", "a --reader that is not a reader file")
_add("eval_missing_data_dir", "eval", _run_cmd("--data_dir={here}/no_data", "--dataset=synthetic_talking_faces/tiny"), "no_data", "a --data_dir without the dataset")
_add("ablate_missing_run", "ablate", _run_cmd(run="/nonexistent/run"), "/nonexistent/run", "a run that does not exist")
_add("ablate_unknown_variant", "ablate", _run_cmd("--variants=full,no_brain"), "no_brain", "an unknown ablation")
_add("ablate_negative_steps", "ablate", _run_cmd("--train_steps=-3"), "--train_steps", "negative --train_steps")
_add("ladder_missing_run", "ladder", _run_cmd(run="/nonexistent/run"), "/nonexistent/run", "a run that does not exist")
_add("ladder_unknown_rung", "ladder", _run_cmd("--rungs=ceiling,moon"), "moon", "an unknown rung")
_add("ladder_zero_identities", "ladder", _run_cmd("--identities=0"), "--identities", "--identities 0")
_add("analyze_missing_run", "analyze", _run_cmd(run="/nonexistent/run"), "/nonexistent/run", "a run that does not exist")
_add("analyze_bad_pair", "analyze", _run_cmd("--pair=happy"), "--pair", "a --pair of one emotion")
_add("analyze_unknown_emotion_in_pair", "analyze", _run_cmd("--pair=happy,grumpy"), "grumpy", "an unknown emotion in --pair")
_add("analyze_zero_windows", "analyze", _run_cmd("--windows_per_clip=0"), "--windows_per_clip", "--windows_per_clip 0")
_add("verify_missing_run", "verify", _run_cmd(run="/nonexistent/run"), "/nonexistent/run", "a run that does not exist")
_add("verify_file_as_run", "verify", lambda p: [_m(p, "face.png")], "face.png", "a file as the run")
_add("verify_empty_folder", "verify", lambda p: [_m(p, "empty_folder")], "empty_folder", "a folder with no stages")
_add("serve_port_zero", "serve", _fixed("--checkpoint={run}", "--port=0"), "--port", "--port 0")
_add("serve_port_too_big", "serve", _fixed("--checkpoint={run}", "--port=70000"), "--port", "--port 70000")
_add("serve_negative_queue", "serve", _fixed("--checkpoint={run}", "--queue_size=-1"), "--queue_size", "a negative --queue_size")
_add("serve_zero_upload", "serve", _fixed("--checkpoint={run}", "--max_upload_mb=0"), "--max_upload_mb", "--max_upload_mb 0")
_add("serve_missing_run", "serve", _fixed("--checkpoint={here}/no_run", "--no_warmup"), "no_run", "a --checkpoint that does not exist")


# ---- fixtures ----


@pytest.fixture(scope="module")
def shared(tiny_run, tmp_path_factory):
    """The finished run, a stage-1-only run and the media files; their listing before any case ran."""
    from moee_jax.data.synthetic import generate_clip

    media = tmp_path_factory.mktemp("bad_media")
    clip = generate_clip(1, "happy", num_frames=25, size=128)
    Image.fromarray(clip.frames[0]).save(media / "face.png")
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(media / "tiny.png")
    y, x = np.mgrid[0:128, 0:128]
    Image.fromarray(np.stack([x * 2, y * 2, np.full_like(x, 90)], -1).astype(np.uint8)).save(media / "gradient.png")
    (media / "empty.png").touch()
    (media / "empty.wav").touch()
    (media / "notes.txt").write_text("meeting notes, not a model or a picture\n")
    (media / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    (media / "empty_folder").mkdir()
    sf.write(media / "speech.wav", clip.audio, 16000)
    sf.write(media / "1ms.wav", np.full(16, 0.1, np.float32), 16000)
    nan = clip.audio.copy()
    nan[100:200] = np.nan
    sf.write(media / "nan.wav", nan, 16000, subtype="FLOAT")
    video = media / "clip.mp4"
    rows = {
        "manifest_no_emotion.csv": "path,speaker\nclip.mp4,s1\n",
        "manifest_bad_emotion.csv": "path,speaker,emotion\nclip.mp4,s1,grumpy\n",
        "manifest_bad_intensity.csv": "path,speaker,emotion,intensity\nclip.mp4,s1,happy,3\n",
        "manifest_missing_video.csv": f"path,speaker,emotion\n{video},s1,happy\n",
    }
    for name, text in rows.items():
        (media / name).write_text(text)
    (media / "rows.csv").write_text(f"image,audio,emotion,out\n{media}/face.png,{media}/speech.wav,happy,x.mp4\n")
    stage1 = tmp_path_factory.mktemp("stage1_only") / "run"
    shutil.copytree(pathlib.Path(tiny_run) / "stage2", stage1 / "stage1")
    meta = stage1 / "stage1" / "final" / "metadata.json"
    meta.write_text(meta.read_text().replace('"stage2"', '"stage1"'))
    return {"run": pathlib.Path(tiny_run), "stage1_run": stage1, "media": media}


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


ROWS: dict[str, tuple[str, int, float, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    out = os.environ.get("MOEE_BAD_INPUTS_DOC")
    if out and len(ROWS) == len(CASES):
        lines = ["# Bad input: what each command says", "",
                 f"Generated by `MOEE_BAD_INPUTS_DOC={out} pytest -m slow tests/test_bad_inputs.py`: {len(CASES)} bad inputs, "
                 "each run as a process from an empty folder on 2 CPU cores. Every one exits non-zero with one line naming "
                 "the flag, file or column, without a traceback, and leaves no file behind. `seconds` is the whole "
                 "process, Python and JAX start-up included.", "",
                 "| command | bad input | exit | seconds | message |", "|---|---|---:|---:|---|"]  # fmt: skip
        for name, case in CASES.items():
            what, code, seconds, message = ROWS[name]
            lines.append(f"| `{case.command}` | {what} | {code} | {seconds:.1f} | {message.replace('|', '/')} |")
        (REPO / out).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_is_one_clear_line_with_a_nonzero_exit_and_nothing_left(name, shared, tmp_path):
    case = CASES[name]
    here = tmp_path / "cwd"
    here.mkdir()
    paths = Paths(run=shared["run"], stage1_run=shared["stage1_run"], media=shared["media"], here=here)
    args = case.args(paths)
    before = {k: _listing(shared[k]) for k in ("run", "stage1_run", "media")}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moee_jax.cli", case.command, *args], cwd=here, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    seconds = time.perf_counter() - t0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    message = err[-1] if err else (proc.stdout.strip().splitlines() or [""])[0]
    for k, v in (("run", str(paths.run)), ("stage1_run", str(paths.stage1_run)), ("media", str(paths.media)), ("here", str(here))):
        message = message.replace(v, k.upper())
    ROWS[name] = (case.what, proc.returncode, seconds, message)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert case.names in (err[-1] if err else message), (case.names, message)
    assert _listing(here) == [], _listing(here)
    if case.command != "convert" and ("_out" in name or "run_dir" in name):  # a bad output place: found at once
        assert seconds < 10, seconds
    assert {k: _listing(shared[k]) for k in before} == before  # nothing added to the shared run or media
