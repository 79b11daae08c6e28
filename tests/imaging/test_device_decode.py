"""imaging.device_decode: JPEGs decoded and resized by torch on the encoder's device give the CPU path's pixels.

"Where they can be compared": on every device this machine has (the CPU always; CUDA where a GPU is present, whose
nvJPEG output is compared with the CPU decoder's too), against PIL's full decode and resize (``clip_resize``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imaging import device_decode as dd
from imaging.decode import decode_image
from imaging.preprocess import Preprocess
from testing.images import jpeg_bytes, png_bytes
from testing.images import photo_jpeg as photo

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_PIXELS = 64_000_000


def pp(mode: str, size: tuple[int, int] = (224, 224), interpolation: str = "bicubic") -> Preprocess:
    return Preprocess(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation, resize_mode=mode)


CASES = [photo(640, 480, 0), photo(300, 500, 1), photo(1024, 768, 2), photo(200, 150, 3, mode="L"), jpeg_bytes(4)]


MODES = [("shortest", (224, 224)), ("squash", (224, 224)), ("longest", (224, 224)), ("shortest", (64, 96))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mode", "size"), MODES)
def test_device_pixels_match_pils_decode_and_resize(device: str, mode: str, size: tuple[int, int]) -> None:
    p = pp(mode, size)
    got = dd.decode_to_pixels(dd.unpack(*dd.pack(CASES)), p, torch.device(device)).cpu().numpy()
    assert got.shape == (len(CASES), *size, 3) and got.dtype == np.uint8
    for i, data in enumerate(CASES):
        want = p.to_pixels(decode_image(data, max_pixels=MAX_PIXELS)).astype(int)
        diff = np.abs(got[i].astype(int) - want)
        # Rounding apart (measured: mean 0.04-0.17 levels, 99th percentile 1, a few pixels up to 7 at sharp edges).
        assert diff.mean() <= 0.25 and np.percentile(diff, 99) <= 1, (i, diff.mean(), np.percentile(diff, 99))


def test_eligible_only_what_decodes_the_same_on_the_device() -> None:
    p = pp("shortest")
    assert all(dd.eligible(d, MAX_PIXELS, p) for d in CASES)
    assert dd.eligible(photo(64, 48, exif_orientation=1), MAX_PIXELS, p)
    assert not dd.eligible(photo(64, 48, exif_orientation=6), MAX_PIXELS, p)  # rotated: the CPU path turns it upright
    assert not dd.eligible(photo(64, 48, mode="CMYK"), MAX_PIXELS, p)
    assert not dd.eligible(png_bytes(), MAX_PIXELS, p)
    assert not dd.eligible(photo(640, 480), 640 * 480 - 1, p)  # over the pixel limit: the CPU path answers 413
    assert not dd.eligible(b"\xff\xd8\xff\xe0 not a jpeg at all", MAX_PIXELS, p)
    assert not dd.eligible(b"", MAX_PIXELS, p)
    assert not dd.eligible(photo(64, 48), MAX_PIXELS, pp("shortest", interpolation="lanczos"))


def test_pack_round_trips_and_refuses_offsets_that_do_not_fit() -> None:
    datas = [b"\xff\xd8abc", b"\xff\xd8", b"\xff\xd8xyzw"]
    blob, ends = dd.pack(datas)
    assert [bytes(t.numpy()) for t in dd.unpack(blob, ends)] == datas
    assert dd.unpack(*dd.pack([])) == []
    with pytest.raises(ValueError, match="offsets"):
        dd.unpack(blob, np.array([3, 2, len(blob)]))
    with pytest.raises(ValueError, match="offsets"):
        dd.unpack(blob, np.array([3, len(blob) + 1]))


def test_a_jpeg_the_decoder_refuses_raises() -> None:
    data = photo(640, 480)
    with pytest.raises(RuntimeError):
        dd.decode_to_pixels(dd.unpack(*dd.pack([data[:200]])), pp("shortest"), torch.device("cpu"))
