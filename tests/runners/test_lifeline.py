"""runners/lifeline.py without BentoML: a worker started in a session of its own (as circus starts BentoML's) ends
within seconds of a kill -9 of its parent; the served check is tests/test_worker_lifeline.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runners.lifeline import is_bentoml_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER_ARGV = ["/x/site-packages/_bentoml_impl/worker/service.py", "service:ZeroShot", "--fd", "3"]
# The parent starts a worker in a new session (circus: os.setsid), prints its pid and waits.
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {{child!r}}], start_new_session=True, cwd={str(ROOT)!r})
print(child.pid, flush=True)
time.sleep(600)
"""
CHILD = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from runners.lifeline import die_with_parent
assert die_with_parent({WORKER_ARGV!r})
time.sleep(600)
"""


def test_only_bentomls_workers_watch_their_parent() -> None:
    assert is_bentoml_worker(WORKER_ARGV)
    assert not is_bentoml_worker(["/usr/bin/bentoml", "serve", "service:ZeroShot"])  # the server itself
    assert not is_bentoml_worker(["pytest", "--fd", "3"]) and not is_bentoml_worker([])


def test_a_worker_in_its_own_session_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(child=CHILD)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    worker = psutil.Process(int(parent.stdout.readline()))
    try:
        assert os.getsid(worker.pid) != os.getsid(parent.pid)
        time.sleep(1.0)  # the worker has imported the module and armed its watch
        assert worker.is_running()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        start = time.monotonic()
        worker.wait(10)  # psutil.TimeoutExpired if it outlives the bound
        assert time.monotonic() - start < 10
    finally:
        for p in (parent,):
            if p.poll() is None:
                p.kill()
        if worker.is_running():
            worker.kill()
