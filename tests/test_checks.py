"""The checks every command runs before any work (moee_jax.checks): each names the flag and the value
and creates nothing."""

from __future__ import annotations

import pytest

from moee_jax import checks


@pytest.mark.parametrize(
    ("value", "bounds", "words"),
    [
        (float("nan"), {}, "finite"),
        (float("inf"), {"minimum": 0}, "finite"),
        (-1, {"minimum": 0}, ">= 0"),
        (0, {"above": 0}, "> 0"),
        (2.5, {"integer": True}, "whole number"),
        (11, {"maximum": 10}, "<= 10"),
        ("many", {}, "not a number"),
    ],
)
def test_a_bad_number_names_the_flag_the_value_and_the_rule(value, bounds, words):
    with pytest.raises(checks.UsageError) as err:
        checks.number(value, "--steps", **bounds)
    assert str(err.value).startswith(f"--steps {value}") or str(err.value).startswith(f"--steps {value!r}")
    assert words in str(err.value)


def test_good_numbers_and_unset_flags_pass():
    assert checks.number(3, "--steps", minimum=1, integer=True) == 3
    assert checks.number(None, "--steps", minimum=1) is None
    assert checks.one_of(["full", "no_moe"], "--variants", ("full", "no_moe", "no_global")) == ["full", "no_moe"]
    with pytest.raises(checks.UsageError, match="--variants 'no_brain': unknown; choose from full, no_moe"):
        checks.one_of(["full", "no_brain"], "--variants", ("full", "no_moe"))


def test_an_output_under_a_file_or_in_the_wrong_kind_of_place_is_refused_and_nothing_is_created(tmp_path):
    a_file = tmp_path / "face.png"
    a_file.write_bytes(b"x")
    with pytest.raises(checks.UsageError, match="face.png is a file, so nothing can be created under it"):
        checks.writable_location(a_file / "out" / "video.mp4", "--out")
    with pytest.raises(checks.UsageError, match="--out .*: is a folder; give a file path"):
        checks.writable_location(tmp_path, "--out")
    with pytest.raises(checks.UsageError, match="--run_dir .*face.png: is a file; give a folder"):
        checks.writable_location(a_file, "--run_dir", kind="folder")
    assert checks.writable_location(tmp_path / "new" / "deeper" / "video.mp4", "--out")  # creatable: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.png"]  # nothing created, no probe left


def test_an_unwritable_place_and_a_full_disk_are_refused(tmp_path):
    with pytest.raises(checks.UsageError, match="not writable"):
        checks.writable_location("/proc/video.mp4", "--out")
    with pytest.raises(checks.UsageError, match="MB free on that disk"):
        checks.writable_location(tmp_path / "video.mp4", "--out", min_free_mb=1e12)


def test_input_files_must_exist_be_files_and_hold_something(tmp_path):
    (tmp_path / "empty.wav").touch()
    for path, words in ((tmp_path / "gone.wav", "no such file"), (tmp_path, "is a folder"), (tmp_path / "empty.wav", "empty")):
        with pytest.raises(checks.UsageError, match=words):
            checks.input_file(path, "--audio")
