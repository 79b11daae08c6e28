"""Deployments: the registry (shared by every API worker) plus this process's cache of compiled deployments.

A compiled deployment is reused while the registry's version of its id is unchanged, so an update or delete made
through any worker is what every worker serves on its next request. Compiles take a lock per deployed id (a cold
compile of one id never waits on another's), and the cache is an LRU bounded by the bytes its tensors hold.

Every use names its caller (engine/tenancy.py): the registry answers only with the caller's tenant's deployments (an
admin's: all), so another tenant's id is an unknown id everywhere, checked on every request before the compiled
cache is consulted (the cache itself is keyed by id: a deployment is the same for everyone allowed to see it).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache.interfaces import DeploymentStore
from cache.registry import Deployment
from engine.configs import DeployRequest, Kind, kind_of, load_config, stored_config
from engine.kinds import CompiledDetector, tensor_bytes
from engine.tenancy import Tenant
from errors import NotFound, ZssError
from semantic.classify import CompiledClassifier

Compiled = CompiledClassifier | CompiledDetector
CompileFn = Callable[[Kind, DeployRequest], Compiled]


@dataclass(frozen=True)
class DeployOutcome:
    deployed_id: str
    message: str


@dataclass(frozen=True)
class DeploymentInfo:
    """What the API shows of a deployment: the registry's row without its stored config (that stays in the engine)."""

    deployed_id: str
    kind: str
    tenant: str
    n_classes: int
    version: int
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, d: Deployment) -> DeploymentInfo:
        key = "detector_configs" if d.kind == Kind.DETECTOR else "classifier_configs"
        return cls(d.id, d.kind, d.tenant, len(d.config.get(key, [])), d.version, d.created_at, d.updated_at)


@dataclass(frozen=True)
class _Entry:
    version: int
    kind: Kind
    compiled: Compiled
    nbytes: int


class _IdLock:
    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class Deployments:
    def __init__(self, store: DeploymentStore, compile_fn: CompileFn, max_bytes: int) -> None:
        self.store = store
        self._compile = compile_fn
        self.max_bytes = max_bytes
        self._lru: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # guards _lru, _bytes and _id_locks; never held while compiling
        self._id_locks: weakref.WeakValueDictionary[str, _IdLock] = weakref.WeakValueDictionary()

    # -- the compiled cache -----------------------------------------------------------------------------------------
    def _cached(self, deployed_id: str, version: int) -> _Entry | None:
        with self._lock:
            entry = self._lru.get(deployed_id)
            if entry is None or entry.version != version:
                return None
            self._lru.move_to_end(deployed_id)
            return entry

    def _remember(self, deployed_id: str, entry: _Entry) -> None:
        with self._lock:
            old = self._lru.pop(deployed_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._lru[deployed_id] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._lru) > 1:
                _, evicted = self._lru.popitem(last=False)
                self._bytes -= evicted.nbytes

    def _forget(self, deployed_id: str) -> None:
        with self._lock:
            old = self._lru.pop(deployed_id, None)
            if old is not None:
                self._bytes -= old.nbytes

    def _forget_if_gone(self, deployed_id: str) -> None:
        """Drop a deleted deployment's compiled entry; another tenant's id is not the caller's to drop (a probe of it
        must change nothing its owner could notice)."""
        if self.store.version(deployed_id) is None:
            self._forget(deployed_id)

    def _id_lock(self, deployed_id: str) -> _IdLock:
        with self._lock:
            lock = self._id_locks.get(deployed_id)
            if lock is None:
                lock = _IdLock()
                self._id_locks[deployed_id] = lock
            return lock

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._lru), "bytes": self._bytes, "max_bytes": self.max_bytes}

    # -- use --------------------------------------------------------------------------------------------------------
    def compiled(self, deployed_id: str, kind: Kind, *, caller: Tenant) -> Compiled:
        """The compiled deployment for an id the caller may see, recompiled only when the registry's version moved
        (blocking)."""
        version = self.store.version(deployed_id, caller.view)
        if version is None:
            self._forget_if_gone(deployed_id)
            raise NotFound()
        entry = self._cached(deployed_id, version)
        if entry is None:
            id_lock = self._id_lock(deployed_id)  # a strong reference keeps the lock alive while it is used
            with id_lock.lock:
                dep = self.store.get(deployed_id, caller.view)
                if dep is None:
                    self._forget_if_gone(deployed_id)
                    raise NotFound()
                entry = self._cached(deployed_id, dep.version)
                if entry is None:
                    dep_kind = Kind(dep.kind)
                    compiled = self._compile(dep_kind, load_config(dep_kind, dep.config))
                    entry = _Entry(dep.version, dep_kind, compiled, tensor_bytes(compiled))
                    self._remember(deployed_id, entry)
        if entry.kind != kind:
            raise ZssError(f"{deployed_id} is a {entry.kind}, not a {kind}.", 400)
        return entry.compiled

    def register(self, body: DeployRequest, compiled: Compiled, *, caller: Tenant) -> DeployOutcome:
        """DirectAI's deploy semantics: a new id, an update of an existing id, or a new id for an unknown one; an id
        the caller may not see is an unknown one (never overwritten). A new deployment is the caller's tenant's; an
        update (an admin's too) keeps the deployment's tenant."""
        requested = body.deployed_id
        existing = None if requested is None else self.store.get(requested, caller.view)
        owner = caller.name
        if requested is None:
            deployed_id, message = self.store.new_id(), "New model deployed."
        elif existing is not None:
            deployed_id, message, owner = requested, "Model updated.", existing.tenant
        else:
            deployed_id = self.store.new_id()
            message = f"{requested} model not found. Generated new model."
        kind = kind_of(body)
        dep, _ = self.store.put(deployed_id, kind.value, stored_config(body), owner)
        self._remember(deployed_id, _Entry(dep.version, kind, compiled, tensor_bytes(compiled)))
        return DeployOutcome(deployed_id, message)

    def get(self, deployed_id: str, *, caller: Tenant) -> Deployment:
        dep = self.store.get(deployed_id, caller.view)
        if dep is None:
            raise NotFound()
        return dep

    def config(self, deployed_id: str, *, caller: Tenant) -> dict[str, Any]:
        """The deployed body as DirectAI returns it: the stored config with defaults filled, plus ``deployed_id``."""
        dep = self.get(deployed_id, caller=caller)
        body = load_config(Kind(dep.kind), dep.config)
        return {**stored_config(body), "deployed_id": dep.id}

    def list(self, *, caller: Tenant) -> list[DeploymentInfo]:
        """The caller's tenant's deployments (an admin's: every tenant's), oldest first."""
        return [DeploymentInfo.of(d) for d in self.store.list(tenant=caller.view)]

    def delete(self, deployed_id: str, *, caller: Tenant) -> None:
        if not self.store.delete(deployed_id, caller.view):
            raise NotFound()
        self._forget(deployed_id)
