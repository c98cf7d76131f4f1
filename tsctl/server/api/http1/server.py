"""The listening side of the HTTP/1.1 layer: `Server` accepts connections on the daemon's
event loop (one `Connection` each, at most `Limits.max_connections` open: beyond it a new
connection is closed at once), runs the sweep that enforces the connections' time limits, and
on shutdown stops accepting and ends each open connection once its request is answered. Event
loop only; nothing here blocks.

With TLS (`add_sockets(..., tls=context)`), asyncio's SSL transport runs the handshake before a
`Connection` is made (so the connection limit and time limits count from then); the handshake
itself is bounded by the header timeout, and a failed one (a plain-HTTP client, an old TLS
version) closes the connection, logged by asyncio at DEBUG only. On a plain port a TLS
client's first bytes are not HTTP: the parser refuses them at once (400, then close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from tsctl.server.api.http1.connection import (
    BODY,
    HEAD,
    IDLE,
    LINGER,
    LINGERING,
    NONE,
    Connection,
    ErrorResponse,
    Exchange,
)
from tsctl.server.api.http1.parser import RequestHead

log = logging.getLogger("tsctl.server")


@dataclass(frozen=True)
class Limits:
    """What one client may hold of a server (the daemon's config gives the values)."""

    #: seconds a connection may stay open with no request in progress
    keep_alive_timeout: float = 60.0
    #: seconds from a request head's first byte to its end
    header_timeout: float = 30.0
    #: seconds from the end of a head to the end of its body
    body_timeout: float = 60.0
    #: connections open at once; beyond it new ones are closed at once
    max_connections: int = 1000
    #: body bytes still read (and dropped) after a request was refused before its body
    discard_limit: int = 64 << 20

    def timeout(self, kind: int) -> float:
        """The time limit of a connection deadline's `kind` (`connection.IDLE`, ...)."""
        if kind == HEAD:
            return self.header_timeout
        if kind == BODY:
            return self.body_timeout
        if kind == IDLE:
            return self.keep_alive_timeout
        return min(LINGER, self.body_timeout)

    def sweep_interval(self) -> float:
        """How often deadlines are checked: an eighth of the shortest limit, 10 ms to 1 s
        (a limit runs over by at most that much)."""
        shortest = min(self.keep_alive_timeout, self.header_timeout, self.body_timeout)
        return min(1.0, max(0.01, shortest / 8))


class Server:
    """Serves a `route` function on listening sockets with `Connection`s."""

    def __init__(
        self,
        route: Callable[[Connection, RequestHead], Exchange],
        error_response: ErrorResponse,
        limits: Limits | None = None,
        name: str = "HTTP API",
    ) -> None:
        self.route = route
        self.error_response = error_response
        self.limits = limits or Limits()
        #: each deadline kind's time limit, by kind (`Connection._wait` reads it per request)
        self.timeouts = tuple(
            math.inf if kind == NONE else self.limits.timeout(kind) for kind in range(LINGERING + 1)
        )
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.refused = 0  # connections closed at once since the limit was last reached
        self.stopping = False
        self._at_limit = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def add_sockets(
        self, sockets: list[socket.socket], tls: ssl.SSLContext | None = None
    ) -> None:
        """Accept connections on `sockets` (bound and listening), with TLS when `tls` is given."""
        handshake = self.limits.header_timeout if tls is not None else None
        for sock in sockets:
            listener = await self.loop.create_server(
                lambda: Connection(self),
                sock=sock,
                backlog=1024,
                ssl=tls,
                ssl_handshake_timeout=handshake,
            )
            self.listeners.append(listener)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.limits.sweep_interval(), self._sweep)

    def admit(self, conn: Connection) -> bool:
        """A new connection: counted, or refused past `max_connections` (logged once each
        time the limit is reached, not per refusal). Once stopping, refused: one accepted just
        before the listener closed, made after (asyncio makes it on a later turn)."""
        if self.stopping:
            return False
        limit = self.limits.max_connections
        if len(self.connections) >= limit:
            self.refused += 1
            if not self._at_limit:
                self._at_limit = True
                log.warning(
                    "%s: %d connections are open, its max_connections: new connections are "
                    "closed at once until some of these close",
                    self.name,
                    limit,
                )
            return False
        self.connections.add(conn)
        return True

    def release(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._at_limit and len(self.connections) <= self.limits.max_connections * 0.9:
            log.info(
                "%s: below max_connections again; %d connections were refused",
                self.name,
                self.refused,
            )
            self._at_limit = False
            self.refused = 0

    def _sweep(self) -> None:
        """Enforce the connections' time limits."""
        now = self.loop.time()
        stalled = now - self.limits.keep_alive_timeout
        for conn in list(self.connections):
            if conn.deadline <= now:
                conn.timed_out()
            elif conn.write_paused and conn.write_paused_at < stalled:
                conn.close()  # it has not read its answers for the keep-alive timeout
        self._sweeper = self.loop.call_later(self.limits.sweep_interval(), self._sweep)

    def stop(self) -> None:
        """Stop accepting connections, and end the open ones as their requests are answered:
        an idle one now, one with a request in progress after its answer (`Connection.drain`)."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.drain()

    async def close_all_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
