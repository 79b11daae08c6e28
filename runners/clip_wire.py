"""What the CLIP text encoder service (runners/clip_service.py) and its caller (engine/encoders.py) agree on, in a
module without BentoML that both may import."""

from __future__ import annotations

# Prompts that take the text encoder's short lane (``encode_now``) instead of its batches: one text with the 80
# templates fits. Short requests are answered beside a long deploy's batches instead of queueing behind them.
SHORT_LANE_PROMPTS = 128
