"""The storage interfaces the engine depends on, so another backend (Redis) plugs in without touching the engine.

Today's implementations: :class:`cache.registry.Registry` (SQLite) and :class:`cache.embeddings.EmbeddingCache`
(SQLite + FAISS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from cache.embeddings import LookupStats
from cache.registry import Deployment


class DeploymentStore(Protocol):
    """Deployments by id, with a version that moves on every update (cheap enough to read per request)."""

    def new_id(self) -> str: ...

    def put(self, deployed_id: str, kind: str, config: dict[str, Any]) -> tuple[Deployment, bool]: ...

    def get(self, deployed_id: str) -> Deployment | None: ...

    def version(self, deployed_id: str) -> int | None: ...

    def list(self, kind: str | None = None) -> list[Deployment]: ...

    def delete(self, deployed_id: str) -> bool: ...

    def close(self) -> None: ...


class VectorStore(Protocol):
    """Vectors by (namespace, text): each text is encoded at most once per namespace and kept across restarts."""

    def get_or_encode(
        self, ns: str, texts: list[str], encode: Callable[[list[str]], np.ndarray]
    ) -> tuple[np.ndarray, LookupStats]: ...

    def count(self, ns: str | None = None) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
