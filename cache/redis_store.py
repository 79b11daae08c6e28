"""Stores shared by several replicas through one Redis (``ZSS_REDIS_URL``): the deployment registry and the example
vectors.

Layout (every key starts with the prefix, ``zss:`` by default):
- ``dep:<id>``: a hash per deployment: ``kind``, ``config`` (JSON, as the SQLite registry keeps it), ``version``,
  ``created_at``, ``updated_at``, ``tenant``, ``seq`` (creation order);
- ``deps``: every id, scored by ``seq`` (creation order, what ``list`` returns); ``tenant:<name>``: one tenant's ids;
- ``seq``: the counter behind ``seq``;
- ``vec:<namespace>:<sha256 of namespace + text>``: one example vector, float32 bytes, written once (set-if-absent);
- ``vec-counts``: a hash namespace -> vectors written in it (``count``);
- ``job:<id>``: a deploy job's record; ``jobs``: their ids by creation time; ``jobs:finished``: the ended ones;
  ``jobs:running:<tenant>``: a tenant's running ones, counted by ``begin_job`` (the global limit per tenant);
  ``job-cancel:<id>``: a cancel asked of whichever replica runs the job.

A write (``put``, ``delete``) is one Lua script: the owner check and the write are one atomic step, so every replica
gives a tenant the same view. The per-request check (``version``) is one ``HMGET`` (version and owner): one round
trip.

Vectors: a replica looks in its local copy first (the SQLite + FAISS :class:`~cache.embeddings.EmbeddingCache` under
its data dir), so a warm lookup never reaches Redis; what is missing there is read from Redis (and copied locally);
what is missing in Redis too is encoded and written with ``SET NX`` inside one script that hands back, for each key
another replica wrote first, that replica's vector. So two replicas deploying the same new texts at once each encode
them at most once, one vector per key wins, and both use (and keep locally) the winner.

Redis unreachable (refused, timed out, loading): every method raises :class:`~cache.interfaces.StoreUnavailable`
naming the server, after at most one reconnect, so a request fails in about twice the configured timeouts; the
client reconnects on a later call, so the server recovers without a restart.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache.embeddings import EmbeddingCache, LookupStats, cache_key
from cache.interfaces import StoreUnavailable
from cache.registry import DEFAULT_TENANT, KEEP_JOBS, Deployment, OtherTenant

P = ParamSpec("P")
T = TypeVar("T")

# Errors that mean "Redis cannot serve now" (not a bug of ours): a 503, and the next call tries again.
_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

# put: KEYS = dep:<id>, deps, tenant:<tenant>, seq; ARGV = id, kind, config, tenant, now.
# Returns {version, created_at, existed} or {-1} when another tenant owns the id.
_PUT = """
local prev = redis.call('HMGET', KEYS[1], 'version', 'tenant', 'created_at')
if prev[1] then
  if prev[2] ~= ARGV[4] then return {-1} end
  local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'config', ARGV[3], 'updated_at', ARGV[5])
  return {v, prev[3], 1}
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'config', ARGV[3], 'version', 1, 'created_at', ARGV[5],
           'updated_at', ARGV[5], 'tenant', ARGV[4], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return {1, ARGV[5], 0}
"""

# delete: KEYS = dep:<id>, deps; ARGV = id, tenant prefix, tenant ('' = any). Returns 1 when deleted.
_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'tenant')
if not owner then return 0 end
if ARGV[3] ~= '' and owner ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
return 1
"""

# set-if-absent of vectors: KEYS = vec-counts, then the vector keys; ARGV = namespace, then one vector per key.
# Returns, per key, 0 where this call's vector was stored, else the vector stored before (another replica's).
_SET_VECTORS = """
local out = {}
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[i], 'NX') then
    added = added + 1
    out[i - 1] = 0
  else
    out[i - 1] = redis.call('GET', KEYS[i])
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], added) end
return out
"""


# restore (a migration): KEYS = dep:<id>, deps, tenant:<tenant>, seq; ARGV = id, kind, config, version, created_at,
# updated_at, tenant. Writes only an absent id; returns 1 when written.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'config', ARGV[3], 'version', ARGV[4], 'created_at', ARGV[5],
           'updated_at', ARGV[6], 'tenant', ARGV[7], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return 1
"""


def connect(url: str, connect_timeout_s: float = 0.5, timeout_s: float = 0.5) -> redis.Redis:
    """A client for ``url`` with bounded waits: the timeouts given and one reconnect (redis-py's default is ten
    retries with backoff, which would hold a request for seconds on a dead server)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


