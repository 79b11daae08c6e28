"""engine.admission: image requests refused at the door when the images queued ahead would take longer than the
bound (issue 18, item 2), with Retry-After; before they are decoded."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.admission import Admission, Overloaded
from service import build_app
from testing.client import assert_error
from testing.fakes import fake_engine


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_admits_until_the_queued_images_would_take_longer_than_the_bound() -> None:
    clock = Clock()
    gate = Admission(bound_s=3.0, clock=clock)
    gate.enter(40)  # no rate measured yet: admitted whatever is in flight
    gate.enter(40)
    clock.t += 1.0
    gate.leave(10, answered=True)  # 10 images answered in the last second: ~10 images/s
    clock.t += 1.0
    with pytest.raises(Overloaded) as exc:  # 70 in flight at ~5-10/s: far over 3 s
        gate.enter(1)
    assert exc.value.status_code == 503 and exc.value.retry_after_s >= 1
    gate.leave(70, answered=False)  # shed or failed: out, but not counted as answered
    gate.enter(5)  # nothing in flight: admitted
    assert gate.expected_wait_s() < 3.0
    clock.t += 10  # the rate is forgotten after the window: admitted again
    gate.enter(500)


def test_an_overloaded_api_refuses_before_decoding_with_retry_after(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path / "data")
    clock = Clock()
    engine.admission = Admission(bound_s=1.0, clock=clock)
    engine.admission.enter(100)
    engine.admission.leave(1, answered=True)
    with TestClient(build_app(engine), raise_server_exceptions=True) as c:
        # Not an image: decoding would answer 422; the refusal comes first.
        r = c.post("/embed_image", files=[("data", ("x.jpg", b"not an image", "image/jpeg"))])
        assert_error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        engine.admission.leave(99, answered=False)
        r = c.post("/embed_image", files=[("data", ("x.jpg", b"not an image", "image/jpeg"))])
        assert r.status_code == 422, r.text
    engine.close()
