"""Procedurally drawn coloured shapes: the data behind the self-trained ``shapes-clip`` model.

Pure and seeded: every function takes its randomness from the ``numpy.random.Generator`` it is given, so a seed fully
determines an image or caption. Images are one filled shape on a near-neutral background, drawn at 2x resolution and
downsampled so edges are anti-aliased like a photo rather than hard pixel steps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Nominal RGB of each shape colour. Kept far apart in hue so that +-JITTER per channel never makes two colours meet.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 45, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Colours the captions never name: training draws some shapes in them with shape-only captions, so the model has to
# recognise a shape whatever its colour (held-out pairs depend on that). Each is far from every named colour.
UNNAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "cyan": (25, 200, 215),
    "pink": (250, 125, 195),
    "grey": (128, 128, 128),
}
_PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **UNNAMED_COLOURS}

# Colour/shape pairs never drawn for training: zero-shot composition is measured on them. Red pairs stay seen, other
# tests rely on "a red square" / "a red circle" being learnt.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("yellow", "triangle"), ("blue", "square"), ("green", "circle")})

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_COMBOS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_COMBOS if p not in HELD_OUT)
UNNAMED_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in UNNAMED_COLOURS for s in SHAPES)

JITTER = 18  # max per-channel deviation from the nominal shape colour
_SUPERSAMPLE = 2

# Caption templates. "{c}" is the colour, "{s}" the shape. Colour-only and shape-only captions are trained too, so
# prompts such as "a red shape" or "a circle" mean something to the model.
FULL_TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {c} {s} on a {bg} background",
    "a drawing of a {c} {s}",
    "{c} {s}",
)
COLOUR_TEMPLATES: tuple[str, ...] = (
    "a {c} shape",
    "something {c}",
    "a photo of something {c}",
    "{c}",
)
SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {s}",
    "a photo of a {s}",
    "a {s} on a {bg} background",
    "{s}",
)


def background(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    """A dark or light near-grey background ("dark" | "light", rgb); low saturation keeps it off every shape colour."""
    kind = "dark" if rng.random() < 0.5 else "light"
    level = int(rng.integers(10, 75)) if kind == "dark" else int(rng.integers(175, 246))
    tint = rng.integers(-8, 9, size=3)
    rgb = tuple(int(v) for v in np.clip(level + tint, 0, 255))
    return kind, (rgb[0], rgb[1], rgb[2])


def jittered(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The nominal colour with a small independent jitter per channel."""
    base = np.asarray(_PALETTE[colour], dtype=np.int64)
    rgb = np.clip(base + rng.integers(-JITTER, JITTER + 1, size=3), 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    # r is the circumradius, so any rotation stays inside the circle the centre was placed for; a square's corners sit
    # at 45 degrees so angle 0 is axis-aligned.
    n, offset = (4, math.pi / 4) if shape == "square" else (3, -math.pi / 2)
    return [
        (
            cx + r * math.cos(offset + angle + 2 * math.pi * k / n),
            cy + r * math.sin(offset + angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def draw(
    colour: str,
    shape: str,
    rng: np.random.Generator,
    size: int = 64,
    *,
    bg: tuple[str, tuple[int, int, int]] | None = None,
    noise: float = 6.0,
) -> Image.Image:
    """One ``size`` x ``size`` RGB image of a filled ``colour`` ``shape`` at a random size, position and rotation.

    ``bg`` fixes the background (see ``background``); by default it is drawn from ``rng``. ``noise`` is the standard
    deviation of per-pixel Gaussian noise (0 for clean images).
    """
    if colour not in _PALETTE:
        raise ValueError(f"unknown colour {colour!r}; known: {sorted(_PALETTE)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    _, bg_rgb = background(rng) if bg is None else bg
    fill = jittered(colour, rng)
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), bg_rgb)
    pen = ImageDraw.Draw(img)
    # Radius between ~1/6 and ~2/5 of the image; the centre keeps the whole shape inside the frame.
    r = float(rng.uniform(0.17, 0.40)) * big
    cx = float(rng.uniform(r, big - r))
    cy = float(rng.uniform(r, big - r))
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        # Small rotations only: a square turned by 45 degrees reads as a diamond.
        angle = float(rng.uniform(-0.35, 0.35))
        pen.polygon(_polygon("square", cx, cy, r, angle), fill=fill)
    else:
        angle = float(rng.uniform(0, 2 * math.pi))
        pen.polygon(_polygon("triangle", cx, cy, r, angle), fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


def caption(
    colour: str,
    shape: str,
    rng: np.random.Generator,
    *,
    kind: str | None = None,
    bg_kind: str | None = None,
) -> str:
    """A caption for a ``colour`` ``shape``: full (colour and shape), colour-only or shape-only.

    ``kind`` is "full", "colour" or "shape"; by default it is drawn with weights 1/2, 1/4, 1/4. ``bg_kind`` ("dark" |
    "light") is used by templates that mention the background; without it those templates are not chosen.
    """
    if kind is None:
        kind = str(rng.choice(["full", "colour", "shape"], p=[0.5, 0.25, 0.25]))
    templates = {"full": FULL_TEMPLATES, "colour": COLOUR_TEMPLATES, "shape": SHAPE_TEMPLATES}[kind]
    if bg_kind is None:
        templates = tuple(t for t in templates if "{bg}" not in t)
    tpl = templates[int(rng.integers(len(templates)))]
    return tpl.replace("{c}", colour).replace("{s}", shape).replace("{bg}", bg_kind or "")


def sample(
    rng: np.random.Generator,
    combos: tuple[tuple[str, str], ...] = SEEN_COMBOS,
    size: int = 64,
    kind: str | None = None,
) -> tuple[Image.Image, str, str, str, str]:
    """A random training example: (image, caption, colour, shape, caption kind); ``kind`` as in ``caption``."""
    colour, shape = combos[int(rng.integers(len(combos)))]
    bg = background(rng)
    if kind is None:
        kind = str(rng.choice(["full", "colour", "shape"], p=[0.5, 0.25, 0.25]))
    img = draw(colour, shape, rng, size, bg=bg)
    return img, caption(colour, shape, rng, kind=kind, bg_kind=bg[0]), colour, shape, kind
