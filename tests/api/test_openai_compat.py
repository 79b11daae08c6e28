"""api.openai_compat in-process (fake encoders, real engine): OpenAI's embeddings API over the embedding routes, and
its error shape for every failure under /v1 (the edge's too). tests/test_protocols.py runs the official client."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.inputs import MAX_IMAGES_PER_REQUEST
from errors import Unavailable
from service import build_app
from testing.client import assert_error, bearer, files
from testing.fakes import FakeClip, fake_engine
from testing.images import jpeg_bytes, png_bytes
from testing.tenancy import KEY_A, key_file


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, FakeClip]]:
    engine, clip = fake_engine(tmp_path / "data", max_body_bytes=2**20)
    with TestClient(build_app(engine)) as client:
        yield client, clip
    engine.close()


@pytest.fixture
def client(served: tuple[TestClient, FakeClip]) -> TestClient:
    return served[0]


def uri(blob: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(blob).decode()}"


def openai_error(r: object, status: int, param: str | None, code: str | None = None) -> dict[str, object]:
    assert_error(r, status)  # type: ignore[arg-type]
    err = r.json()["error"]  # type: ignore[attr-defined]
    assert err["param"] == param and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_models_lists_the_served_id_and_the_aliases(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list" and ids[0] == "fake-clip" and "clip" in ids and "ViT-B-32" in ids
    assert all(m["object"] == "model" and m["owned_by"] and isinstance(m["created"], int) for m in body["data"])
    assert client.get("/v1/models/clip").json()["id"] == "clip"
    openai_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_text_vectors_are_those_of_embed_text_in_both_encodings(client: TestClient) -> None:
    texts = ["a cat", "a red car on a road"]
    ref = np.array(client.post("/embed_text", json={"texts": texts, "augment_examples": False}).json()["embeddings"])
    r = client.post("/v1/embeddings", json={"model": "clip", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "clip"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), ref.astype(np.float32))
    assert body["usage"] == {"prompt_tokens": 2 + 2 + 6 + 2, "total_tokens": 12}  # the fake: words + 2 markers
    b64 = client.post("/v1/embeddings", json={"model": "fake-clip", "input": texts, "encoding_format": "base64"})
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64.json()["data"]])
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    one = client.post("/v1/embeddings", json={"model": "clip", "input": "a cat"}).json()
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == body["data"][0]["embedding"]


def test_image_vectors_are_those_of_embed_image(client: TestClient) -> None:
    blobs = [jpeg_bytes(1), png_bytes(2)]
    ref = np.array(client.post("/embed_image", files=files(*blobs)).json()["embeddings"], np.float32)
    inputs = [uri(blobs[0]), base64.b64encode(blobs[1]).decode()]  # a data URI and plain base64
    r = client.post("/v1/embeddings", json={"model": "clip", "input": inputs, "modality": "image"})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), ref)
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
        ({"model": "clip", "input": []}, 422, "input"),
        ({"model": "clip", "input": ""}, 422, "input"),
        ({"model": "clip", "input": ["a", " "]}, 422, "input"),
        ({"model": "clip", "input": [1, 2, 3]}, 422, "input"),  # token arrays
        ({"model": "clip", "input": [[1, 2]]}, 422, "input"),
        ({"model": "clip", "input": 3}, 422, "input"),
        ({"input": "x"}, 422, "model"),
        ({"model": "clip", "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"model": "clip", "input": "x", "dimensions": 4}, 422, "dimensions"),
        ({"model": "clip", "input": "x", "modality": "audio"}, 422, "modality"),
        ({"model": "clip", "input": "x", "temperature": 1}, 422, "temperature"),
        ({"model": "clip", "input": ["not an image"], "modality": "image"}, 422, "input"),
        ({"model": "clip", "input": [uri(b"\xff\xd8\xff\xe0 broken")], "modality": "image"}, 422, "input"),
        ({"model": "clip", "input": ["http://127.0.0.1/x.jpg"], "modality": "image"}, 400, "input"),  # fetching off
    ],
)
def test_bad_requests_get_openais_error_shape(
    client: TestClient, body: dict[str, object], status: int, param: str
) -> None:
    openai_error(client.post("/v1/embeddings", json=body), status, param)


def test_the_models_own_dimensions_are_accepted(client: TestClient) -> None:
    dim = len(client.post("/embed_text", json={"texts": ["x"]}).json()["embeddings"][0])
    assert client.post("/v1/embeddings", json={"model": "clip", "input": "x", "dimensions": dim}).status_code == 200


def test_too_many_images_is_413_and_not_json_is_422(client: TestClient) -> None:
    many = [uri(png_bytes(0, (8, 8)), "png")] * (MAX_IMAGES_PER_REQUEST + 1)
    openai_error(
        client.post("/v1/embeddings", json={"model": "clip", "input": many, "modality": "image"}), 413, "input"
    )
    openai_error(client.post("/v1/embeddings", content=b"{nope"), 422, None)
    openai_error(client.post("/v1/embeddings", content=b"x" * (2**20 + 1)), 413, None)  # the body limit
    openai_error(client.get("/v1/nothing"), 404, None)
    openai_error(client.get("/v1/embeddings"), 405, None)


def test_the_edges_errors_read_as_openais_too(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(key_file())
    keys.chmod(0o600)
    engine, _ = fake_engine(tmp_path / "data", api_keys=str(keys))
    with TestClient(build_app(engine)) as c:
        err = openai_error(c.post("/v1/embeddings", json={"model": "clip", "input": "x"}), 401, None, "invalid_api_key")
        assert err["type"] == "authentication_error"
        assert c.post("/v1/embeddings", json={"model": "clip", "input": "x"}, headers=bearer(KEY_A)).status_code == 200
        assert_error(c.post("/embed_text", json={"texts": ["x"]}), 401)  # the other routes keep DirectAI's envelope
    engine.close()


def test_an_unavailable_encoder_is_openais_503(
    served: tuple[TestClient, FakeClip], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, clip = served

    def down(prompts: list[str]) -> list[int]:
        raise Unavailable("The encoder could not be reached; retry later.")

    monkeypatch.setattr(clip, "count_tokens", down)
    err = openai_error(client.post("/v1/embeddings", json={"model": "clip", "input": "x"}), 503, "input")
    assert err["type"] == "server_error" and "retry later" in str(err["message"])
