"""The HTTP/1.1 connection itself: time limits for requests that never finish arriving, and 431 for oversized heads.

BentoML 1.4 runs each worker's uvicorn with ``http="auto"`` (h11 here: httptools is not installed) and lets a service
configure only the keep-alive and graceful-shutdown timeouts and the backlog (``_bentoml_impl/worker/service.py``):
no ``h11_max_incomplete_event_size``, no protocol class, and uvicorn has no header or body read timeout at all. So:

- A connection that never completes its request head stayed open for ever (3,000 such connections of a probe were all
  open 45 s later; every one an open file). Here the head must arrive within ``header_timeout_s`` of the connection
  (on a kept-alive connection: of its first byte; idle ones are uvicorn's keep-alive timeout's), and a body that has
  started must keep arriving: no ``body_timeout_s`` without a byte while the server is reading it. Either way the
  answer is 408 and the connection closes (a new connection that sent nothing is closed without one); the route still
  running sees the client gone.
- A head over h11's 16 KiB limit got uvicorn's 400 and an immediate close, which with the rest of a 200 KB header
  still arriving reset the connection: the client saw no answer at all. Here it is 431 (RFC 6585), and the connection
  reads and drops what is still coming for up to ``LINGER_S`` before closing, so the answer reaches the client.

:func:`guard_connections` makes this protocol the one uvicorn's ``"auto"`` and ``"h11"`` names load (uvicorn's own
registry of protocol classes); the service module calls it at import, before BentoML's worker builds its uvicorn
configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.client_address import SCOPE_PEER
from settings import LimitedLog, Settings

log = logging.getLogger("zss.api")
_timeout_log = LimitedLog(log)

LINGER_S = 2.0  # how long a refused connection drains the rest of its request before closing


def _raw_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nx-content-type-options: nosniff\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head, an idle limit while reading a body, and 431."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    settings_source: Callable[[], Settings] | None = None  # read once per worker, at its first connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._configure()
        self._timer: asyncio.TimerHandle | None = None
        self._error_status = 400
        self._draining = False
        self._head_bytes = False  # whether any of the awaited request head has arrived
        receive_event = self.conn.next_event

        def next_event() -> Any:  # uvicorn's loop over h11's events, observed
            try:
                event = receive_event()
            except h11.RemoteProtocolError as exc:
                self._error_status = exc.error_status_hint
                raise
            self._observe(event)
            return event

        self.conn.next_event = next_event  # type: ignore[method-assign]
        # The connection's peer, recorded before uvicorn's proxy-header middleware (on in BentoML 1.4, trusting any
        # loopback peer) can rewrite the request's client: api/client_address.py trusts only ZSS_TRUSTED_PROXIES.
        app = self.app

        async def recorded_peer(scope: Any, receive: Any, send: Any) -> None:
            scope[SCOPE_PEER] = self.client  # set when the connection was made
            await app(scope, receive, send)

        self.app = recorded_peer

    @classmethod
    def _configure(cls) -> None:
        if cls.settings_source is not None:
            s, cls.settings_source = cls.settings_source(), None
            cls.header_timeout_s, cls.body_timeout_s = s.header_timeout_s, s.body_timeout_s

    # -- the timers ------------------------------------------------------------------------------------------------
    def _arm(self, seconds: float, fire: Callable[[], None]) -> None:
        self._disarm()
        if seconds > 0:
            self._timer = self.loop.call_later(seconds, fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _observe(self, event: Any) -> None:
        if isinstance(event, h11.Request):
            if self.conn.their_state is h11.SEND_BODY:
                self._arm(self.body_timeout_s, self._body_timed_out)
            else:
                self._disarm()
        elif isinstance(event, h11.Data):
            self._arm(self.body_timeout_s, self._body_timed_out)
        elif isinstance(event, h11.EndOfMessage):
            self._disarm()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm_head(self) -> None:
        self._head_bytes = False
        self._arm(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if not self._head_bytes:  # an idle connection (a browser's preconnect): closed without an answer
            self.transport.close()
            return
        _timeout_log.warning("closed a connection whose request head took over %.0f s", self.header_timeout_s)
        self._refuse(408, "Request Timeout", "Request head not received in time.")

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the route is not reading yet: the client is not the one waiting
            self._arm(self.body_timeout_s, self._body_timed_out)
            return
        _timeout_log.warning("closed a connection whose request body stalled for %.0f s", self.body_timeout_s)
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:  # the route sees the client gone; what it sends later goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._refuse(408, "Request Timeout", "Request body not received in time.")

    # -- refusing ---------------------------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, text: str) -> None:
        """Answer and close after draining what the client is still sending (a close with unread data resets the
        connection, and the client loses the answer)."""
        self.transport.write(_raw_response(status, reason, text))
        self._draining = True
        self.loop.call_later(LINGER_S, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        if self._error_status == 431:
            self._refuse(431, "Request Header Fields Too Large", "Request header fields too large.")
        else:
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        if self._timer is None and self.conn.their_state is h11.IDLE and self.transport is not None:
            # The first bytes of the next request on a kept-alive connection: its head has the same deadline (an
            # idle kept-alive connection is uvicorn's keep-alive timeout's business).
            self._arm_head()
        self._head_bytes = True
        super().data_received(data)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._draining:
            self.transport.close()
        return None


def guard_connections(settings: Callable[[], Settings] | None = None) -> None:
    """Make uvicorn build :class:`GuardedH11Protocol` connections in this process (idempotent); ``settings`` gives
    the timeouts, read at the first connection."""
    from uvicorn import config

    GuardedH11Protocol.settings_source = settings
    name = f"{__name__}:{GuardedH11Protocol.__name__}"
    config.HTTP_PROTOCOLS["auto"] = name
    config.HTTP_PROTOCOLS["h11"] = name
