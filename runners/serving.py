"""BentoML service settings shared by the encoder services (runners/clip_service.py, runners/owl_service.py)."""

from __future__ import annotations

from typing import Any

# Long requests (a cold deploy of thousands of prompts) must not time out.
TRAFFIC: dict[str, Any] = {"timeout": 600}

# Read by the callers' dependency clients. BentoML 1.4.39 replaces a client's aiohttp session every `max_requests`
# requests (default 100) or `max_age` seconds and closes the old one with requests still in flight on it: they fail
# with ServerDisconnectedError and, after service.call_encoder's retry, are encoded twice. At 16 clients that cost
# P1 about half its throughput and gave multi-second p99 spikes (BENCHMARKS.md). The session is therefore never
# replaced; the retry stays as a safety net.
RUNNER_CONNECTION: dict[str, Any] = {"max_requests": 2**31 - 1, "max_age": 1e9}
