"""imaging/budget.py: pixels decoded at once per worker (issue 32, item 2); the route's 503 is in
tests/api/test_hardening.py."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imaging.budget import DecodeBusy, PixelBudget
from imaging.decode import decode_image, webp_size
from imaging.sources import ImageLimits, ImageSource, load_image
from tests import bad_inputs as bad


def test_holds_wait_for_their_share_and_an_oversized_one_runs_alone() -> None:
    budget = PixelBudget(1000, wait_s=5.0)
    order: list[str] = []
    with budget.hold(700):
        started = threading.Event()

        def second() -> None:
            started.set()
            with budget.hold(700):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        started.wait(5)
        time.sleep(0.2)
        order.append("first done")  # the second is still waiting: 700 + 700 > 1000
    t.join(5)
    assert order == ["first done", "second"]
    with budget.hold(10**9):  # larger than the budget: takes all of it
        assert budget.in_use == 1000
    assert budget.in_use == 0 and budget.peak == 1000


def test_a_hold_that_cannot_get_its_share_in_time_is_a_503_with_retry_after() -> None:
    budget = PixelBudget(1000, wait_s=0.2)
    with budget.hold(1000), pytest.raises(DecodeBusy) as exc:
        with budget.hold(1):
            pass
    assert exc.value.status_code == 503 and exc.value.headers == {"Retry-After": "1"}
    assert budget.in_use == 0


def test_a_failed_decode_gives_its_pixels_back() -> None:
    budget = PixelBudget(10_000_000)
    for blob in (bad.truncated_png(), bad.truncated_jpeg()):
        with pytest.raises(Exception, match="Invalid image"):
            decode_image(blob, max_pixels=10**8, budget=budget)
    assert budget.in_use == 0 and budget.peak > 0


def test_concurrent_decodes_never_hold_more_than_the_budget() -> None:
    """Eight 0.5 MP PNGs decoded by eight threads under a 1 MP budget: at most two at once, every one decoded."""
    budget = PixelBudget(1_000_000, wait_s=60)
    limits = ImageLimits(max_pixels=10**8, max_bytes=10**8, budget=budget)
    blob = bad.png(1000, 500)
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: load_image(ImageSource("bytes", blob), limits).size, range(8)))
    assert sizes == [(1000, 500)] * 8
    assert budget.peak <= 1_000_000 and budget.in_use == 0


def test_jpeg_drafts_hold_only_what_they_decode() -> None:
    budget = PixelBudget(10**8)
    img = decode_image(bad.large_jpeg(2000, 1000), max_pixels=10**8, draft_size=224, budget=budget)
    assert img.size[0] * img.size[1] == budget.peak < 2000 * 1000 // 4


def test_a_webp_is_sized_from_its_header_and_held_before_pillow_allocates_its_canvas() -> None:
    for lossless in (True, False):
        img = bad.noise_image(70, 30)
        buf = io.BytesIO()
        img.save(buf, "WEBP", lossless=lossless)
        assert webp_size(buf.getvalue()) == (70, 30)
    vp8x, _ = bad.webp_rgba()
    assert webp_size(vp8x) == (2, 2) and webp_size(bad.png()) is None and webp_size(b"RIFF") is None
    # A WebP over the pixel limit is refused from its header: Pillow would allocate the whole canvas on open.
    side = (16383 - 1).to_bytes(3, "little")
    huge = b"RIFF" + (22).to_bytes(4, "little") + b"WEBPVP8X" + (10).to_bytes(4, "little") + b"\0" * 4 + side + side
    assert webp_size(huge) == (16383, 16383)
    with pytest.raises(Exception, match="Image too large: 16383x16383") as exc:
        decode_image(huge, max_pixels=64_000_000)
    assert getattr(exc.value, "status_code", None) == 413
    budget = PixelBudget(10**6, wait_s=0.1)
    with budget.hold(10**6), pytest.raises(DecodeBusy):  # the budget is asked before the file is opened
        decode_image(buf.getvalue(), max_pixels=10**8, budget=budget)
