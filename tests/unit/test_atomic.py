"""Atomic writes: complete files only, with the permissions any other file the user writes would get."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sdxl_split.shared.atomic import atomic_write_bytes


def test_atomic_write_honours_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "image.png", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "image.png").stat().st_mode) == 0o644
    assert (tmp_path / "image.png").read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
