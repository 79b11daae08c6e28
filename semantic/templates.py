"""Prompt templates for ensembling example texts (``augment_examples``).

Pure data plus two pure functions. ``TEMPLATE_VERSION`` is part of every embedding-cache key: change it whenever the
template list or the ensembling rule changes, so stale cached vectors are never reused.
"""

from __future__ import annotations

import torch

# The 80 prompt templates OpenAI published with CLIP for ImageNet zero-shot evaluation (also shipped by open_clip).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_VERSION = "openai-imagenet-80.v1"


def expand(texts: list[str], templates: tuple[str, ...] = CLIP_TEMPLATES) -> list[str]:
    """Every text formatted into every template, text-major: [t0(x0), t1(x0), ..., t0(x1), ...]."""
    # str.replace, not str.format: user text may contain braces.
    return [tpl.replace("{}", text) for text in texts for tpl in templates]


def ensemble(prompt_embeddings: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Normalised mean over each text's ``n_templates`` consecutive (normalised) prompt embeddings."""
    if prompt_embeddings.shape[0] % n_templates:
        raise ValueError("number of prompt embeddings is not a multiple of the number of templates")
    grouped = prompt_embeddings.reshape(-1, n_templates, prompt_embeddings.shape[-1])
    return torch.nn.functional.normalize(grouped.mean(dim=1), dim=-1)
