"""API keys: which tenant a key belongs to, from ``ZSS_API_KEYS``; keys held only as SHA-256 hashes, compared in
constant time, never logged; a key file is re-read when it changes, so keys rotate without a restart.

``ZSS_API_KEYS`` is either a path to a key file or an inline comma-separated ``key:tenant[:admin]`` list. A key file
has one key per line, ``key tenant [admin]`` separated by blanks; ``#`` starts a comment. In place of the key a line
may give its hash, ``sha256:<64 hex digits>`` (``printf %s "$KEY" | sha256sum``), so the file need not hold keys at
all. Keys are at least 32 characters (``MIN_KEY``: a shorter one stops the start) of visible ASCII other than ``#``
(no blanks); tenants are 1-64 of ``A-Z a-z 0-9 _ . -``.

Nothing here ever puts a key (or its hash) in a message: errors name the line, the log says how many keys it loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.tenancy import Tenant

log = logging.getLogger("zss.api")

TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY = re.compile(r"[\x21\x22\x24-\x7e]{1,4096}")  # visible ASCII but "#" (a comment in a key file), no blanks
HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
INLINE = re.compile(r"([^\s:,]+):([A-Za-z0-9_.-]{1,64})(:admin)?")
MIN_KEY = 32  # shorter keys are refused: a key must be a long random string (openssl rand -hex 32 gives 64 characters)
RELOAD_CHECK_S = 1.0  # how often the key file's stat is looked at (per API worker)


class KeyFileError(ValueError):
    """A key file or list that cannot be used; the message names the line, never the key."""


@dataclass(frozen=True)
class Key:
    """One key as held in memory: its hash and whom it identifies."""

    digest: bytes
    tenant: Tenant

    def __repr__(self) -> str:  # never the hash either
        return f"Key(tenant={self.tenant.name!r}, admin={self.tenant.admin})"


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _entry(key: str, tenant: str, flag: str | None, where: str, *, allow_hashed: bool) -> Key:
    """The key of one line's fields; KeyFileError names ``where``."""
    if not TENANT.fullmatch(tenant):
        raise KeyFileError(f"{where}: the tenant must be 1-64 of A-Z a-z 0-9 _ . -")
    if flag is not None and flag != "admin":
        raise KeyFileError(f"{where}: the third field can only be 'admin'")
    hashed = HASHED.fullmatch(key) if allow_hashed else None
    if hashed:
        return Key(bytes.fromhex(hashed.group(1)), Tenant(tenant, admin=flag == "admin"))
    if not KEY.fullmatch(key):
        raise KeyFileError(f"{where}: a key is 1-4096 visible ASCII characters other than #")
    if len(key) < MIN_KEY:  # a short key can be guessed; the server does not start with one
        raise KeyFileError(
            f"{where}: the key is shorter than {MIN_KEY} characters; use a long random key (openssl rand -hex 32)"
        )
    return Key(digest(key.encode("ascii")), Tenant(tenant, admin=flag == "admin"))


def _checked(entries: list[tuple[Key, str]]) -> tuple[Key, ...]:
    seen: dict[bytes, str] = {}
    for key, where in entries:
        if key.digest in seen:
            raise KeyFileError(f"{where}: the same key as {seen[key.digest]}")
        seen[key.digest] = where
    return tuple(k for k, _ in entries)


def parse_key_file(text: str) -> tuple[Key, ...]:
    """The keys of a key file's text (``key tenant [admin]`` lines, ``#`` comments)."""
    entries = []
    for n, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise KeyFileError(f"line {n}: expected 'key tenant' or 'key tenant admin'")
        key = _entry(fields[0], fields[1], fields[2] if len(fields) == 3 else None, f"line {n}", allow_hashed=True)
        entries.append((key, f"line {n}"))
    return _checked(entries)


