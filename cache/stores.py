"""The stores a server opens for its settings: on one machine (no ``ZSS_REDIS_URL``) the SQLite registry and the
local embedding cache under the data dir; with a Redis URL the registry in Redis and the vectors shared there, read
through the local cache."""

from __future__ import annotations

from cache.embeddings import EmbeddingCache
from cache.interfaces import DeploymentStore, VectorStore
from cache.registry import Registry
from settings import Settings


def open_stores(settings: Settings) -> tuple[DeploymentStore, VectorStore]:
    """(registry, vectors) for these settings; connecting to Redis is lazy (a server starts while Redis is down and
    answers 503 until it is up)."""
    local = EmbeddingCache(settings.cache_dir)
    if not settings.redis_url:
        return Registry(settings.registry_path), local
    from cache.redis_store import RedisRegistry, SharedVectors, connect

    client = connect(settings.redis_url, settings.redis_connect_timeout_s, settings.redis_timeout_s)
    return RedisRegistry(client, settings.redis_prefix), SharedVectors(client, local, settings.redis_prefix)
