"""Load test for ZeroShot Server (Locust).

Headless, against a local server:

    locust -f locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:3000

Options (after the usual Locust ones): ``--image PATH`` (default: a generated 640x480 JPEG),
``--class-sizes 10,100,1000`` (classifiers deployed per /classify user, augment_examples off so deploys stay cheap),
``--examples-per-class 3``, and per-route weights ``--w-embed-image``, ``--w-classify``, ``--w-embed-text``,
``--w-deploy``, ``--w-detect``.
Payloads are built once per process. Any non-2xx answer is a failure; /detect users stop quietly when the server
runs without a detector (503).
"""

from __future__ import annotations

import io
import random
from functools import cache
from typing import Any

from locust import HttpUser, between, events, task
from locust.exception import StopUser


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--image", type=str, default="", help="image file to send (default: generated 640x480 JPEG)")
    parser.add_argument("--class-sizes", type=str, default="10,100,1000", help="classifier sizes for /classify")
    parser.add_argument("--examples-per-class", type=int, default=3)
    for name, default in (("embed-image", 4), ("classify", 4), ("embed-text", 2), ("deploy", 1), ("detect", 1)):
        parser.add_argument(f"--w-{name}", type=int, default=default, help=f"weight of the {name} user")


@cache
def image_bytes(path: str) -> bytes:
    if path:
        with open(path, "rb") as fh:
            return fh.read()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def classes(n: int, per_class: int, tag: str = "") -> list[dict[str, Any]]:
    return [
        {"name": f"{tag}class {i}", "examples_to_include": [f"{tag}thing {i} view {k}" for k in range(per_class)]}
        for i in range(n)
    ]


def _check(resp: Any) -> None:
    if not 200 <= resp.status_code < 300:
        resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")


class _Base(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)

    def image_files(self) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("data", ("image.jpg", image_bytes(self.environment.parsed_options.image), "image/jpeg"))]


class EmbedImageUser(_Base):
    @task
    def embed_image(self) -> None:
        with self.client.post("/embed_image", files=self.image_files(), catch_response=True) as r:
            _check(r)


class ClassifyUser(_Base):
    def on_start(self) -> None:
        opts = self.environment.parsed_options
        sizes = [int(s) for s in str(opts.class_sizes).split(",") if s.strip()]
        self.ids: list[tuple[int, str]] = []
        for n in sizes:
            body = {"classifier_configs": classes(n, opts.examples_per_class), "augment_examples": False}
            with self.client.post(
                "/deploy_classifier", json=body, name="/deploy_classifier [setup]", catch_response=True
            ) as r:
                _check(r)
                if r.status_code == 200:
                    self.ids.append((n, r.json()["deployed_id"]))

    @task
    def classify(self) -> None:
        if not self.ids:
            raise StopUser()
        n, deployed_id = random.choice(self.ids)
        with self.client.post(
            f"/classify?deployed_id={deployed_id}",
            files=self.image_files(),
            name=f"/classify [{n} classes]",
            catch_response=True,
        ) as r:
            _check(r)


class EmbedTextUser(_Base):
    @task
    def embed_text(self) -> None:
        body = {"texts": [f"a photo of query {random.randint(0, 50)}"], "augment_examples": False}
        with self.client.post("/embed_text", json=body, catch_response=True) as r:
            _check(r)


class DeployUser(_Base):
    wait_time = between(0.5, 1.0)

    @task
    def deploy(self) -> None:
        # Mostly cached examples, as redeploys with feedback are: a few new texts each time.
        body = {
            "classifier_configs": classes(20, 2) + classes(1, 1, tag=f"new {random.randint(0, 10**6)} "),
            "augment_examples": False,
        }
        with self.client.post("/deploy_classifier", json=body, catch_response=True) as r:
            _check(r)


class DetectUser(_Base):
    def on_start(self) -> None:
        body = {"detector_configs": [{"name": "thing", "examples_to_include": ["thing"]}]}
        with self.client.post("/deploy_detector", json=body, name="/deploy_detector [setup]", catch_response=True) as r:
            if r.status_code == 503:  # no detector on this server: not a failure of the server
                r.success()
                self.deployed_id = None
                return
            _check(r)
            self.deployed_id = r.json()["deployed_id"] if r.status_code == 200 else None

    @task
    def detect(self) -> None:
        if self.deployed_id is None:
            raise StopUser()
        with self.client.post(
            f"/detect?deployed_id={self.deployed_id}", files=self.image_files(), name="/detect", catch_response=True
        ) as r:
            _check(r)


@events.init.add_listener
def _weights(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    EmbedImageUser.weight = opts.w_embed_image
    ClassifyUser.weight = opts.w_classify
    EmbedTextUser.weight = opts.w_embed_text
    DeployUser.weight = opts.w_deploy
    DetectUser.weight = opts.w_detect
