"""tsctl's own HTTP/1.1 server on asyncio's `Protocol`, for the inference API's hot path.

Runs on the daemon's event loop. `parser` turns a connection's bytes into request heads and
body pieces (pure: no socket, no loop, no clock; the framing is llhttp's, through
`httptools`); `connection` is one client socket, which feeds its parser and hands each request
to an `Exchange` that the application's `route` picks from the request head alone, one request
at a time, with backpressure and time limits; `server` accepts connections (up to
`Limits.max_connections`) and enforces the time limits. The exchange receives the body in
pieces, then answers through the connection: one response, or a streamed one (chunked) ending
with `end_stream`.

Why not tornado here: its `HTTP1Connection` and `IOStream` cost most of the frontend's CPU per
request in the benchmark (coroutines per message, an `add_reader`/`remove_reader` pair and a
close callback per request). This layer does the same job with one `data_received` call and
one `transport.write` per request. The management and metrics APIs stay on tornado.

What it does not do, on purpose: TLS (tsctl refuses https addresses), HTTP/2 (gRPC has its
own port), request trailers (read and dropped), transfer codings other than chunked.
"""

from tsctl.server.api.http1.connection import (
    Connection,
    ErrorResponse,
    Exchange,
    RequestTimeout,
    header_lines,
)
from tsctl.server.api.http1.parser import RequestHead
from tsctl.server.api.http1.server import Limits, Server

__all__ = [
    "Connection",
    "ErrorResponse",
    "Exchange",
    "Limits",
    "RequestHead",
    "RequestTimeout",
    "Server",
    "header_lines",
]
