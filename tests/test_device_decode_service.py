"""ZSS_DEVICE_DECODE through a real `bentoml serve`: the image encoder decodes eligible JPEGs itself (torchvision on its
device, here the CPU) and answers with the CPU path's vectors; everything else (a PNG, a rotated or broken JPEG)
takes the CPU path and answers exactly as without the setting."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from imaging.decode import decode_image
from runners.clip import ClipEncoder, load_clip_encoder
from settings import Settings
from testing.client import CLASSES, deploy, files
from testing.clip_images import encode_images
from testing.images import photo_jpeg as photo
from testing.images import png_bytes
from testing.models import ClipFiles, clip_env
from testing.server import running_server


def cpu_path(enc: ClipEncoder, data: bytes) -> np.ndarray:
    img = decode_image(data, max_pixels=10**8, draft_size=enc.preprocess.draft_size)
    return encode_images(enc, [img])


def test_served_device_decode_gives_the_cpu_paths_vectors_and_answers(tiny_clip: ClipFiles, tmp_path: Path) -> None:
    enc = load_clip_encoder(
        Settings(
            clip_model=str(tiny_clip.config),
            clip_pretrained=str(tiny_clip.checkpoint),
            data_dir=tmp_path / "ref",
            device="cpu",
            backend="torch",
        )
    )
    jpegs = [photo(640, 480, 0), photo(300, 500, 1)]
    rotated = photo(320, 200, 2, exif_orientation=6)
    broken = jpegs[0][:300]  # a header the API accepts, data the device decoder refuses
    env = {**clip_env(tiny_clip, tmp_path / "data"), "ZSS_DEVICE": "cpu", "ZSS_DEVICE_DECODE": "true"}
    with running_server(env, tmp_path / "serve.log") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/embed_image", files=[("data", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(jpegs)])
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["embeddings"], dtype=np.float32)
        for i, data in enumerate(jpegs):
            # The device path decodes at full size where the CPU path draft-decodes: close, not equal (equal would
            # mean the API decoded it after all).
            want = cpu_path(enc, data)[0]
            assert float(got[i] @ want) >= 0.999 and not np.allclose(got[i], want, atol=1e-6)
        for data in (png_bytes(5, (120, 90)), rotated):  # the CPU path, so the CPU path's vectors
            r = c.post("/embed_image", files=files(data))
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["embeddings"][0], cpu_path(enc, data)[0], atol=1e-5)
        r = c.post("/embed_image", files=files(broken))
        assert r.status_code == 422, r.text  # refused by the device, then by the CPU path: a 422, not a 500
        deployed = deploy(c, CLASSES)["deployed_id"]
        r = c.post("/classify", params={"deployed_id": deployed}, files=files(jpegs[0]))
        assert r.status_code == 200 and r.json()["pred"] in {cls["name"] for cls in CLASSES}, r.text
        assert c.post("/classify", params={"deployed_id": "nope"}, files=files(jpegs[0])).status_code == 400
        assert c.get("/readyz").status_code == 200
        log = srv.log()
    assert "Traceback" not in log
