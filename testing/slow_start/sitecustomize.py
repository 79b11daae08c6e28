"""Fault injection for start-up tests: a BentoML service worker that starts late, as one writing big random weights
or loading a model from a slow disk does.

A test puts this folder on the server's PYTHONPATH and sets ``TESTING_SLOW_START=NAME:SECONDS``; the worker process
of the service NAME (``--service-name NAME`` in its command line) then sleeps SECONDS before it imports anything,
while BentoML's arbiter already holds its socket (callers connect and wait, as they do in a real slow start).
Every other process, and any process without the variable, is untouched.
"""

import os
import sys
import time


def _delay() -> None:
    spec = os.environ.get("TESTING_SLOW_START", "")
    name, _, seconds = spec.partition(":")
    argv = sys.argv
    if name and "--service-name" in argv and argv[argv.index("--service-name") + 1 :][:1] == [name]:
        time.sleep(float(seconds))


_delay()
