"""Prompt templates for detector examples (pure data), used with ``semantic.templates.expand`` / ``ensemble``.

Detection uses a short ensemble instead of CLIP's 80 ImageNet templates: the OWL text tower reads at most 16 tokens,
so long templates would truncate longer example texts, and the text side of a detector is encoded once per example.
The set below is this project's choice: plain "photo of" phrasings plus the size variants of CLIP's published 7-best
ImageNet ensemble ("a photo of the small/large {}."). The rendering-style entries of that ensemble ("a origami {}.",
"a {} in a video game.", "art of the {}.") are left out because detection queries target objects in photos.
Change DETECTION_TEMPLATE_VERSION whenever this list changes: it belongs in every detector embedding-cache key.
"""

from __future__ import annotations

DETECTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
)

DETECTION_TEMPLATE_VERSION = "zss-detect-7.v1"
