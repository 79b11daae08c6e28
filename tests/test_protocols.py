"""The official clients against a real `bentoml serve` (the shared tiny-CLIP server): the ``openai`` package on
/v1/embeddings and ``tritonclient[http]`` on the KServe v2 routes, each compared with /embed_text and /embed_image,
and the protocols' own errors for bad requests (never a 5xx)."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlparse

import numpy as np
import openai
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from testing.client import files
from testing.images import jpeg_bytes, png_bytes
from testing.server import Server, serving_files
from tests import bad_inputs as bad

pytestmark = pytest.mark.server

TEXTS = ["a photo of a cat", "a red car", "tree"]
COSINE = 0.99999


def cosines(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def uri(blob: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(blob).decode()


@pytest.fixture(scope="module")
def reference(server: Server) -> dict[str, Any]:
    """The vectors of /embed_text (augment off) and /embed_image for the texts and images the clients send."""
    blobs = [jpeg_bytes(11), png_bytes(12), jpeg_bytes(13, (200, 120))]
    with server.client() as c:
        texts = c.post("/embed_text", json={"texts": TEXTS, "augment_examples": False}).json()["embeddings"]
        images = c.post("/embed_image", files=files(*blobs)).json()["embeddings"]
        model = c.get("/healthz_models").json()["image"]["model_id"]
    return {"texts": texts, "images": images, "blobs": blobs, "model": model}


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="no keys on this server", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tri(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=urlparse(server.url).netloc, network_timeout=60.0)


# -- openai ---------------------------------------------------------------------------------------------------------
def test_openai_lists_the_served_model(oai: openai.OpenAI, reference: dict[str, Any]) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == reference["model"] and "clip" in ids
    assert oai.models.retrieve("clip").id == "clip"


@pytest.mark.parametrize("encoding", [None, "float"])  # None: the client's default, base64
def test_openai_text_embeddings_equal_embed_text(
    oai: openai.OpenAI, reference: dict[str, Any], encoding: str | None
) -> None:
    extra = {"encoding_format": encoding} if encoding else {}
    out = oai.embeddings.create(model="clip", input=TEXTS, **extra)
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == "clip"
    assert cosines([d.embedding for d in out.data], reference["texts"]).min() >= COSINE
    assert out.usage.prompt_tokens == out.usage.total_tokens > 3 * 2  # the tokenizer's tokens, markers included
    one = oai.embeddings.create(model=reference["model"], input=TEXTS[0], **extra)
    assert cosines([one.data[0].embedding], reference["texts"][:1]).min() >= COSINE


@pytest.mark.parametrize("encoding", [None, "float"])
def test_openai_image_embeddings_equal_embed_image(
    oai: openai.OpenAI, reference: dict[str, Any], encoding: str | None
) -> None:
    blobs = reference["blobs"]
    extra = {"encoding_format": encoding} if encoding else {}
    with serving_files({"/c.jpg": (blobs[2], "image/jpeg")}) as port:
        # a data URI, plain base64 and a URL (fetched through the guarded fetcher; 127.0.0.1 is allowed here)
        inputs = [uri(blobs[0]), base64.b64encode(blobs[1]).decode(), f"http://127.0.0.1:{port}/c.jpg"]
        out = oai.embeddings.create(model="clip", input=inputs, extra_body={"modality": "image"}, **extra)
    assert cosines([d.embedding for d in out.data], reference["images"]).min() >= COSINE
    assert out.usage.prompt_tokens == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, openai.NotFoundError, "model"),
        ({"model": "clip", "input": []}, openai.UnprocessableEntityError, "input"),
        ({"model": "clip", "input": [1, 2, 3]}, openai.UnprocessableEntityError, "input"),
        ({"model": "clip", "input": "x", "dimensions": 8}, openai.UnprocessableEntityError, "dimensions"),
        (
            {"model": "clip", "input": [uri(b"\xff\xd8\xff\xe0corrupt")], "extra_body": {"modality": "image"}},
            openai.UnprocessableEntityError,
            "input",
        ),
        (
            {"model": "clip", "input": [uri(png_bytes(1, (8, 8)))] * 257, "extra_body": {"modality": "image"}},
            openai.APIStatusError,
            "input",
        ),
    ],
)
def test_openai_errors(oai: openai.OpenAI, kwargs: dict[str, Any], error: type[Exception], param: str) -> None:
    with pytest.raises(error) as caught:
        oai.embeddings.create(**kwargs)
    exc = caught.value
    assert isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500, exc
    assert exc.param == param and exc.type and exc.message, exc.body  # OpenAI's error object, parsed by the client
    if error is openai.APIStatusError:
        assert exc.status_code == 413


# -- tritonclient ---------------------------------------------------------------------------------------------------
def bytes_input(name: str, values: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def test_triton_health_and_metadata(tri: triton.InferenceServerClient, reference: dict[str, Any]) -> None:
    assert tri.is_server_live() and tri.is_server_ready()
    assert tri.is_model_ready("clip_image") and tri.is_model_ready("clip_text", "1")
    assert not tri.is_model_ready("resnet50")
    assert "binary_tensor_data" in tri.get_server_metadata()["extensions"]
    meta = tri.get_model_metadata("clip_image")
    dim = len(reference["images"][0])
    assert meta["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}
    assert meta["outputs"][0] == {"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, dim]}


@pytest.mark.parametrize("binary_output", [None, True, False])  # None: no outputs named (binary, the default)
def test_triton_image_infer_equals_embed_image(
    tri: triton.InferenceServerClient, reference: dict[str, Any], binary_output: bool | None
) -> None:
    outputs = None if binary_output is None else [triton.InferRequestedOutput("EMBEDDING", binary_data=binary_output)]
    result = tri.infer("clip_image", [bytes_input("IMAGE", reference["blobs"])], outputs=outputs)
    got = result.as_numpy("EMBEDDING")
    assert got.dtype == np.float32 and got.shape == (3, len(reference["images"][0]))
    assert cosines(got, reference["images"]).min() >= COSINE


@pytest.mark.parametrize("binary", [True, False])
def test_triton_text_infer_equals_embed_text(
    tri: triton.InferenceServerClient, reference: dict[str, Any], binary: bool
) -> None:
    tensor = bytes_input("TEXT", [t.encode() for t in TEXTS], binary=binary)
    got = tri.infer("clip_text", [tensor], model_version="1").as_numpy("EMBEDDING")
    assert cosines(got, reference["texts"]).min() >= COSINE


def _wrong_datatype() -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, np.float32))
    return tensor


def _wrong_shape() -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [1, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[jpeg_bytes(1), jpeg_bytes(2)]], dtype=np.object_))
    return tensor


@pytest.mark.parametrize(
    ("model", "inputs", "status"),
    [
        ("resnet50", lambda: [bytes_input("IMAGE", [jpeg_bytes(1)])], "404"),
        ("clip_image", lambda: [_wrong_datatype()], "400"),
        ("clip_image", lambda: [_wrong_shape()], "400"),
        ("clip_image", lambda: [bytes_input("IMAGE", [jpeg_bytes(1)]), bytes_input("TEXT", [b"x"])], "400"),
        ("clip_image", lambda: [bytes_input("INPUT__0", [jpeg_bytes(1)])], "400"),
        ("clip_image", lambda: [bytes_input("IMAGE", [b"\xff\xd8\xff\xe0corrupt"])], "422"),
        ("clip_image", lambda: [bytes_input("IMAGE", [png_bytes(1, (8, 8))] * 257)], "413"),
        ("clip_text", lambda: [bytes_input("TEXT", [b" "])], "422"),
    ],
)
def test_triton_errors(tri: triton.InferenceServerClient, model: str, inputs: Any, status: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        tri.infer(model, inputs())
    assert caught.value.status() == status, caught.value
    assert caught.value.message() and "decoding the response" not in caught.value.message()  # {"error": str}


# -- the bad-input corpus, through both protocols -------------------------------------------------------------------
@pytest.mark.parametrize("name", [*sorted(bad.invalid_inputs()), "huge_header_png"])
def test_the_bad_input_corpus_gets_the_protocols_4xx(
    oai: openai.OpenAI, tri: triton.InferenceServerClient, reference: dict[str, Any], name: str
) -> None:
    blob = bad.huge_header_png(50_000, 50_000) if name == "huge_header_png" else bad.invalid_inputs()[name]
    status = 413 if name == "huge_header_png" else 422  # as on /classify (tests/test_inputs.py)
    with pytest.raises(openai.APIStatusError) as caught:
        oai.embeddings.create(model="clip", input=[uri(blob)], extra_body={"modality": "image"})
    assert caught.value.status_code == status and caught.value.param == "input", caught.value.body
    with pytest.raises(InferenceServerException) as raised:
        tri.infer("clip_image", [bytes_input("IMAGE", [blob])])
    assert raised.value.status() == str(status), raised.value
    good = tri.infer("clip_image", [bytes_input("IMAGE", reference["blobs"][:1])]).as_numpy("EMBEDDING")
    assert cosines(good, reference["images"][:1]).min() >= COSINE  # and the server goes on
