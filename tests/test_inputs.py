"""Inputs users actually send, through a real `bentoml serve`: image forms, photofield routes, a bad-input corpus."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api.photofield import decode_embedding
from testing.client import assert_error, deploy, files
from testing.images import jpeg_bytes
from testing.server import Server, serving_files
from tests import bad_inputs as bad

pytestmark = pytest.mark.server

CLASSES = [
    {"name": "red", "examples_to_include": ["red shape"], "examples_to_exclude": ["red square"]},
    {"name": "other", "examples_to_include": ["blue shape", "green shape"]},
]


@pytest.fixture(scope="module")
def deployed(server: Server) -> str:
    with server.client() as c:
        return str(deploy(c, CLASSES, augment_examples=False)["deployed_id"])


def embed(server: Server, blob: bytes, name: str = "x.bin") -> np.ndarray:
    with server.client() as c:
        r = c.post("/embed_image", files=[("data", (name, blob, "application/octet-stream"))])
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["embeddings"][0])


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def still_serving(server: Server, deployed_id: str) -> None:
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed_id}, files=files(jpeg_bytes(5)))
        assert r.status_code == 200, r.text


# -- the forms of an image ---------------------------------------------------------------------------------------
def test_base64_json_and_data_uri_equal_multipart(server: Server, deployed: str) -> None:
    blob = jpeg_bytes(11)
    b64 = base64.b64encode(blob).decode()
    with server.client() as c:
        multipart = c.post("/classify", params={"deployed_id": deployed}, files=files(blob)).json()
        as_json = c.post("/classify", params={"deployed_id": deployed}, json={"data": b64}).json()
        data_uri = c.post("/classify", params={"deployed_id": deployed}, json={"data": f"data:image/jpeg;base64,{b64}"})
        many = c.post("/classify", params={"deployed_id": deployed}, json={"data": [b64, b64]}).json()
        form_b64 = c.post("/embed_image", data={"data": b64}, files={"unused": b"x"}).json()
    assert as_json["raw_scores"] == pytest.approx(multipart["raw_scores"], abs=1e-6)
    assert data_uri.json()["raw_scores"] == pytest.approx(multipart["raw_scores"], abs=1e-6)
    assert len(many) == 2
    np.testing.assert_allclose(form_b64["embeddings"][0], embed(server, blob), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"data": "!!!not base64!!!"}, 422, "base64"),
        ({"data": base64.b64encode(b"hello").decode()}, 422, "Invalid image received, unable to open."),
        ({"data": 5}, 422, "'data'"),
        ({"images": ["x"]}, 422, "JSON body must be an object"),
        ({}, 422, "No image"),
        ({"url": "http://localhost/cat.jpg"}, 400, "URL refused"),  # not on the allow-list (127.0.0.1 is)
        ({"url": "file:///etc/passwd"}, 400, "URL refused"),
    ],
)
def test_json_image_errors(server: Server, deployed: str, body: dict[str, Any], status: int, message: str) -> None:
    with server.client() as c:
        assert_error(c.post("/classify", params={"deployed_id": deployed}, json=body), status, message)
    still_serving(server, deployed)


def test_classify_by_url_from_an_allowed_test_host(server: Server, deployed: str) -> None:
    """URL fetching turned on, through the service: a test host the allow-list permits serves the image."""
    blob = jpeg_bytes(5)

    with serving_files({"/cat.jpg": (blob, "image/jpeg")}) as port, server.client() as c:
        url = f"http://127.0.0.1:{port}/cat.jpg"
        by_upload = c.post("/classify", params={"deployed_id": deployed}, files=files(blob)).json()
        by_json = c.post("/classify", params={"deployed_id": deployed}, json={"url": url}).json()
        by_form = c.post("/classify", params={"deployed_id": deployed}, data={"data": url}, files={"x": b""}).json()
        missing = c.post("/classify", params={"deployed_id": deployed}, json={"url": url.replace("cat", "dog")})
    assert by_json["raw_scores"] == pytest.approx(by_upload["raw_scores"], abs=1e-6)
    assert by_form["raw_scores"] == pytest.approx(by_upload["raw_scores"], abs=1e-6)
    assert_error(missing, 400, "404")


# -- photofield ---------------------------------------------------------------------------------------------------
def test_photofield_routes_match_embedding_routes(server: Server) -> None:
    texts = ["a red circle", "猫 🐱"]
    with server.client() as c:
        pf = c.post("/text-embeddings", json={"texts": texts}).json()["texts"]
        ours = np.asarray(c.post("/embed_text", json={"texts": texts}).json()["embeddings"])
        blobs = [jpeg_bytes(1), bad.png()]
        upload = [("photo", ("a.jpg", blobs[0], "image/jpeg")), ("other", ("b.png", blobs[1], "image/png"))]
        pfi = c.post("/image-embeddings", files=upload).json()["images"]
        img = np.asarray(c.post("/embed_image", files=files(*blobs)).json()["embeddings"])
    assert [t["text"] for t in pf] == texts
    for entry, ref in zip(pf, ours):
        vec, inv_norm = decode_embedding(entry)
        np.testing.assert_allclose(vec, ref, atol=2e-3)  # float16 on the wire
        assert inv_norm == pytest.approx(1.0, abs=2e-3)  # the service's vectors are unit length
    assert [(e["field"], e["filename"]) for e in pfi] == [("photo", "a.jpg"), ("other", "b.png")]
    for entry, ref in zip(pfi, img):
        vec, _ = decode_embedding(entry)
        np.testing.assert_allclose(vec, ref, atol=2e-3)


# -- the bad-input corpus -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(bad.invalid_inputs()))
def test_unopenable_inputs_get_422(server: Server, deployed: str, name: str) -> None:
    blob = bad.invalid_inputs()[name]
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed}, files=[("data", (f"{name}.jpg", blob, "image/jpeg"))])
    assert_error(r, 422, "Invalid image received, unable to open.")
    still_serving(server, deployed)


def test_decompression_bomb_header_is_refused_before_decoding(server: Server, deployed: str) -> None:
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed}, files=files(bad.huge_header_png(50_000, 50_000)))
    assert_error(r, 413, "too large")
    still_serving(server, deployed)


@pytest.mark.parametrize(
    "make",
    [
        bad.one_by_one_png,
        lambda: bad.cmyk_jpeg()[0],
        lambda: bad.png_16bit_grey()[0],
        lambda: bad.png_16bit_rgb()[0],
        lambda: bad.palette_png_transparent()[0],
        lambda: bad.rgba_png()[0],
        lambda: bad.animated_gif()[0],
        lambda: bad.animated_webp()[0],
        lambda: bad.webp()[0],
        bad.grey_jpeg,
    ],
    ids=["1x1", "cmyk", "png16-grey", "png16-rgb", "palette-alpha", "rgba", "gif", "anim-webp", "webp", "grey"],
)
def test_images_from_phones_and_the_web_classify(server: Server, deployed: str, make: Any) -> None:
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed}, files=files(make()))
    assert r.status_code == 200, r.text
    assert set(r.json()["scores"]) == {"red", "other"}


def test_animated_gif_uses_first_frame(server: Server) -> None:
    blob, first_colour = bad.animated_gif()
    first = Image.new("RGB", Image.open(io.BytesIO(blob)).size, first_colour)
    np.testing.assert_allclose(embed(server, blob), embed(server, png_of(first)), atol=1e-5)


def test_exif_rotation_is_honoured(server: Server) -> None:
    blob, upright = bad.exif_rotated(6, "PNG", 64, 48)
    np.testing.assert_allclose(embed(server, blob), embed(server, png_of(upright)), atol=1e-5)
    jpeg_blob, jpeg_upright = bad.exif_rotated_jpeg(6)
    rotated = embed(server, jpeg_blob)
    assert float(rotated @ embed(server, png_of(jpeg_upright))) > 0.99
    # Without honouring the tag the stored (sideways) pixels would be encoded: farther from upright.
    sideways = Image.open(io.BytesIO(jpeg_blob))
    sideways_emb = embed(server, png_of(sideways.convert("RGB")))
    assert float(rotated @ embed(server, png_of(jpeg_upright))) > float(sideways_emb @ rotated)


def test_20mb_upload_is_classified(server: Server, deployed: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (2600, 2600, 3), dtype=np.uint8)
    blob = png_of(Image.fromarray(arr))
    assert len(blob) > 19_000_000
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed}, files=files(blob))
    assert r.status_code == 200, r.text


def test_body_over_the_cap_gets_413(server: Server, deployed: str) -> None:
    with server.client() as c:
        r = c.post("/classify", params={"deployed_id": deployed}, files=files(b"\xff" * (33 * 1024 * 1024)))
    assert_error(r, 413, "Request body over")
    still_serving(server, deployed)


def test_json_where_multipart_expected_and_unknown_id(server: Server, deployed: str) -> None:
    with server.client() as c:
        headers = {"content-type": "text/plain"}
        r = c.post("/classify", params={"deployed_id": deployed}, content=b"[1, 2]", headers=headers)
        assert_error(r, 422, "multipart/form-data")
        assert_error(c.post("/classify", params={"deployed_id": "missing"}, files=files(jpeg_bytes())), 400)


def test_two_thousand_classes(server: Server) -> None:
    classes = [{"name": f"class {i}", "examples_to_include": [f"thing number {i}"]} for i in range(2000)]
    with server.client(timeout=300) as c:
        dep = deploy(c, classes, augment_examples=False)
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes()))
    assert r.status_code == 200 and len(r.json()["scores"]) == 2000


def test_long_unicode_and_emoji_examples(server: Server) -> None:
    classes = [
        # 950 characters: past the model's context (the tokenizer cuts it), under ZSS_DEPLOY_MAX_EXAMPLE_CHARS (1000)
        {"name": "chat 🐱", "examples_to_include": ["un chat très mignon 🐱", "word " * 190]},
        {"name": "犬", "examples_to_include": ["犬の写真"], "examples_to_exclude": ["🐕‍🦺 service dog"]},
    ]
    with server.client() as c:
        dep = deploy(c, classes, augment_examples=True)
        r = c.post("/classify", params={"deployed_id": dep["deployed_id"]}, files=files(jpeg_bytes()))
        cfg = c.get("/model_config", params={"deployed_id": dep["deployed_id"]}).json()
    assert r.status_code == 200 and set(r.json()["scores"]) == {"chat 🐱", "犬"}
    assert cfg["classifier_configs"][0]["name"] == "chat 🐱"


def test_image_examples_by_url_and_base64_through_the_service(server: Server) -> None:
    """An image example is the server's own image embedding of those bytes (by URL or inline alike), returned by
    /model_config as given; an unreachable one is a 4xx naming its class and entry."""
    example, probe = jpeg_bytes(21), jpeg_bytes(22)

    inline = {"image": base64.b64encode(example).decode()}
    with serving_files({"/ex.jpg": (example, "image/jpeg")}) as port, server.client() as c:
        url = {"url": f"http://127.0.0.1:{port}/ex.jpg"}
        results = []
        for entry in (url, inline):
            classes = [
                {"name": "ex", "examples_to_include": [entry]},
                {"name": "other", "examples_to_include": [{"image": base64.b64encode(jpeg_bytes(23)).decode()}]},
            ]
            dep = c.post("/deploy_classifier", json={"classifier_configs": classes}).json()["deployed_id"]
            config = c.get("/model_config", params={"deployed_id": dep}).json()
            assert config["classifier_configs"][0]["examples_to_include"] == [entry]
            results.append(c.post("/classify", params={"deployed_id": dep}, files=files(probe)).json())
        emb = np.asarray(c.post("/embed_image", files=files(example, probe)).json()["embeddings"])
        broken = [
            {"name": "a", "examples_to_include": ["a"]},
            {"name": "b", "examples_to_include": ["b", {"url": url["url"].replace("ex", "no")}]},
        ]
        r = c.post("/deploy_classifier", json={"classifier_configs": broken})
    with server.client() as c:  # the host is gone: the URL's vector was kept, a new deploy of it needs no fetch
        classes = [{"name": "ex", "examples_to_include": [url]}, {"name": "b", "examples_to_include": ["b"]}]
        again = c.post("/deploy_classifier", json={"classifier_configs": classes})
    assert again.status_code == 200, again.text
    assert results[0]["raw_scores"] == pytest.approx(results[1]["raw_scores"], abs=1e-6)
    # Image examples only: the plain rule on image cosines, d = (1 + cos) / 2.
    assert results[0]["raw_scores"]["ex"] == pytest.approx((1 + float(emb[0] @ emb[1])) / 2, abs=1e-4)
    assert_error(r, 400)
    assert r.json()["message"].startswith("Class 'b', examples_to_include[1]: "), r.json()
