"""imaging.decode: decoding untrusted bytes into RGB images, refusing bad input with the right status."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

from imaging.decode import (
    FLATTEN_BACKGROUND,
    INVALID_IMAGE_MESSAGE,
    ImageInputError,
    decode_base64_image,
    decode_image,
)
from tests import bad_inputs

LIMIT = 64_000_000


def decode(data: bytes, **kw: object) -> Image.Image:
    kw.setdefault("max_pixels", LIMIT)
    img = decode_image(data, **kw)  # type: ignore[arg-type]
    assert img.mode == "RGB"
    return img


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(bad_inputs.invalid_inputs()))
def test_invalid_inputs_are_422_with_the_directai_message(name: str) -> None:
    data = bad_inputs.invalid_inputs()[name]
    with pytest.raises(ImageInputError) as err:
        decode_image(data, max_pixels=LIMIT)
    assert err.value.status_code == 422
    assert err.value.message == INVALID_IMAGE_MESSAGE == str(err.value)


def test_truncated_files_fail_even_when_their_header_is_fine() -> None:
    for data in (bad_inputs.truncated_jpeg(), bad_inputs.truncated_png()):
        assert Image.open(io.BytesIO(data)).size == (256, 256)  # the header alone looks valid
        with pytest.raises(ImageInputError) as err:
            decode_image(data, max_pixels=LIMIT)
        assert err.value.status_code == 422


def test_eps_is_refused_although_pillow_recognises_it() -> None:
    Image.open(io.BytesIO(bad_inputs.eps_file()))  # Pillow would open it (and run Ghostscript on load)
    with pytest.raises(ImageInputError):
        decode_image(bad_inputs.eps_file(), max_pixels=LIMIT)


def test_huge_header_is_413_before_decoding() -> None:
    data = bad_inputs.huge_header_png()  # 50000 x 50000: also past Pillow's own bomb limit
    assert len(data) < 10_000
    with pytest.raises(ImageInputError) as err:
        decode_image(data, max_pixels=LIMIT)
    assert err.value.status_code == 413
    assert "2500000000 pixels" in err.value.message and str(LIMIT) in err.value.message


def test_our_pixel_limit_applies_below_pillows() -> None:
    # 9000 x 9000 = 81 M pixels: under Pillow's warning threshold (~89 M), over our 64 M limit. The file holds one
    # row of pixel data, so a decode attempt would allocate 243 MB and then fail as truncated (422), not 413.
    with pytest.raises(ImageInputError) as err:
        decode_image(bad_inputs.huge_header_png(9000, 9000), max_pixels=LIMIT)
    assert err.value.status_code == 413
    assert err.value.message == "Image too large: 9000x9000 = 81000000 pixels exceeds the limit of 64000000 pixels."


def test_pixel_limit_is_exact() -> None:
    data = bad_inputs.png(100, 100)
    assert decode(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageInputError) as err:
        decode_image(data, max_pixels=9_999)
    assert err.value.status_code == 413


def test_bomb_warning_as_error_is_413() -> None:
    # With warnings escalated to errors Pillow raises DecompressionBombWarning from open() above ~89 M pixels.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageInputError) as err:
            decode_image(bad_inputs.huge_header_png(10_000, 10_000), max_pixels=10**9)
    assert err.value.status_code == 413


def test_pillow_global_state_is_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageInputError):
        decode_image(bad_inputs.truncated_jpeg(), max_pixels=LIMIT)
    decode(bad_inputs.jpeg())
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_input_buffer_is_not_mutated() -> None:
    data = bytearray(bad_inputs.png())
    copy = bytes(data)
    decode(data)  # type: ignore[arg-type]
    assert bytes(data) == copy


# -- modes and containers ------------------------------------------------------------------------------------------
def test_one_by_one() -> None:
    img = decode(bad_inputs.one_by_one_png((10, 20, 30)))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_jpeg_decodes_to_the_right_rgb() -> None:
    data, expected = bad_inputs.cmyk_jpeg()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    got = px(decode(data))
    assert np.abs(got - np.array(expected)).max() <= 3


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    data, expected = bad_inputs.png_16bit_grey()
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(decode(data))
    assert np.array_equal(got[..., 0], expected)
    assert np.array_equal(got[..., 0], got[..., 2])
    assert got[0, 3, 0] == 128  # 32768 -> 128; clipping would give 255


def test_16bit_rgb_png() -> None:
    data, expected = bad_inputs.png_16bit_rgb()
    got = px(decode(data))
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize(
    "builder", ["palette_png_transparent", "rgba_png", "la_png", "bilevel_png", "float_tiff", "webp_rgba"]
)
def test_modes_convert_exactly(builder: str) -> None:
    data, expected = getattr(bad_inputs, builder)()
    assert np.array_equal(np.asarray(decode(data)), expected)


def test_transparency_flattens_onto_mid_grey() -> None:
    assert FLATTEN_BACKGROUND == bad_inputs.GREY == (128, 128, 128)
    fully_transparent = io.BytesIO()
    Image.new("RGBA", (3, 3), (255, 255, 255, 0)).save(fully_transparent, "PNG")
    assert decode(fully_transparent.getvalue()).getpixel((1, 1)) == (128, 128, 128)


def test_rgb_png_with_trns_colour_key() -> None:
    buf = io.BytesIO()
    img = Image.new("RGB", (2, 1), (0, 0, 0))
    img.putpixel((1, 0), (200, 10, 10))
    img.save(buf, "PNG", transparency=(0, 0, 0))
    assert list(decode(buf.getvalue()).getdata()) == [(128, 128, 128), (200, 10, 10)]


def test_grey_jpeg() -> None:
    img = decode(bad_inputs.grey_jpeg())
    r, g, b = img.getpixel((8, 8))
    assert r == g == b and abs(r - 100) <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_lossless(orientation: int) -> None:
    data, upright = bad_inputs.exif_rotated(orientation, "PNG")
    assert np.array_equal(np.asarray(decode(data)), np.asarray(upright))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_jpeg(orientation: int) -> None:
    data, upright = bad_inputs.exif_rotated_jpeg(orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == orientation
    img = decode(data)
    assert img.size == upright.size
    assert np.abs(px(img) - px(upright)).max() <= 8


def test_exif_pixels_really_are_rotated_in_the_file() -> None:
    data, upright = bad_inputs.exif_rotated(6, "PNG")
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    assert stored.size == (upright.height, upright.width)
    assert not np.array_equal(np.asarray(stored.transpose(Image.Transpose.ROTATE_90)), np.asarray(upright))


def test_animated_gif_and_webp_give_the_first_frame() -> None:
    for builder in (bad_inputs.animated_gif, bad_inputs.animated_webp):
        data, first = builder()
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
        img = decode(data)
        assert img.getpixel((8, 8)) == first


@pytest.mark.parametrize("builder", ["webp", "bmp"])
def test_other_formats_lossless(builder: str) -> None:
    data, expected = getattr(bad_inputs, builder)()
    assert np.array_equal(np.asarray(decode(data)), np.asarray(expected))


def test_mpo_gives_the_first_picture_and_honours_draft() -> None:
    data, first = bad_inputs.mpo()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    img = decode(data, draft_size=100)
    assert img.size == (200, 150)
    assert np.abs(px(img)[75, 100] - np.array(first)).max() <= 3


def test_avif() -> None:
    assert features.check("avif"), "the pinned Pillow wheels ship AVIF; the decoder allows it, so it must decode"
    data, color = bad_inputs.avif()
    assert np.abs(px(decode(data))[8, 8] - np.array(color)).max() <= 6


def test_ico_is_refused() -> None:
    with pytest.raises(ImageInputError) as err:
        decode_image(bad_inputs.ico(), max_pixels=LIMIT)
    assert err.value.status_code == 422


# -- JPEG draft ----------------------------------------------------------------------------------------------------
def test_draft_decodes_large_jpeg_at_reduced_scale_but_not_below_draft_size() -> None:
    data = bad_inputs.large_jpeg(2000, 1000)
    assert decode(data).size == (2000, 1000)
    img = decode(data, draft_size=224)
    assert img.size == (500, 250)  # scale 1/4: 1/8 would make the short side 125 < 224
    assert min(img.size) >= 224


def test_draft_is_ignored_for_small_jpegs_and_other_formats() -> None:
    assert decode(bad_inputs.jpeg(64, 48), draft_size=224).size == (64, 48)
    assert decode(bad_inputs.png(600, 600), draft_size=224).size == (600, 600)


def test_draft_with_exif_rotation() -> None:
    data, upright = bad_inputs.exif_rotated_jpeg(6, 1600, 1200)  # stored 1200 x 1600
    img = decode(data, draft_size=224)
    assert img.size == (400, 300) and min(img.size) >= 224
    small = px(upright.resize(img.size, Image.Resampling.BOX))
    got = px(img)
    for y, x in ((75, 100), (75, 300), (225, 100), (225, 300)):  # quadrant centres
        assert np.abs(got[y, x] - small[y, x]).max() <= 8


def test_draft_does_not_lift_the_pixel_limit() -> None:
    with pytest.raises(ImageInputError) as err:
        decode_image(bad_inputs.large_jpeg(2000, 1000), max_pixels=1_000_000, draft_size=224)
    assert err.value.status_code == 413


# -- base64 --------------------------------------------------------------------------------------------------------
def test_base64_plain_data_uri_urlsafe_and_wrapped() -> None:
    raw = bad_inputs.one_by_one_png((1, 2, 3))
    b64 = base64.b64encode(raw).decode()
    variants = [
        b64,
        "  " + b64 + "\n",
        "data:image/png;base64," + b64,
        "DATA:image/png;charset=utf-8;BASE64," + b64,
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
    ]
    for s in variants:
        assert decode_base64_image(s, max_pixels=LIMIT).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not base64 at all!", "base64"),
        ("abcde", "base64"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64", "data URI"),
    ],
)
def test_bad_base64_is_422_with_a_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(ImageInputError) as err:
        decode_base64_image(text, max_pixels=LIMIT)
    assert err.value.status_code == 422
    assert fragment in err.value.message


def test_base64_of_non_image_or_empty_is_the_invalid_image_error() -> None:
    for text in ("", "   ", "data:image/png;base64,", base64.b64encode(b"hello world").decode()):
        with pytest.raises(ImageInputError) as err:
            decode_base64_image(text, max_pixels=LIMIT)
        assert (err.value.status_code, err.value.message) == (422, INVALID_IMAGE_MESSAGE)


def test_base64_max_bytes() -> None:
    raw = bad_inputs.png(64, 64)
    b64 = base64.b64encode(raw).decode()
    assert decode_base64_image(b64, max_pixels=LIMIT, max_bytes=len(raw)).size == (64, 64)
    with pytest.raises(ImageInputError) as err:
        decode_base64_image(b64, max_pixels=LIMIT, max_bytes=len(raw) - 1)
    assert err.value.status_code == 413
    with pytest.raises(ImageInputError) as err:
        decode_base64_image("A" * 4000, max_pixels=LIMIT, max_bytes=100)
    assert err.value.status_code == 413


def test_base64_decodes_with_draft_and_limit() -> None:
    b64 = base64.b64encode(bad_inputs.large_jpeg(2000, 1000)).decode()
    assert decode_base64_image(b64, max_pixels=LIMIT, draft_size=224).size == (500, 250)
    with pytest.raises(ImageInputError) as err:
        decode_base64_image(b64, max_pixels=1000)
    assert err.value.status_code == 413


# -- fuzz ----------------------------------------------------------------------------------------------------------
_SEEDS = [bad_inputs.png(16, 16), bad_inputs.jpeg(16, 16), bad_inputs.animated_gif()[0], bad_inputs.webp()[0]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_corrupted_files_either_decode_to_rgb_or_raise_image_input_error(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: max(1, cut % (len(data) + 1))]
    try:
        img = decode_image(bytes(data), max_pixels=100_000)
    except ImageInputError as exc:
        assert exc.status_code in (413, 422)
    else:
        assert img.mode == "RGB" and img.size[0] * img.size[1] <= 100_000


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with pytest.raises(ImageInputError):
        decode_image(data, max_pixels=LIMIT)
