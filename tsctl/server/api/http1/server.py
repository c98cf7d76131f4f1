"""The listening side of the HTTP/1.1 layer: `Server` accepts connections on the daemon's
event loop (one `Connection` each), closes idle ones, and stops accepting on shutdown. Event
loop only; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from tsctl.server.api.http1.connection import Connection, ErrorResponse, Exchange
from tsctl.server.api.http1.parser import RequestHead


class Server:
    """Serves a `route` function on listening sockets with `Connection`s."""

    def __init__(
        self,
        route: Callable[[Connection, RequestHead], Exchange],
        error_response: ErrorResponse,
        discard_limit: int,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.route = route
        self.error_response = error_response
        self.discard_limit = discard_limit
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def add_sockets(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            listener = await self.loop.create_server(
                lambda: Connection(self), sock=sock, backlog=1024
            )
            self.listeners.append(listener)
        self._sweeper = self.loop.call_later(60, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle (no request in progress) for longer than the timeout."""
        cutoff = self.loop.time() - self.idle_timeout
        for conn in list(self.connections):
            if conn.parser.idle() and conn.last_active < cutoff:
                conn.close()
        self._sweeper = self.loop.call_later(60, self._sweep)

    def stop(self) -> None:
        """Stop accepting connections."""
        for listener in self.listeners:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def close_all_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
