"""Issue 32's probe through a real `bentoml serve` (the session server): hostile bodies are a 4xx, never a 500, and
the server answers at the HTTP level as it should (headers, redirects, oversized headers)."""

from __future__ import annotations

import pytest

from api.bodies import MAX_JSON_DEPTH
from testing.client import assert_error
from testing.server import Server
from tests import bad_inputs as bad

pytestmark = pytest.mark.server

JSON = {"content-type": "application/json"}


def test_deeply_nested_json_is_a_422_on_every_route(server: Server) -> None:
    routes = [*bad.IMAGE_JSON_ROUTES, "/deploy_classifier", "/deploy_detector", "/embed_text", "/text-embeddings"]
    with server.client() as c:
        for route in routes:
            for body in (bad.nested_json(1000), bad.nested_objects(1000, "url")):
                assert_error(c.post(route, content=body, headers=JSON), 422, f"deeper than {MAX_JSON_DEPTH} levels")


def test_a_lone_surrogate_is_a_422_naming_the_field_and_no_job_fails(server: Server) -> None:
    with server.client() as c:
        for route, body, field in bad.surrogate_bodies():
            r = c.post(route, content=body, headers=JSON)
            assert_error(r, 422, field)
        jobs = c.get("/jobs").json()["jobs"]
        assert not [j for j in jobs if j["state"] == "failed"], jobs
        # The server still embeds ordinary (and non-ASCII) text.
        r = c.post("/embed_text", json={"texts": ["caf\u00e9 \U0001f600"]})
        assert r.status_code == 200, r.text
