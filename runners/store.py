"""Models in BentoML's model store: what a ``bentoml:`` setting names, and copying model files in and finding them.

A setting names a stored model as ``bentoml:NAME[:VERSION]`` (``ZSS_CLIP_MODEL``, ``ZSS_DETECTOR_MODEL``); without a
version, the newest one. The store is ``$BENTOML_HOME/models`` (``~/bentoml/models`` by default); inside a container
built from a bento, BentoML points it at the models the bento carries. Entries are written by ``tools/models.py``
through ``runners.clip.import_to_store`` / ``runners.owl.import_to_store``, which copy the files as they are and
record, in the entry's metadata, the model id the embedding cache keys on (derived from the original files by the
same code as when they are served from their paths) and content digests that loading checks.

BentoML is imported only when a stored model is used, so loading from files or hub ids never needs it here.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_SCHEME = "bentoml:"
# Metadata key saying what an entry holds (the loaders refuse an entry of the other kind or not made here).
KIND_KEY = "zss_kind"
CLIP_KIND = "open_clip"
DETECTOR_KIND = "owl"


def store_tag(value: str) -> str | None:
    """The model-store tag a setting names (``bentoml:NAME[:VERSION]``), or None for anything else."""
    value = value.strip()
    if not value.lower().startswith(STORE_SCHEME):
        return None
    tag = value[len(STORE_SCHEME) :].strip()
    if not tag:
        raise ValueError(f"{value!r}: give a model-store tag after {STORE_SCHEME!r}, e.g. {STORE_SCHEME}shapes-clip")
    return tag


def store_value(tag: str) -> str:
    """The setting value that names ``tag``."""
    return f"{STORE_SCHEME}{tag}"


@dataclass(frozen=True)
class StoreEntry:
    tag: str  # with its concrete version
    path: Path
    metadata: dict[str, Any]

    def file(self, key: str) -> Path:
        """A file of the entry named by a metadata key (relative paths only: the entry must not point outside)."""
        rel = Path(str(self.metadata[key]))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"model {self.tag}: bad file name {rel} in its metadata")
        return self.path / rel


def open_entry(tag: str, kind: str) -> StoreEntry:
    """The stored model ``tag`` (FileNotFoundError if it is not in the store; ValueError if it is not a ``kind``)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound as exc:
        raise FileNotFoundError(
            f"model {tag!r} is not in BentoML's model store ({exc}); import it with `python -m tools.models`"
        ) from None
    meta = dict(model.info.metadata)
    if meta.get(KIND_KEY) != kind:
        raise ValueError(f"model {model.tag} holds {meta.get(KIND_KEY)!r}, not an {kind} model made by tools.models")
    return StoreEntry(str(model.tag), Path(model.path), meta)


def pin(tag: str) -> str:
    """``tag`` with its concrete version (the newest when none is given), or ``tag`` itself when it is not stored."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return str(bentoml.models.get(tag).tag)
    except BentoMLException:
        return tag


def tag_name(text: str) -> str:
    """A valid model-store name from free text (lowercase; letters, digits, ``-_.``; at most 63 characters)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:63].strip("-._")
    if not name:
        raise ValueError(f"cannot make a model name from {text!r}; pass --name")
    return name


def content_version(*parts: str) -> str:
    """A version derived from what an entry holds, so importing the same model twice finds the first copy."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def create_entry(
    name: str, version: str, files: Mapping[str, Path], metadata: Mapping[str, Any], labels: Mapping[str, str]
) -> tuple[str, bool]:
    """Store ``files`` (entry-relative name -> source file) as ``name:version``; returns (tag, created).

    An entry with that tag already there is kept (its version is derived from the same content)."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{name}:{version}"
    try:
        return str(bentoml.models.get(tag).tag), False
    except NotFound:
        pass
    with bentoml.models.create(tag, labels=dict(labels), metadata=dict(metadata)) as model:
        root = Path(model.path)
        for rel, src in files.items():
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return tag, True
