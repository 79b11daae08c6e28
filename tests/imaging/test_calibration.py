"""Calibration images for OpenVINO's static int8 image tower (imaging/calibration.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imaging.calibration import calibration_set
from imaging.preprocess import Preprocess
from testing.images import jpeg_bytes


def calibration_pixels(pp: Preprocess, directory: Path | None, count: int = 32) -> tuple[np.ndarray, str]:
    cal = calibration_set(pp, directory, count)
    return cal.pixels(), cal.digest


PP = Preprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_the_synthetic_set_is_the_same_everywhere_and_varied() -> None:
    px, digest = calibration_pixels(PP, None, count=8)
    again, digest_again = calibration_pixels(PP, None, count=8)
    assert px.shape == (8, 32, 32, 3) and px.dtype == np.uint8
    np.testing.assert_array_equal(px, again)  # a fixed seed: every machine builds the same export
    assert digest == digest_again
    assert calibration_pixels(PP, None, count=4)[1] != digest  # another set, another key
    # Photo-like, not flat: the images differ from one another and span the value range.
    assert len({row.tobytes() for row in px}) == 8
    assert px.min() < 40 and px.max() > 215
    assert float(px.reshape(8, -1).std(axis=1).min()) > 5


def test_the_synthetic_set_is_drawn_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its digest keys the export; its pixels are needed only to build one, so a start that reuses it draws none."""
    import imaging.calibration as calibration

    drawn = []
    real = calibration.synthetic_scene
    monkeypatch.setattr(calibration, "synthetic_scene", lambda rng: drawn.append(1) or real(rng))
    cal = calibration_set(PP, None, count=3)
    assert not drawn
    assert cal.pixels().shape == (3, 32, 32, 3) and len(drawn) == 3


def test_a_folder_gives_its_first_images_by_name_and_skips_what_is_not_one(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    (tmp_path / "0-broken.jpg").write_bytes(b"not a jpeg")  # sorts second: skipped, not fatal
    (tmp_path / "readme.txt").write_text("ignored")
    px, digest = calibration_pixels(PP, tmp_path, count=3)
    assert px.shape == (3, 32, 32, 3)
    first = calibration_pixels(PP, tmp_path, count=1)[0]
    np.testing.assert_array_equal(px[:1], first)  # 0.jpg comes first
    (tmp_path / "2.jpg").write_bytes(jpeg_bytes(seed=7))  # one of the three changes: so does the digest
    assert calibration_pixels(PP, tmp_path, count=3)[1] != digest
    (tmp_path / "4.jpg").write_bytes(jpeg_bytes(seed=8))  # past the first three: the set is unchanged
    assert calibration_pixels(PP, tmp_path, count=3)[1] == calibration_pixels(PP, tmp_path, count=3)[1]


@pytest.mark.parametrize("kind", ["missing", "empty", "no images"])
def test_a_folder_without_images_is_refused_naming_the_setting(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "calibration"
    if kind != "missing":
        folder.mkdir()
    if kind == "no images":
        (folder / "a.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="ZSS_CLIP_INT8_CALIBRATION"):
        calibration_set(PP, folder)
