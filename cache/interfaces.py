"""The storage interfaces the engine depends on, so another backend (Redis) plugs in without touching the engine.

Implementations: :class:`cache.registry.Registry` (SQLite) and :class:`cache.embeddings.EmbeddingCache` (SQLite +
FAISS) on one machine; :class:`cache.redis_store.RedisRegistry` and :class:`cache.redis_store.SharedVectors` shared by
several replicas through Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from cache.collections import Added, CollectionInfo, Item, NewItem, Snapshot
from cache.embeddings import LookupStats
from cache.registry import DEFAULT_TENANT, Deployment


class StoreUnavailable(Exception):
    """A shared store cannot be reached right now (Redis down, a timeout): the request that needs it fails with a 503
    (the engine maps this to :class:`errors.Unavailable`; cache/ does not import the error type) and nothing is lost;
    the next request tries again."""


class DeploymentStore(Protocol):
    """Deployments by id, with a version that moves on every update (cheap enough to read per request), each owned
    by a tenant.

    Tenancy is the store's: ``get``, ``version``, ``list`` and ``delete`` take the tenant whose deployments the
    caller sees (``None`` = every tenant's, an admin) and treat another tenant's id exactly as an unknown one;
    ``put`` creates a deployment owned by ``tenant`` or updates one that ``tenant`` owns, and raises
    :class:`cache.registry.OtherTenant` for an id another tenant owns. A shared store (Redis, for several replicas)
    keeps the tenant with the deployment (a field of its value, plus a set of ids per tenant for ``list``) and does
    the owner check inside the same atomic step as the write (a transaction or script), so every replica gives a
    tenant the same view. tests/cache/test_registry.py is the contract any store must pass.
    """

    def new_id(self) -> str: ...

    def put(
        self, deployed_id: str, kind: str, config: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> tuple[Deployment, bool]: ...

    def get(self, deployed_id: str, tenant: str | None = None) -> Deployment | None: ...

    def version(self, deployed_id: str, tenant: str | None = None) -> int | None: ...

    def list(self, kind: str | None = None, tenant: str | None = None) -> list[Deployment]: ...

    def delete(self, deployed_id: str, tenant: str | None = None) -> bool: ...

    def close(self) -> None: ...


class JobStore(Protocol):
    """Deploy jobs' records (issue 32), so a job outlives its process: both registries implement it beside the
    deployments. A record is a JSON-able dict with at least ``job_id``, ``tenant``, ``state`` (``running`` until it
    ends), ``owner`` (the process running it) and ``created_at``; reads add ``updated_at`` (its last write, a
    heartbeat). ``claim_job`` hands a running job from a dead owner to a new one, once, atomically."""

    def put_job(self, record: dict[str, Any]) -> None: ...

    def begin_job(self, record: dict[str, Any], limit: int, fresh_s: float) -> bool:
        """Write a new running job's record, durably, unless its tenant already has ``limit`` running jobs (0: no
        limit) whose records were written in the last ``fresh_s`` seconds (a dead process's job stops counting once
        its heartbeat is that old); the count and the write are one atomic step for every process of the store.
        False when refused."""
        ...

    def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    def list_jobs(self, tenant: str | None = None) -> list[dict[str, Any]]: ...

    def claim_job(self, job_id: str, owner_was: str, owner: str) -> bool: ...

    def request_cancel(self, job_id: str) -> None:
        """Ask whichever process runs the job to cancel it (it looks at its heartbeats: ``cancel_requested``)."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...


class VectorStore(Protocol):
    """Vectors by (namespace, text): each text is encoded at most once per namespace and kept across restarts."""

    def get_or_encode(
        self, ns: str, texts: list[str], encode: Callable[[list[str]], np.ndarray]
    ) -> tuple[np.ndarray, LookupStats]: ...

    def uncached(self, ns: str, texts: list[str]) -> list[str]:
        """The distinct texts of ``texts`` that ``get_or_encode`` would have to encode now (first occurrence order)."""
        ...

    def count(self, ns: str | None = None) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class CollectionBackend(Protocol):
    """The collections of every tenant (README "Collections"): :class:`cache.collections.CollectionStore` (SQLite in
    the data dir) and :class:`cache.pg_collections.PgCollectionStore` (PostgreSQL + pgvector, shared by replicas)
    answer alike. Blocking; a collection is addressed by ``cid`` once found by (tenant, name); a dropped one is a
    ``KeyError``; a filter that cannot run a :class:`cache.collections.FilterError`."""

    def close(self) -> None: ...
    def create(self, tenant: str, name: str, model_id: str, dim: int) -> CollectionInfo: ...
    def get(self, tenant: str, name: str) -> CollectionInfo | None: ...
    def list(self, tenant: str) -> list[CollectionInfo]: ...
    def drop(self, tenant: str, name: str) -> bool: ...
    def known_vectors(self, cid: int, hashes: Iterable[str]) -> dict[str, np.ndarray]: ...
    def add(self, cid: int, items: Sequence[NewItem], new_id: Any) -> list[Added]: ...
    def item(self, cid: int, item_id: str) -> Item | None: ...
    def thumbnail(self, cid: int, item_id: str) -> bytes | None: ...
    def delete_item(self, cid: int, item_id: str) -> bool: ...
    def fields(self, cid: int) -> set[str]: ...
    def check_filter(self, cid: int, flt: Mapping[str, Any]) -> None: ...
    def matching(self, cid: int, flt: Mapping[str, Any]) -> np.ndarray: ...
    def metadata(self, cid: int, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    def import_rows(
        self, cid: int, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict[str, Any]]
    ) -> int: ...
    def snapshot(self, cid: int, dim: int) -> Snapshot:
        """Every vector of the collection as one matrix (classification scores it as /classify would)."""
        ...

    def search(
        self, cid: int, dim: int, query: np.ndarray, k: int, flt: Mapping[str, Any] | None, exclude: str | None
    ) -> list[tuple[str, float, dict[str, Any]]]:
        """(id, inner product, metadata) of the ``k`` nearest items passing the filter, best first, less ``exclude``."""
        ...
