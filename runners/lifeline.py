"""BentoML's workers end when their server does, however the server ends.

BentoML 1.4 starts every worker (the API's and each encoder's) through circus, which puts each in a session of its
own (``os.setsid``): a ``kill -9`` of `bentoml serve` (or of its process group, or an OOM kill) ended only the server,
and its workers went on holding the port and answering, so a supervisor's restart failed with "Address already in
use". Each worker therefore asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux) and
also watches its parent itself (any POSIX system, and a guard against the moment before the request): when the parent
is gone it sends itself SIGTERM (uvicorn's graceful stop) and, if it is still alive ``GRACE_S`` later, SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5
GRACE_S = 5.0
_watching = False


def is_bentoml_worker(argv: list[str] | None = None) -> bool:
    """Whether this process is one of BentoML's service workers (``python -m _bentoml_impl.worker.service ... --fd N``),
    not the server that imports the service to start them, nor a test."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and "_bentoml_impl" in argv[0] and "--fd" in argv


def _parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` when the parent exits (Linux); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    log.warning("the server (pid %d) is gone: this worker stops", parent)
    os.kill(os.getpid(), signal.SIGTERM)  # a no-op if the kernel's signal came first and the stop is under way
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(argv: list[str] | None = None) -> bool:
    """In a BentoML worker: end this process when its parent (the server) dies; True when the watch was set up.
    Elsewhere (the server itself, a test importing the service) nothing happens. Idempotent."""
    global _watching
    if _watching or not is_bentoml_worker(argv):
        return False
    parent = os.getppid()
    _parent_death_signal(signal.SIGTERM)
    threading.Thread(target=_watch, args=(parent,), name="zss-parent-watch", daemon=True).start()
    _watching = True
    return True
