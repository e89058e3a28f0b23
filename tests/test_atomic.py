"""Files written all or nothing get the user's umask like any other new file."""

from __future__ import annotations

import os
import stat

import pytest

from moee_jax import atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_umask_is_read_without_changing_it(mask):
    assert atomic.umask() == mask
    assert atomic.umask() == mask


def test_atomic_files_and_folders_get_the_umask_not_mkstemps_0600(tmp_path, mask):
    written = atomic.atomic_write_text(tmp_path / "out" / "clip.json", "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
    with atomic.atomic_directory(tmp_path / "frames") as staging:
        (staging / "0.png").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "frames").stat().st_mode) == 0o777 & ~mask


def test_a_failed_write_leaves_nothing(tmp_path):
    def fail(path):
        open(path, "wb").write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(tmp_path / "clip.mp4", fail)
    assert list(tmp_path.iterdir()) == []
