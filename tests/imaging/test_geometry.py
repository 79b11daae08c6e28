"""imaging.geometry: every resize and box mapping, with literal expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imaging.geometry import (
    clip_resize,
    fit_longer_side,
    pad_to_square,
    padded_square_cxcywh_to_xyxy,
    scale_boxes,
    shrink_to,
)


def test_fit_longer_side_and_shrink_factors() -> None:
    assert fit_longer_side(640, 200, 64) == (64, 20)
    assert fit_longer_side(90, 300, 64) == (19, 64)
    assert fit_longer_side(1, 10_000, 64) == (1, 64)  # never 0 wide
    small, sx, sy = shrink_to(Image.new("RGB", (640, 200)), 64)
    assert small.size == (64, 20) and (sx, sy) == (10.0, 10.0)
    same, sx, sy = shrink_to(Image.new("RGB", (60, 40)), 64)
    assert same.size == (60, 40) and (sx, sy) == (1.0, 1.0)  # never enlarged


def test_scale_boxes_maps_back_to_original_pixels() -> None:
    got = scale_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 10.0, 0.5)
    assert got.tolist() == [[10.0, 1.0, 30.0, 2.0]]


def test_pad_to_square_keeps_the_image_top_left() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    batch = pad_to_square([img], 8)
    assert batch.shape == (1, 3, 8, 8)
    assert np.allclose(batch[0, 0, :4, :], 1.0) and np.allclose(batch[0, :, 4:, :], 0.0)  # 8x4 image, padding below


@pytest.mark.parametrize(("mode", "size"), [("shortest", (300, 200)), ("longest", (300, 200)), ("squash", (50, 500))])
def test_clip_resize_gives_the_input_size(mode: str, size: tuple[int, int]) -> None:
    assert clip_resize(Image.new("RGB", size), (32, 32), mode).size == (32, 32)


@pytest.mark.parametrize(("width", "height"), [(40, 90), (90, 40), (64, 64)])
def test_padded_square_mapping(width: int, height: int) -> None:
    side = max(width, height)
    # A box exactly covering the image content inside the padded square maps to the full image.
    full = torch.tensor([[width / side / 2, height / side / 2, width / side, height / side]])
    torch.testing.assert_close(
        padded_square_cxcywh_to_xyxy(full, width, height), torch.tensor([[0.0, 0.0, float(width), float(height)]])
    )
    # An interior box: square units times the longer side, no clipping needed.
    box = torch.tensor([[0.2, 0.3, 0.1, 0.2]])
    want = torch.tensor([[0.15 * side, 0.2 * side, 0.25 * side, 0.4 * side]])
    got = padded_square_cxcywh_to_xyxy(box, width, height, clip=False)
    torch.testing.assert_close(got, want)
    # Boxes reaching into the padding are clipped to the image.
    whole_square = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(
        padded_square_cxcywh_to_xyxy(whole_square, width, height),
        torch.tensor([[0.0, 0.0, float(width), float(height)]]),
    )
    torch.testing.assert_close(
        padded_square_cxcywh_to_xyxy(whole_square, width, height, clip=False),
        torch.tensor([[0.0, 0.0, float(side), float(side)]]),
    )