def describe(client: redis.Redis) -> str:
    """host:port (or the socket path) of the client's server, for messages."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


def _guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Redis being unreachable becomes :class:`StoreUnavailable` with the server's address and the reason."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except _DOWN as exc:
            where = describe(args[0].client)  # type: ignore[attr-defined]
            raise StoreUnavailable(f"Redis at {where} unavailable: {exc or type(exc).__name__}") from exc

    return call


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _deployment(deployed_id: str, h: dict[bytes, bytes]) -> Deployment:
    return Deployment(
        deployed_id,
        _text(h[b"kind"]),
        json.loads(h[b"config"]),
        int(h[b"version"]),
        float(h[b"created_at"]),
        float(h[b"updated_at"]),
        _text(h[b"tenant"]),
    )


_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') == 'running' and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'updated_at', ARGV[3])
    return 1
end
return 0
"""


# A new job (JobStore.begin_job): count the tenant's running jobs with a fresh heartbeat (members that ended are
# dropped from the set on the way), and write the record only under the limit. KEYS: the tenant's running set, the
# job's hash, the jobs' index; ARGV: limit, oldest fresh updated_at, job id, record, state, owner, updated_at,
# created_at, key prefix of job hashes.
_BEGIN_JOB = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local h = redis.call('HMGET', ARGV[9] .. id, 'state', 'updated_at')
    if h[1] ~= 'running' then
        redis.call('SREM', KEYS[1], id)
    elseif tonumber(h[2]) > tonumber(ARGV[2]) then
        n = n + 1
    end
