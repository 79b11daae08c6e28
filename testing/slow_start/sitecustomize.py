"""Fault injection for start-up tests: a BentoML service worker that starts late, as one writing big random weights
or loading a model from a slow disk does.

A test puts this folder on the server's PYTHONPATH and sets ``TESTING_SLOW_START=NAME:SECONDS``; the worker process
of the service NAME (``--service-name NAME`` in its command line) then sleeps SECONDS before it imports anything,
while BentoML's arbiter already holds its socket (callers connect and wait, as they do in a real slow start).
Every other process, and any process without the variable, is untouched.

``TESTING_SLOW_ENCODE=NAME:SECONDS`` slows the CLIP image tower of the service NAME instead: each
``ClipEncoder.encode_pixels`` call sleeps SECONDS per image first, so the encoder's rate is set by the test, not by the
machine (tests/test_latency_bound.py).
"""

import importlib.abc
import importlib.util
import os
import sys
import time


def _mine(variable: str) -> float | None:
    """SECONDS of ``variable`` (NAME:SECONDS) when this process is the worker of service NAME, else None."""
    name, _, seconds = os.environ.get(variable, "").partition(":")
    argv = sys.argv
    if name and "--service-name" in argv and argv[argv.index("--service-name") + 1 :][:1] == [name]:
        return float(seconds)
    return None


class _SlowEncodeFinder(importlib.abc.MetaPathFinder):
    """Patches runners.clip.ClipEncoder.encode_pixels once runners.clip has been executed."""

    def __init__(self, per_image_s: float) -> None:
        self.per_image_s = per_image_s

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name != "runners.clip":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader, per_image_s = spec.loader, self.per_image_s
        run = loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run(module)
            original = module.ClipEncoder.encode_pixels

            def encode_pixels(self, pixels):  # noqa: ANN001, ANN202
                time.sleep(per_image_s * len(pixels))
                return original(self, pixels)

            module.ClipEncoder.encode_pixels = encode_pixels

        loader.exec_module = exec_module
        return spec


_start = _mine("TESTING_SLOW_START")
if _start is not None:
    time.sleep(_start)
_encode = _mine("TESTING_SLOW_ENCODE")
if _encode is not None:
    sys.meta_path.insert(0, _SlowEncodeFinder(_encode))
