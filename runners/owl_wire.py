"""The detector encoder's wire format: one image's per-box outputs packed into one float32 array [k, 7 + D].

Columns: boxes xyxy, logit shift, logit scale, objectness, then the class embedding, so a batch crosses the process
boundary as a single numpy array; ``unpack`` splits it again. numpy only: the engine unpacks what the service packs.
"""

from __future__ import annotations

import numpy as np

PACKED_COLUMNS = 7  # x1, y1, x2, y2, logit_shift, logit_scale, objectness; class embedding follows


def pack(encodings: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Per-image encodings (same k) -> [N, k, 7 + D] float32."""
    rows = [
        np.concatenate(
            [
                e["boxes"],
                e["logit_shift"][:, None],
                e["logit_scale"][:, None],
                e["objectness"][:, None],
                e["class_embeds"],
            ],
            axis=1,
        )
        for e in encodings
    ]
    return np.stack(rows).astype(np.float32, copy=False)


def unpack(packed: np.ndarray) -> dict[str, np.ndarray]:
    """One image's [k, 7 + D] -> boxes, logit_shift, logit_scale, objectness, class_embeds."""
    return {
        "boxes": packed[:, 0:4],
        "logit_shift": packed[:, 4],
        "logit_scale": packed[:, 5],
        "objectness": packed[:, 6],
        "class_embeds": packed[:, PACKED_COLUMNS:],
    }
