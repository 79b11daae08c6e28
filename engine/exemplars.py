"""Image examples (few-shot exemplars) -> vectors through the embedding cache.

A classifier's image examples are encoded by CLIP's image tower, each with its left-right mirror (one cached row: the
two vectors side by side); cache namespace: the image model's id + ``image-`` + a hash of its preprocessing
(``Preprocess.as_dict``) + ``-mirror``, so the same bytes give another vector under another model or another resize.
A detector's become OWL query embeddings (OWLv2's image-guided detection: the class embedding of the example image's
own box chosen by ``semantic.detect.image_query_index``); namespace: the detector's id +
``image-query-<rule version>-<input size>``. Cache key (both): the sha256 (hex) of the image's encoded
bytes as the client gave them (base64 decoded; a URL's fetched body), so one picture sent inline or by URL shares one
vector, and a cache hit needs no decoding. A URL example is fetched once: its vector is also kept under the URL
itself (namespace + ``|url``), so later deploys and recompiles (another worker, an eviction from the compiled cache)
never fetch again; to change the picture, send it inline or under a new URL. A deployment's URL examples are fetched
up to URL_FETCHES at once. The store is any
:class:`cache.interfaces.VectorStore` (namespace + string key), the one the texts use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cache.embeddings import namespace
from cache.interfaces import VectorStore
from engine.configs import ClassifierConfig, ImageData, ImageUrl
from engine.embedder import EmbedStats
from errors import ZssError
from imaging.decode import decode_image
from imaging.preprocess import Preprocess
from imaging.sources import ImageLimits, ImageSource, source_bytes

PixelsFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> L2-normalised float32 [N, D]
IMAGE_BATCH = 64  # images per encoder call
URL_FETCHES = 8  # URL examples fetched at once at deploy time


def preprocess_version(pre: Preprocess) -> str:
    return hashlib.sha256(json.dumps(pre.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def image_key(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def example_source(example: ImageData | ImageUrl) -> ImageSource:
    if isinstance(example, ImageData):
        return ImageSource("base64", example.image)
    return ImageSource("url", example.url.strip(), "url")


@dataclass
class ImageExamples:
    """Per class, the (positive, negative) image examples' vectors [k, views * D] (the embedder's ``views``), plus
    this lookup's cache stats."""

    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    stats: EmbedStats


ImagesFn = Callable[[list[Image.Image]], np.ndarray]  # decoded RGB images -> one L2-normalised vector each


