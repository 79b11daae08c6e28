"""api.kserve in-process (fake encoders, real engine): the KServe v2 protocol in JSON and with Triton's binary-data
extension (bodies built and read by tritonclient's own functions), and its error shape. tests/test_protocols.py runs
tritonclient's HTTP client against a real server."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from api.inputs import MAX_IMAGES_PER_REQUEST
from service import build_app
from testing.client import assert_error, files
from testing.fakes import fake_engine
from testing.images import jpeg_bytes, png_bytes

HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine, _ = fake_engine(tmp_path / "data")
    with TestClient(build_app(engine)) as c:
        yield c
    engine.close()


def binary_request(name: str, values: list[bytes], datatype: str = "BYTES", **output: Any) -> tuple[bytes, dict]:
    """A request body as tritonclient builds it (binary data by default)."""
    tensor = triton.InferInput(name, [len(values)], datatype)
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
    outputs = [triton.InferRequestedOutput("EMBEDDING", **output)] if output else None
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, ({HEADER: str(json_size)} if json_size is not None else {})


def read_binary(r: Any) -> np.ndarray:
    assert r.status_code == 200, r.text
    result = triton.InferenceServerClient.parse_response_body(r.content, header_length=int(r.headers[HEADER]))
    return result.as_numpy("EMBEDDING")


def test_server_and_model_metadata(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/clip_image").json()
    dim = len(client.post("/embed_text", json={"texts": ["x"]}).json()["embeddings"][0])
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, dim]}]
    assert client.get("/v2/models/clip_text/versions/1").json()["inputs"][0]["name"] == "TEXT"
    assert client.get("/v2/models/clip_text/ready").json() == {"name": "clip_text", "ready": True}
    assert_error(client.get("/v2/models/resnet"), 404, "unknown model")
    assert_error(client.get("/v2/models/clip_text/versions/2/ready"), 404, "version 2")


def test_binary_image_infer_equals_embed_image(client: TestClient) -> None:
    blobs = [jpeg_bytes(3), png_bytes(4)]
    ref = np.array(client.post("/embed_image", files=files(*blobs)).json()["embeddings"], np.float32)
    body, headers = binary_request("IMAGE", blobs)
    got = read_binary(client.post("/v2/models/clip_image/infer", content=body, headers=headers))
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    # The same with binary input and JSON output, on the versioned path.
    body, headers = binary_request("IMAGE", blobs, binary_data=False)
    r = client.post("/v2/models/clip_image/versions/1/infer", content=body, headers=headers)
    out = r.json()["outputs"][0]
    assert r.json()["model_name"] == "clip_image" and out["shape"] == list(ref.shape) and out["datatype"] == "FP32"
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(ref.shape), ref)


def test_json_text_and_image_infer(client: TestClient) -> None:
    texts = ["a cat", "a dog"]
    ref = np.array(client.post("/embed_text", json={"texts": texts}).json()["embeddings"], np.float32)
    req = {
        "id": "r1",
        "inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": [["a cat"], ["a dog"]]}],
    }
    r = client.post("/v2/models/clip_text/infer", json=req)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "r1"
    np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, -1), ref)
    body, headers = binary_request("TEXT", [t.encode() for t in texts])
    np.testing.assert_array_equal(
        read_binary(client.post("/v2/models/clip_text/infer", content=body, headers=headers)), ref
    )
    blob = jpeg_bytes(5)
    img_ref = np.array(client.post("/embed_image", files=files(blob)).json()["embeddings"], np.float32)
    b64 = base64.b64encode(blob).decode()
    req = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    got = client.post("/v2/models/clip_image/infer", json=req).json()["outputs"][0]["data"]
    np.testing.assert_array_equal(np.array(got, np.float32).reshape(1, -1), img_ref)


def _json_req(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["x"], **tensor}]}


@pytest.mark.parametrize(
    ("model", "req", "status", "message"),
    [
        ("clip_text", _json_req(datatype="FP32", data=[1.0]), 400, "datatype BYTES"),
        ("clip_text", _json_req(shape=[2]), 400, "holds 1 elements"),
        ("clip_text", _json_req(shape=[1, 2]), 400, "shape [n] or [n, 1]"),
        ("clip_text", _json_req(shape=[-1]), 400, "shape"),
        ("clip_text", _json_req(name="INPUT__0"), 400, "Unexpected input"),
        ("clip_text", _json_req(data=[3]), 400, "strings"),
        ("clip_text", _json_req(data=None), 400, "no data"),
        ("clip_text", _json_req(shape=[0], data=[]), 422, "no element"),
        ("clip_text", _json_req(data=[" "]), 422, "empty"),
        ("clip_text", {"inputs": [_json_req()["inputs"][0]] * 2}, 400, "exactly one input"),
        ("clip_text", {"inputs": "x"}, 400, "inputs"),
        ("clip_text", {**_json_req(), "outputs": [{"name": "LOGITS"}]}, 400, "Unknown output"),
        (
            "clip_image",
            {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]},
            422,
            "",
        ),
        ("resnet50", _json_req(), 404, "unknown model"),
    ],
)
def test_bad_json_requests(client: TestClient, model: str, req: dict[str, Any], status: int, message: str) -> None:
    assert_error(client.post(f"/v2/models/{model}/infer", json=req), status, message)


def test_bad_binary_requests(client: TestClient) -> None:
    url = "/v2/models/clip_image/infer"
    body, headers = binary_request("IMAGE", [b"\xff\xd8\xff\xe0 a corrupt jpeg"])
    assert_error(client.post(url, content=body, headers=headers), 422)
    assert_error(client.post(url, content=body[:-3], headers=headers), 400, "binary_data_size")  # cut short
    assert_error(client.post(url, content=body + b"xx", headers=headers), 400, "after input")
    assert_error(client.post(url, content=body, headers={HEADER: "99999"}), 400, HEADER)
    assert_error(client.post(url, content=body, headers={HEADER: "-1"}), 400, HEADER)
    assert_error(client.post(url, content=body), 400, "not valid JSON")  # binary part without the header
    head = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}
    )
    framed = head.encode() + struct.pack("<I", 100) + b"ab"  # an element longer than the data
    assert_error(client.post(url, content=framed, headers={HEADER: str(len(head))}), 400, "ends inside")
    many = [png_bytes(0, (8, 8))] * (MAX_IMAGES_PER_REQUEST + 1)
    body, headers = binary_request("IMAGE", many)
    assert_error(client.post(url, content=body, headers=headers), 413, "Too many")
    body, headers = binary_request("TEXT", [b"\xff\xfe"])
    assert_error(client.post("/v2/models/clip_text/infer", content=body, headers=headers), 400, "UTF-8")
    assert_error(client.get("/v2/nothing"), 404)
