"""Debian's Chromium driven by Playwright, for the web page's tests: no browser download, ever.

The test command (./dev.sh test) installs Debian's `chromium` when it is missing and the user is root; here a missing
browser or Playwright is an error with the reason, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("ZSS_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


class NoBrowser(RuntimeError):
    pass


def chromium_path() -> str:
    path = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    if not path or not os.access(path, os.X_OK):
        raise NoBrowser(
            f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install -y chromium`; ./dev.sh test does it as "
            "root) or point ZSS_CHROMIUM at one. Never `playwright install`."
        )
    return path


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium with the offline flags, as a Playwright ``Browser``. Playwright gives each launch a fresh
    temporary user-data dir (it refuses ``--user-data-dir``) and removes it when the browser closes."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # pragma: no cover - requirements-dev.txt pins it
        raise NoBrowser(f"Playwright is not installed ({e}); run ./dev.sh setup") from e
    path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def artifacts_dir() -> Path:
    """Where the page's screenshots go (gitignored): ZSS_ARTIFACTS_DIR or ./artifacts/ui."""
    d = Path(os.environ.get("ZSS_ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "artifacts")) / "ui"
    d.mkdir(parents=True, exist_ok=True)
    return d