end
if tonumber(ARGV[1]) > 0 and n >= tonumber(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[2], 'record', ARGV[4], 'state', ARGV[5], 'owner', ARGV[6], 'updated_at', ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[3])
redis.call('SADD', KEYS[1], ARGV[3])
return 1
"""


def _job(h: dict[bytes, bytes]) -> dict[str, Any]:
    return {**json.loads(h[b"record"]), "owner": _text(h[b"owner"]), "updated_at": float(h[b"updated_at"])}


class RedisRegistry:
    """The deployment registry in Redis (cache/interfaces.py ``DeploymentStore``), shared by every replica."""

    def __init__(self, client: redis.Redis, prefix: str = "zss:") -> None:
        self.client = client
        self.prefix = prefix
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._restore = client.register_script(_RESTORE)
        self._claim = client.register_script(_CLAIM)
        self._begin_job = client.register_script(_BEGIN_JOB)

    def _key(self, deployed_id: str) -> str:
        return f"{self.prefix}dep:{deployed_id}"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}tenant:{tenant}"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @_guarded
    def put(
        self, deployed_id: str, kind: str, config: dict[str, Any], tenant: str = DEFAULT_TENANT
    ) -> tuple[Deployment, bool]:
        """Create a deployment owned by ``tenant`` or update the one it owns (one atomic script); an id another tenant
        owns raises :class:`OtherTenant` and changes nothing."""
        now = time.time()
        body = json.dumps(config, ensure_ascii=False, sort_keys=True)
        keys = [self._key(deployed_id), f"{self.prefix}deps", self._tenant_key(tenant), f"{self.prefix}seq"]
        out = self._put(keys=keys, args=[deployed_id, kind, body, tenant, repr(now)])
        if int(out[0]) < 0:
            raise OtherTenant(deployed_id)
        version, created, existed = int(out[0]), float(out[1]), bool(int(out[2]))
        return Deployment(deployed_id, kind, config, version, created, now, tenant), existed

    @_guarded
    def get(self, deployed_id: str, tenant: str | None = None) -> Deployment | None:
        h = self.client.hgetall(self._key(deployed_id))
        if not h or (tenant is not None and _text(h[b"tenant"]) != tenant):
            return None
        return _deployment(deployed_id, h)

    @_guarded
    def version(self, deployed_id: str, tenant: str | None = None) -> int | None:
        """One round trip (``HMGET`` of version and owner): cheap enough for every request."""
        version, owner = self.client.hmget(self._key(deployed_id), ["version", "tenant"])
        if version is None or owner is None or (tenant is not None and _text(owner) != tenant):
            return None
        return int(version)

    @_guarded
    def list(self, kind: str | None = None, tenant: str | None = None) -> list[Deployment]:
        """Deployments in creation order, of one kind and one tenant when given (ids, then one pipelined read)."""
        index = f"{self.prefix}deps" if tenant is None else self._tenant_key(tenant)
        ids = [_text(i) for i in self.client.zrange(index, 0, -1)]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._key(i))
        out = []
        for i, h in zip(ids, pipe.execute()):
            if not h:  # deleted between the two reads
                continue
            dep = _deployment(i, h)
            if (kind is None or dep.kind == kind) and (tenant is None or dep.tenant == tenant):
                out.append(dep)
        return out

    @_guarded
    def delete(self, deployed_id: str, tenant: str | None = None) -> bool:
        keys = [self._key(deployed_id), f"{self.prefix}deps"]
        return bool(self._delete(keys=keys, args=[deployed_id, f"{self.prefix}tenant:", tenant or ""]))

    @_guarded
    def restore(self, dep: Deployment) -> bool:
        """Write a deployment as it is (id, version, timestamps, tenant) unless its id is taken: a migration's writer
        (called oldest first, it keeps the order). Whether it was written."""
        keys = [self._key(dep.id), f"{self.prefix}deps", self._tenant_key(dep.tenant), f"{self.prefix}seq"]
        body = json.dumps(dep.config, ensure_ascii=False, sort_keys=True)
        args = [dep.id, dep.kind, body, dep.version, repr(dep.created_at), repr(dep.updated_at), dep.tenant]
        return bool(self._restore(keys=keys, args=args))

    @_guarded
    def ping(self) -> None:
        """Raises :class:`StoreUnavailable` when Redis does not answer (readiness)."""
        self.client.ping()

    # -- deploy jobs (cache/interfaces.py JobStore), shared by the replicas ------------------------------------------
    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _running_key(self, tenant: str) -> str:
        return f"{self.prefix}jobs:running:{tenant}"

    @_guarded
    def begin_job(self, record: dict[str, Any], limit: int, fresh_s: float) -> bool:
        """cache/interfaces.py ``JobStore.begin_job``: one Lua script, so the replicas sharing this Redis never
        admit more than ``limit`` jobs of a tenant between them (each tenant's running job ids are a set)."""
        body = json.dumps(record, ensure_ascii=False, sort_keys=True)
        now = time.time()
        keys = [self._running_key(record["tenant"]), self._job_key(record["job_id"]), f"{self.prefix}jobs"]
        args = [limit, repr(now - fresh_s), record["job_id"], body, record["state"], record["owner"], repr(now)]
        return bool(self._begin_job(keys=keys, args=[*args, repr(float(record["created_at"])), f"{self.prefix}job:"]))

    @_guarded
    def put_job(self, record: dict[str, Any]) -> None:
        """As the SQLite registry's: a hash per job plus the jobs' ids by creation time; finished jobs beyond the
        newest KEEP_JOBS are dropped."""
        body = json.dumps(record, ensure_ascii=False, sort_keys=True)
        fields = {"record": body, "state": record["state"], "owner": record["owner"], "updated_at": repr(time.time())}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._job_key(record["job_id"]), mapping=fields)
        pipe.zadd(f"{self.prefix}jobs", {record["job_id"]: float(record["created_at"])})
        if record["state"] != "running":
            pipe.zadd(f"{self.prefix}jobs:finished", {record["job_id"]: float(record["created_at"])})
            pipe.srem(self._running_key(record["tenant"]), record["job_id"])
        else:
            pipe.sadd(self._running_key(record["tenant"]), record["job_id"])
        pipe.execute()
        finished = f"{self.prefix}jobs:finished"
        if record["state"] != "running" and self.client.zcard(finished) > KEEP_JOBS:
            old = [_text(i) for i in self.client.zrange(finished, 0, -KEEP_JOBS - 1)]
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(finished, *old).zrem(f"{self.prefix}jobs", *old).delete(*(self._job_key(i) for i in old))
            pipe.execute()

    @_guarded
    def get_job(self, job_id: str) -> dict[str, Any] | None:
        h = self.client.hgetall(self._job_key(job_id))
        return _job(h) if h else None

    @_guarded
    def list_jobs(self, tenant: str | None = None) -> list[dict[str, Any]]:
        ids = [_text(i) for i in self.client.zrange(f"{self.prefix}jobs", 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._job_key(i))
        jobs = [_job(h) for h in (pipe.execute() if ids else []) if h]
        return [j for j in jobs if tenant is None or j["tenant"] == tenant]

    @_guarded
    def request_cancel(self, job_id: str) -> None:
        """A cancel for the replica running the job (a key that expires after a day)."""
        self.client.set(f"{self.prefix}job-cancel:{job_id}", b"1", ex=86_400)

    @_guarded
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(f"{self.prefix}job-cancel:{job_id}"))

    @_guarded
    def claim_job(self, job_id: str, owner_was: str, owner: str) -> bool:
        return bool(self._claim(keys=[self._job_key(job_id)], args=[owner_was, owner, repr(time.time())]))

    def close(self) -> None:
        self.client.close()


