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
- A body must also arrive at ``body_min_rate`` bytes/s on average once ``body_grace_s`` have passed since its head:
  a client trickling one byte every few seconds is never idle for ``body_timeout_s`` and held its connection (and the
  route's buffers) for as long as it liked. Time during which the server is not reading (the route has not asked for
  more yet) is not counted against the client.
- A head over h11's 16 KiB limit got uvicorn's 400 and an immediate close, which with the rest of a 200 KB header
  still arriving reset the connection: the client saw no answer at all. Here it is 431 (RFC 6585), and the connection
  reads and drops what is still coming for up to ``LINGER_S`` before closing, so the answer reaches the client.
- Every answer of the connection carries the security headers (api/headers.py), not only the routes': the ASGI app
  each connection runs is wrapped in :class:`~api.headers.SecurityHeaders`, so BentoML's own answers from its
  middlewares outside the service's (the 504 of its request timeout, the 429 of ``max_concurrency``, Starlette's
  500) have them, and so have uvicorn's raw 400 and 503 and the 408/431 here.

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
from uvicorn.protocols.http import flow_control, h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.client_address import SCOPE_PEER
from api.headers import ALWAYS, SecurityHeaders
from settings import LimitedLog, Settings

log = logging.getLogger("zss.api")
_timeout_log = LimitedLog(log)

LINGER_S = 2.0  # how long a refused connection drains the rest of its request before closing
RATE_CHECK_S = 1.0  # how often a body's average rate is checked once its grace has passed
_SECURITY_HEAD = "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in ALWAYS)


def _raw_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n{_SECURITY_HEAD}"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


_wrapped: dict[int, Any] = {}  # id of an ASGI app -> the app with the security headers (one per worker)


def _with_headers(app: Any) -> Any:
    if isinstance(app, SecurityHeaders):
        return app
    found = _wrapped.get(id(app))
    if found is None or found.app is not app:
        found = _wrapped[id(app)] = SecurityHeaders(app)
    return found


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head, an idle limit while reading a body, and 431."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: float = 500.0
    body_grace_s: float = 10.0
    settings_source: Callable[[], Settings] | None = None  # read once per worker, at its first connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._configure()
        self.app = _with_headers(self.app)
        self._timer: asyncio.TimerHandle | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self._body_start = 0.0  # when the body's clock started (moved on by time the server was not reading)
        self._body_bytes = 0
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
            cls.body_min_rate, cls.body_grace_s = s.body_min_rate, s.body_grace_s

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
                self._start_rate()
            else:
                self._disarm()
        elif isinstance(event, h11.Data):
            self._arm(self.body_timeout_s, self._body_timed_out)
            self._body_bytes += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            self._disarm()
            self._stop_rate()

    # -- the body's minimum rate ---------------------------------------------------------------------------------
    def _start_rate(self) -> None:
        self._stop_rate()
        if self.body_min_rate > 0:
            self._body_start, self._body_bytes = self.loop.time(), 0
            self._rate_timer = self.loop.call_later(max(self.body_grace_s, RATE_CHECK_S), self._check_rate)

    def _stop_rate(self) -> None:
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None

    def _check_rate(self) -> None:
        self._rate_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing() or self._draining:
            return
        if self.flow.read_paused:  # the server is not reading: this second is not the client's
            self._body_start += RATE_CHECK_S
        elapsed = self.loop.time() - self._body_start
        if elapsed >= self.body_grace_s and self._body_bytes < self.body_min_rate * elapsed:
            _timeout_log.warning(
                "closed a connection whose request body arrived at %.0f bytes/s (under %.0f)",
                self._body_bytes / max(elapsed, 1e-9),
                self.body_min_rate,
            )
            self._end_body(408, "Request Timeout", "Request body arriving too slowly.")
            return
        self._rate_timer = self.loop.call_later(RATE_CHECK_S, self._check_rate)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_rate()
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
        self._end_body(408, "Request Timeout", "Request body not received in time.")

    def _end_body(self, status: int, reason: str, text: str) -> None:
        """Give up on the body being read: the route sees the client gone; the client gets ``status`` unless an
        answer has started (then the connection just closes)."""
        self._disarm()
        self._stop_rate()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:  # what the route sends later goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._refuse(status, reason, text)

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
            return
        # uvicorn's 400, with the security headers
        event = h11.Response(
            status_code=400,
            headers=[(b"content-type", b"text/plain; charset=utf-8"), *ALWAYS, (b"connection", b"close")],
            reason=b"Bad Request",
        )
        for out in (event, h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
            self.transport.write(self.conn.send(out))
        self.transport.close()

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
    # uvicorn's 503 over its ``limit_concurrency`` is an ASGI app of its own: with the headers too
    h11_impl.service_unavailable = _with_headers(flow_control.service_unavailable)  # type: ignore[assignment]
    name = f"{__name__}:{GuardedH11Protocol.__name__}"
    config.HTTP_PROTOCOLS["auto"] = name
    config.HTTP_PROTOCOLS["h11"] = name