@dataclass
class ImageEmbedder:
    """Image examples -> vectors through the cache; misses are decoded and encoded once."""

    cache: VectorStore
    namespace: str
    encode_images: ImagesFn
    limits: ImageLimits
    draft_size: int = 0  # JPEG draft decoding down to this edge (what the encoder's input needs)
    on_lookup: Callable[[EmbedStats], None] | None = None
    # Vectors per image, side by side in one cached row [views * D]: CLIP's are the image's and its left-right
    # mirror's (a positive example's mirror is one more positive example, engine/kinds.py).
    views: int = 1

    @classmethod
    def for_clip(
        cls,
        cache: VectorStore,
        model_id: str,
        preprocess: Preprocess,
        encode_pixels: PixelsFn,
        limits: ImageLimits,
        on_lookup: Callable[[EmbedStats], None] | None = None,
    ) -> ImageEmbedder:
        def encode(images: list[Image.Image]) -> np.ndarray:
            pixels = np.stack([preprocess.to_pixels(im) for im in images])
            both = encode_pixels(np.concatenate([pixels, pixels[:, :, ::-1]]))  # the images, then their mirrors
            return np.concatenate([both[: len(images)], both[len(images) :]], axis=1)

        ns = namespace(model_id, f"image-{preprocess_version(preprocess)}-mirror")
        return cls(cache, ns, encode, limits, preprocess.draft_size, on_lookup, views=2)

    def _decode(self, blob: bytes, where: str) -> Image.Image:
        try:
            return decode_image(blob, max_pixels=self.limits.max_pixels, draft_size=self.draft_size)
        except ZssError as exc:
            raise ZssError(f"{where}: {exc.message}", exc.status_code) from exc

    def embed(self, blobs: Sequence[bytes], where: Sequence[str]) -> tuple[np.ndarray, EmbedStats]:
        """Vectors [N, D] for encoded images; ``where`` names each one in an error ("Class 'cat',
        examples_to_include[2]")."""
        keys = [image_key(b) for b in blobs]
        by_key = {k: (b, w) for k, b, w in zip(keys, blobs, where)}

        def encode(todo: list[str]) -> np.ndarray:
            parts = []
            for i in range(0, len(todo), IMAGE_BATCH):
                images = [self._decode(*by_key[k]) for k in todo[i : i + IMAGE_BATCH]]
                parts.append(np.asarray(self.encode_images(images), dtype=np.float32))
            return np.concatenate(parts)

        vecs, lookup = self.cache.get_or_encode(self.namespace, keys, encode)
        stats = EmbedStats(lookup.hits, lookup.misses, lookup.encoded, lookup.encoded)
        if self.on_lookup is not None:
            self.on_lookup(stats)
        return vecs, stats

    def _source_bytes(self, example: ImageData | ImageUrl, where: str) -> bytes:
        try:
            return source_bytes(example_source(example), self.limits)
        except ZssError as exc:
            raise ZssError(f"{where}: {exc.message}", exc.status_code) from exc

    def _embed_urls(self, urls: list[str], where: dict[str, str]) -> np.ndarray:
        """URL examples: fetched once per URL (its first fetch's vector is kept under the URL, namespace + ``|url``),
        so recompiling a deployment on another worker, or after the compiled cache dropped it, never depends on the
        remote host again."""

        def fetch(todo: list[str]) -> np.ndarray:
            # Up to URL_FETCHES at once (each through the SSRF-safe fetcher with its limits); the first URL in order
            # that fails is the error, and the fetches not yet started are dropped.
            with ThreadPoolExecutor(max_workers=min(URL_FETCHES, len(todo)), thread_name_prefix="zss-fetch") as pool:
                futures = [pool.submit(self._source_bytes, ImageUrl(url=u), where[u]) for u in todo]
                try:
                    blobs = [f.result() for f in futures]
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
            return self.embed(blobs, [where[u] for u in todo])[0]

        return self.cache.get_or_encode(f"{self.namespace}|url", urls, fetch)[0]

    def embed_classes(self, classes: Sequence[ClassifierConfig]) -> ImageExamples:
        """Every class's image examples (inline ones in one cache lookup, URLs in another); an image that cannot be
        read or fetched is a 4xx naming its class and entry."""
        entries: list[tuple[ImageData | ImageUrl, str]] = []
        counts: list[tuple[int, int]] = []
        for c in classes:
            n = []
            for positive, field in ((True, "examples_to_include"), (False, "examples_to_exclude")):
                images = c.images(positive)
                entries += [(ex, f"Class {c.name!r}, {field}[{i}]") for i, ex in images]
                n.append(len(images))
            counts.append((n[0], n[1]))
        if not entries:
            return ImageExamples([], [], EmbedStats())
        inline = [(i, ex, w) for i, (ex, w) in enumerate(entries) if isinstance(ex, ImageData)]
        by_url = [(i, ex.url.strip(), w) for i, (ex, w) in enumerate(entries) if isinstance(ex, ImageUrl)]
        vecs: list[np.ndarray | None] = [None] * len(entries)
        stats = EmbedStats()
        if inline:
            found, stats = self.embed([self._source_bytes(ex, w) for _, ex, w in inline], [w for _, _, w in inline])
            for (i, _, _), v in zip(inline, found):
                vecs[i] = v
        if by_url:
            where: dict[str, str] = {}
            for _, u, w in by_url:
                where.setdefault(u, w)
            found = self._embed_urls([u for _, u, _ in by_url], where)
            for (i, _, _), v in zip(by_url, found):
                vecs[i] = v
        matrix = np.stack([v for v in vecs if v is not None])
        positives, negatives, at = [], [], 0
        for n_pos, n_neg in counts:
            positives.append(matrix[at : at + n_pos])
            at += n_pos
            negatives.append(matrix[at : at + n_neg])
            at += n_neg
        return ImageExamples(positives, negatives, stats)


def has_images(classes: Sequence[ClassifierConfig]) -> bool:
    return any(c.images(True) or c.images(False) for c in classes)