def parse_key_list(value: str) -> tuple[Key, ...] | None:
    """The keys of an inline ``key:tenant[:admin],...`` list, or None when ``value`` is not such a list."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    matches = [INLINE.fullmatch(item) for item in items]
    if not items or not all(matches):
        return None
    entries = []
    for n, m in enumerate(matches, start=1):
        assert m is not None
        key = _entry(m.group(1), m.group(2), "admin" if m.group(3) else None, f"entry {n}", allow_hashed=False)
        entries.append((key, f"entry {n} of ZSS_API_KEYS"))
    return _checked(entries)


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyRing:
    """The keys of ``ZSS_API_KEYS`` for one API worker.

    ``lookup`` hashes the presented key and compares the hash with every held hash (``hmac.compare_digest``, no early
    exit), so its time depends neither on how much of a key matches nor on which key it is. A key file is looked at
    (``stat``) at most every ``RELOAD_CHECK_S`` seconds on the lookups' own clock and re-read when it changed; a file
    that has become unreadable or invalid keeps the previous keys (and logs why, once), so a half-written edit never
    opens the server or locks everyone out.
    """

    def __init__(self, keys: tuple[Key, ...], path: Path | None = None, clock: Callable[[], float] = time.monotonic):
        self._keys = keys
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int, int, int] | None = None
        self._next_check = clock() + RELOAD_CHECK_S
        self._problem: str | None = None
        self.reloads = 0

    @classmethod
    def from_setting(cls, value: str, clock: Callable[[], float] = time.monotonic) -> KeyRing | None:
        """None for an empty setting (no keys: an open server); a KeyFileError says what is wrong, without keys."""
        value = value.strip()
        if not value:
            return None
        path = Path(value).expanduser()
        if path.is_file():
            st = path.stat()
            try:
                text = path.read_text(encoding="utf-8", errors="strict")
            except UnicodeDecodeError:
                raise KeyFileError(f"API key file {path}: the file is not UTF-8 text") from None
            ring = cls(parse_key_file(text), path, clock)
            ring._stamp = _stamp(st)
            if st.st_mode & stat.S_IROTH:
                log.warning("API key file %s is readable by every user of this machine (chmod 600 it)", path)
            return ring
        inline = parse_key_list(value)
        if inline is None:
            raise KeyFileError(
                "ZSS_API_KEYS is neither a readable file nor a comma-separated list of key:tenant[:admin] entries"
            )
        return cls(inline, None, clock)

    @property
    def keys(self) -> tuple[Key, ...]:
        return self._keys

    def summary(self) -> str:
        tenants = {k.tenant.name for k in self._keys}
        admins = sum(k.tenant.admin for k in self._keys)
        source = str(self.path) if self.path else "ZSS_API_KEYS"
        return f"{len(self._keys)} keys ({admins} admin) for {len(tenants)} tenants from {source}"

    def lookup(self, key: bytes) -> Key | None:
        """The held key equal to ``key``, or None; constant time in the key's content."""
        self._maybe_reload()
        wanted = digest(key)
        found: Key | None = None
        for held in self._keys:
            if hmac.compare_digest(held.digest, wanted):
                found = held
        return found

    # -- rotation ---------------------------------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_S
        self.reload()

    def reload(self) -> None:
        """Re-read the key file if it changed since it was last read (a no-op for an inline list)."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
            if _stamp(st) == self._stamp:
                return
            keys = parse_key_file(self.path.read_text(encoding="utf-8", errors="strict"))
        except (OSError, ValueError) as exc:  # KeyFileError and UnicodeDecodeError are ValueErrors
            problem = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)
            if isinstance(exc, UnicodeDecodeError):
                problem = "the file is not UTF-8 text"
            if problem != self._problem:
                log.error("API key file %s: %s; still using the previous %d keys", self.path, problem, len(self._keys))
                self._problem = problem
            return
        self._keys, self._stamp, self._problem = keys, _stamp(st), None
        self.reloads += 1
        log.info("API keys reloaded: %s", self.summary())
