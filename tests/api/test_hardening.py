"""Hostile bodies in-process (issue 32): deep JSON and lone surrogates are a 4xx naming the problem, never a 500;
the served checks of the same inputs are in tests/test_hardening.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.bodies import MAX_JSON_DEPTH, json_depth, loads
from api.errors import envelope
from errors import Invalid
from service import build_app
from testing.client import assert_error, files
from testing.fakes import fake_engine
from testing.images import jpeg_bytes
from tests import bad_inputs as bad

JSON = {"content-type": "application/json"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine, _ = fake_engine(tmp_path / "data", allow_url_fetch=True, url_allow_hosts="127.0.0.1")
    with TestClient(build_app(engine), raise_server_exceptions=True) as c:
        yield c
    engine.close()


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth(b"") == 0 and json_depth(b"3") == 0 and json_depth(b'"[[["') == 0
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "x\\"[[[[", "b": [[]]}') == 3  # an escaped quote does not end the string
    assert json_depth(bad.nested_json(1000)) == 1001 and json_depth(bad.nested_objects(5000)) == 5001
    assert json_depth(b"]]]]") == 0  # malformed: the parser refuses it afterwards
    with pytest.raises(Invalid, match=f"deeper than {MAX_JSON_DEPTH}"):
        loads(bad.nested_json(100_000))
    with pytest.raises(Invalid, match="Invalid JSON"):
        loads(b"\xff{")
    assert set(loads(bad.nested_json(MAX_JSON_DEPTH - 1))) == {"data"}  # at the limit: parsed


def test_the_depth_check_is_cheap_on_a_large_body() -> None:
    body = json.dumps({"data": ["A" * 4_000_000], "url": []}).encode()
    start = time.perf_counter()
    assert json_depth(body) == 2
    assert time.perf_counter() - start < 1.0  # a generous bound on a loaded machine (it takes a few ms)


@pytest.mark.parametrize("route", [*bad.IMAGE_JSON_ROUTES, "/deploy_classifier", "/embed_text", "/text-embeddings"])
@pytest.mark.parametrize("body", [bad.nested_json(1000), bad.nested_objects(1000), bad.nested_json(100_000)])
def test_deeply_nested_json_is_a_422_on_every_route(client: TestClient, route: str, body: bytes) -> None:
    assert_error(client.post(route, content=body, headers=JSON), 422, f"deeper than {MAX_JSON_DEPTH} levels")


def test_nested_objects_in_url_fields_and_just_deep_enough_bodies(client: TestClient) -> None:
    assert_error(client.post("/embed_image", content=bad.nested_objects(40, "url"), headers=JSON), 422, "deeper")
    # Under the limit: the ordinary answer for the value's type.
    assert_error(client.post("/embed_image", content=bad.nested_json(20), headers=JSON), 422, "'data'")
    assert_error(client.post("/embed_text", content=bad.nested_json(20, "texts"), headers=JSON), 422, "texts")


@pytest.mark.parametrize(("route", "body", "field"), bad.surrogate_bodies())
def test_a_lone_surrogate_is_a_422_naming_the_field(client: TestClient, route: str, body: bytes, field: str) -> None:
    r = client.post(route, content=body, headers=JSON)
    assert_error(r, 422)
    message = r.json()["message"]
    assert field in message and ("surrogate" in message or "unicode" in message.lower()), message


def test_a_lone_surrogate_in_a_field_name_or_a_message_never_makes_the_answer_unencodable(client: TestClient) -> None:
    assert_error(client.post("/embed_text", content=b'{"texts": ["a"], "\\ud800": 1}', headers=JSON), 422)
    # A message quoting such a character (a field name in a validation error) carries it as an escape.
    assert json.loads(envelope(422, "field \ud800 x").body)["message"] == "field \\ud800 x"


def test_valid_unicode_still_embeds(client: TestClient) -> None:
    r = client.post("/embed_text", json={"texts": ["caf\u00e9", "\U0001f600 smile", "\u4e2d\u6587"]})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 3


def test_a_decode_that_cannot_get_its_pixels_is_a_503_with_retry_after(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path / "data", decode_budget_mp=1, decode_wait_s=0.1)
    budget = engine.limits.budget
    assert budget is not None and budget.max_pixels == 1_000_000
    with TestClient(build_app(engine), raise_server_exceptions=True) as c:
        with budget.hold(budget.max_pixels):  # another request's decode holds the whole budget
            r = c.post("/embed_image", files=files(jpeg_bytes(1)))
        assert_error(r, 503, "decoding too many image pixels")
        assert r.headers["retry-after"] == "1"
        assert c.post("/embed_image", files=files(jpeg_bytes(1))).status_code == 200  # and then it is free
    engine.close()