class SharedVectors:
    """Example vectors shared through Redis, read through a local :class:`EmbeddingCache` (cache/interfaces.py
    ``VectorStore``): keys are generic (namespace, text) pairs, so any caller's namespaces work."""

    BATCH = 256  # keys per Redis call: a deploy of thousands of texts never holds Redis for long

    def __init__(self, client: redis.Redis, local: EmbeddingCache, prefix: str = "zss:") -> None:
        self.client = client
        self.local = local
        self.prefix = prefix
        self._set = client.register_script(_SET_VECTORS)

    def key(self, ns: str, text: str) -> str:
        return f"{self.prefix}vec:{ns}:{cache_key(ns, text)}"

    @property
    def _counts(self) -> str:
        return f"{self.prefix}vec-counts"

    def _fetch(self, ns: str, texts: list[str]) -> dict[str, np.ndarray]:
        """Vectors Redis holds for ``texts``."""
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(texts), self.BATCH):
            chunk = texts[start : start + self.BATCH]
            for text, blob in zip(chunk, self.client.mget([self.key(ns, t) for t in chunk])):
                if blob is not None:
                    found[text] = _vector(blob)
        return found

    def _store(self, ns: str, texts: list[str], vectors: np.ndarray) -> tuple[np.ndarray, int]:
        """Write each vector unless another replica wrote that key first; the vectors that now stand in Redis, and
        how many of them this call wrote."""
        out = np.array(vectors, dtype=np.float32)  # a copy: the caller's array is not changed
        added = 0
        for start in range(0, len(texts), self.BATCH):
            chunk = texts[start : start + self.BATCH]
            keys = [self._counts, *(self.key(ns, t) for t in chunk)]
            args = [ns, *(v.tobytes() for v in out[start : start + len(chunk)])]
            for j, stored in enumerate(self._set(keys=keys, args=args)):
                if stored != 0:  # lost the race: use the winner's vector
                    out[start + j] = _vector(stored)
                else:
                    added += 1
        return out, added

    @_guarded
    def uncached(self, ns: str, texts: list[str]) -> list[str]:
        """The distinct texts neither the local copy nor Redis holds (``EXISTS`` per key, no vector read)."""
        todo = self.local.uncached(ns, texts)
        out: list[str] = []
        for start in range(0, len(todo), self.BATCH):
            chunk = todo[start : start + self.BATCH]
            pipe = self.client.pipeline(transaction=False)
            for t in chunk:
                pipe.exists(self.key(ns, t))
            out.extend(t for t, there in zip(chunk, pipe.execute()) if not there)
        return out

    @_guarded
    def get_or_encode(
        self, ns: str, texts: list[str], encode: Callable[[list[str]], np.ndarray]
    ) -> tuple[np.ndarray, LookupStats]:
        """Vectors [N, D] for texts: the local copy first, then Redis, and only what neither holds is encoded."""
        found, missing = self.local.get(ns, texts)
        stats = LookupStats(hits=len(texts) - len(missing), misses=len(missing))
        if missing:
            todo = list(dict.fromkeys(texts[i] for i in missing))
            shared = self._fetch(ns, todo)
            new = [t for t in todo if t not in shared]
            if new:
                stats.encoded = len(new)
                vecs, _ = self._store(ns, new, np.asarray(encode(new), dtype=np.float32))
                shared.update(zip(new, vecs))
            self.local.put(ns, todo, np.stack([shared[t] for t in todo]))
            remote_hits = sum(1 for i in missing if texts[i] not in new)
            stats.hits += remote_hits
            stats.misses -= remote_hits
            for i in missing:
                found[i] = shared[texts[i]]
        if not texts:
            return np.zeros((0, 0), np.float32), stats
        return np.stack([found[i] for i in range(len(texts))]), stats

    @_guarded
    def add(self, ns: str, texts: list[str], vectors: np.ndarray) -> int:
        """Write vectors to Redis unless there already (a migration's writer; the local copy is not touched); how many
        were new."""
        return self._store(ns, texts, vectors)[1]

    @_guarded
    def count(self, ns: str | None = None) -> int:
        """Vectors written to Redis (in ``ns``, or in all namespaces)."""
        if ns is None:
            return sum(int(v) for v in self.client.hvals(self._counts))
        return int(self.client.hget(self._counts, ns) or 0)

    @_guarded
    def ping(self) -> None:
        self.client.ping()

    def flush(self) -> None:
        self.local.flush()

    def close(self) -> None:
        self.local.close()
        self.client.close()


def _vector(blob: bytes) -> np.ndarray:
    if len(blob) % 4:
        raise ValueError(f"a stored vector of {len(blob)} bytes is not float32")
    return np.frombuffer(blob, dtype=np.float32)
