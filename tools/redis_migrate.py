"""Copy one server's state (its SQLite registry and embedding cache) into Redis, before it and its new replicas run
with ``ZSS_REDIS_URL``:

    .venv/bin/python -m tools.redis_migrate --data-dir ./.zss --redis-url redis://host:6379/0 [--prefix zss:]

Deployments keep their ids, versions, timestamps and tenants (oldest first, so ``/deployments`` keeps its order); an
id Redis already holds is left as it is and reported. Vectors are written set-if-absent, as the servers write them.
Running it again copies nothing twice. Stop the server first: what it writes meanwhile would not be copied.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cache.embeddings import EmbeddingCache
from cache.interfaces import StoreUnavailable
from cache.redis_store import RedisRegistry, SharedVectors, connect
from cache.registry import Registry
from settings import get_settings


@dataclass
class Migrated:
    deployments: int = 0
    deployments_there: int = 0  # ids Redis held already (left unchanged)
    vectors: int = 0
    vectors_there: int = 0


def migrate(data_dir: Path, redis_url: str, prefix: str = "zss:") -> Migrated:
    """Copy ``data_dir``'s registry and embedding cache into Redis; what was copied and what was there already."""
    settings = get_settings({}).model_copy(update={"data_dir": data_dir})
    if not settings.registry_path.exists() and not settings.cache_dir.exists():
        raise FileNotFoundError(f"{data_dir} holds no registry ({settings.registry_path.name}) and no embeddings")
    client = connect(redis_url, 5.0, 30.0)  # a batch job: patient with a busy Redis
    done = Migrated()
    try:
        if settings.registry_path.exists():
            registry, target = Registry(settings.registry_path), RedisRegistry(client, prefix)
            for dep in registry.list():  # oldest first
                if target.restore(dep):
                    done.deployments += 1
                else:
                    done.deployments_there += 1
            registry.close()
        if settings.cache_dir.exists():
            cache = EmbeddingCache(settings.cache_dir)
            shared = SharedVectors(client, cache, prefix)
            for ns, texts, vectors in cache.rows():
                added = shared.add(ns, texts, vectors)
                done.vectors += added
                done.vectors_there += len(texts) - added
            cache.close()
    finally:
        client.close()
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="the server's ZSS_DATA_DIR")
    ap.add_argument("--redis-url", required=True, help="redis://host:6379/0 (what the replicas get as ZSS_REDIS_URL)")
    ap.add_argument("--prefix", default="zss:", help="key prefix (ZSS_REDIS_PREFIX of the replicas)")
    args = ap.parse_args(argv)
    try:
        done = migrate(args.data_dir, args.redis_url, args.prefix)
    except (FileNotFoundError, StoreUnavailable) as exc:
        raise SystemExit(f"redis_migrate: {exc}") from None
    print(
        f"deployments: {done.deployments} copied, {done.deployments_there} already in Redis (left unchanged); "
        f"vectors: {done.vectors} copied, {done.vectors_there} already in Redis"
    )


if __name__ == "__main__":
    main()
