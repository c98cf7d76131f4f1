"""The frontend ↔ worker frame codec: `tsctl.ipc.messages` in length-prefixed frames.

One module owns the format; both sides use it. A frame is::

    prefix   12 bytes, network order: magic b"TW" | version u8 | kind u8 | meta_len u32
             | payload_len u32
    meta     meta_len bytes of UTF-8 JSON: the message's small structured fields, plus
             "lens", the byte lengths of the payload's segments in order
    payload  payload_len bytes: the segments (request and response bodies) back to back, raw

Bodies are never base64'd or re-encoded: a request body goes from the HTTP parser into the
socket as is, and arrives in the worker as one `bytearray` (what TorchServe handlers receive).
The worker reads frames with blocking calls on its own socket; the frontend reads them with
`read_message(asyncio.StreamReader)` on the event loop and writes with `encode()` buffers.
Failures travel as data (`Failure`: a kind and a message), never as pickled exceptions. In a
frame's meta a failure is the list `[kind, message, detail]`, or `[kind, message, detail,
status]` when the handler chose the HTTP status itself (TorchServe's `PredictionException`);
readers accept both. Anything malformed (a bad prefix, meta that is not the message's shape,
lengths that do not add up, an unknown failure kind or spec field) is a `ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tsctl.ipc.messages import (
    Assign,
    Batch,
    Chunk,
    CustomMetric,
    Describe,
    Described,
    Failure,
    FailureKind,
    Hello,
    InitFailed,
    Kind,
    Message,
    Part,
    Result,
    Stop,
    WireRequest,
    WireResponse,
    WorkerSpec,
)

if TYPE_CHECKING:
    import asyncio

MAGIC = b"TW"
VERSION = 1
PREFIX = struct.Struct("!2sBBII")
#: a frame's meta is small by construction; anything larger is a protocol error
MAX_META = 16 << 20
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerSpec))


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _failure_meta(failure: Failure | None) -> list[str | int] | None:
    if failure is None:
        return None
    meta: list[str | int] = [failure.kind.value, failure.message, failure.detail]
    if failure.status:
        meta.append(failure.status)
    return meta


def _failure(raw: Any) -> Failure | None:
    if raw is None:
        return None
    status = int(raw[3]) if len(raw) > 3 else 0
    return Failure(FailureKind(raw[0]), str(raw[1]), str(raw[2]), status)


def _spec(raw: Any) -> WorkerSpec:
    unknown = set(raw) - _SPEC_FIELDS
    if unknown:
        raise ProtocolError(f"unknown worker spec fields {sorted(unknown)}")
    return WorkerSpec(**raw)


def encode(message: Message) -> list[bytes | bytearray | memoryview]:
    """The frame for `message`, as buffers to write in order (bodies are not copied)."""
    segments: list[bytes | bytearray | memoryview] = []
    meta: dict[str, Any]
    if isinstance(message, Batch):
        kind = Kind.BATCH
        reqs = []
        for request in message.requests:
            parts = []
            for part in request.parts:
                parts.append([part.name, part.content_type])
                segments.append(part.data)
            reqs.append([request.request_id, parts, [list(h) for h in request.headers]])
        meta = {"id": message.batch_id, "reqs": reqs}
    elif isinstance(message, (Result, Chunk)):
        kind = Kind.RESULT if isinstance(message, Result) else Kind.CHUNK
        res = []
        for response in message.responses:
            segments.append(response.body)
            res.append(
                [
                    response.status,
                    response.content_type,
                    [list(h) for h in response.headers],
                    response.reason,
                    _failure_meta(response.failure),
                ]
            )
        meta = {"id": message.batch_id, "res": res}
        if isinstance(message, Result):
            meta["fail"] = _failure_meta(message.failure)
            meta["ms"] = message.handler_ms
            meta["metrics"] = [
                [m.name, m.unit, m.kind, m.value, m.dimensions] for m in message.metrics
            ]
    elif isinstance(message, Hello):
        kind, meta = Kind.HELLO, {"pid": message.pid}
    elif isinstance(message, Assign):
        kind, meta = Kind.ASSIGN, {"spec": dataclasses.asdict(message.spec)}
    elif isinstance(message, InitFailed):
        kind, meta = Kind.INIT_FAILED, {"fail": _failure_meta(message.failure)}
    elif isinstance(message, Describe):
        kind, meta = Kind.DESCRIBE, {}
    elif isinstance(message, Described):
        kind, meta = Kind.DESCRIBED, {"fail": _failure_meta(message.failure)}
        segments.append(message.body)
    else:
        kind, meta = Kind.STOP, {"reason": message.reason}
    lens = [memoryview(s).nbytes for s in segments]
    meta["lens"] = lens
    encoded = json.dumps(meta, separators=(",", ":")).encode()
    prefix = PREFIX.pack(MAGIC, VERSION, kind, len(encoded), sum(lens))
    return [prefix, encoded, *segments]


def decode(kind: int, meta: dict[str, Any], segments: Sequence[bytes | bytearray]) -> Message:
    """Build the typed message of a frame; `ProtocolError` if its fields are malformed."""
    try:
        if kind == Kind.BATCH:
            requests = []
            bodies = iter(segments)
            for request_id, parts, headers in meta["reqs"]:
                built = [Part(name, ctype, next(bodies)) for name, ctype in parts]
                requests.append(WireRequest(request_id, built, [(k, v) for k, v in headers]))
            if next(bodies, None) is not None:
                raise ValueError("segments that no request part uses")
            return Batch(int(meta["id"]), requests)
        if kind in (Kind.RESULT, Kind.CHUNK):
            responses = [
                WireResponse(status, ctype, body, [(k, v) for k, v in headers], reason, _failure(f))
                for (status, ctype, headers, reason, f), body in zip(
                    meta["res"], segments, strict=True
                )
            ]
            if kind == Kind.CHUNK:
                return Chunk(int(meta["id"]), responses)
            metrics = [
                CustomMetric(
                    str(n), str(u), str(k), float(v), {str(a): str(b) for a, b in d.items()}
                )
                for n, u, k, v, d in meta.get("metrics", ())
            ]
            return Result(
                int(meta["id"]), responses, _failure(meta["fail"]), float(meta["ms"]), metrics
            )
        if kind == Kind.HELLO:
            return Hello(int(meta["pid"]))
        if kind == Kind.ASSIGN:
            return Assign(_spec(meta["spec"]))
        if kind == Kind.INIT_FAILED:
            failure = _failure(meta["fail"])
            if failure is None:
                raise ProtocolError("INIT_FAILED without a failure")
            return InitFailed(failure)
        if kind == Kind.STOP:
            return Stop(str(meta.get("reason", "")))
        if kind == Kind.DESCRIBE:
            return Describe()
        if kind == Kind.DESCRIBED:
            if len(segments) != 1:
                raise ValueError("a DESCRIBED frame carries exactly one segment")
            return Described(segments[0], _failure(meta["fail"]))
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError, IndexError) as exc:
        raise ProtocolError(f"malformed frame of kind {kind}: {exc!r}") from None
    raise ProtocolError(f"unknown frame kind {kind}")


def _parse_prefix(prefix: bytes) -> tuple[int, int, int]:
    magic, version, kind, meta_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame prefix {prefix!r}")
    if meta_len > MAX_META:
        raise ProtocolError(f"frame meta of {meta_len} bytes is too large")
    return kind, meta_len, payload_len


def _parse_meta(raw: bytes, payload_len: int) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
        lens = meta["lens"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"bad frame meta: {exc!r}") from None
    if not isinstance(lens, list) or not all(type(n) is int for n in lens):
        raise ProtocolError("frame meta `lens` is not a list of integers")
    if sum(lens) != payload_len or any(n < 0 for n in lens):
        raise ProtocolError("frame segment lengths do not add up to its payload")
    return dict(meta)


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Read one message on the event loop; raises `asyncio.IncompleteReadError` at EOF."""
    kind, meta_len, payload_len = _parse_prefix(await reader.readexactly(PREFIX.size))
    meta = _parse_meta(await reader.readexactly(meta_len), payload_len)
    payload = memoryview(await reader.readexactly(payload_len) if payload_len else b"")
    segments: list[bytes] = []
    offset = 0
    for n in meta["lens"]:
        segments.append(payload[offset : offset + n].tobytes())
        offset += n
    return decode(kind, meta, segments)


class _Readable(Protocol):
    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


def _read_exactly(stream: _Readable, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            raise EOFError("the peer closed the connection")
        got += n
    return buffer


def recv_message(stream: _Readable) -> Message:
    """Read one message with blocking calls (the worker side); `EOFError` at end of stream."""
    head = _read_exactly(stream, PREFIX.size)
    kind, meta_len, payload_len = _parse_prefix(bytes(head))
    meta = _parse_meta(bytes(_read_exactly(stream, meta_len)), payload_len)
    segments = [_read_exactly(stream, n) for n in meta["lens"]]
    return decode(kind, meta, segments)


def send_message(sock: socket.socket, message: Message) -> None:
    """Write one message with blocking calls (the worker side), without joining bodies."""
    buffers = [memoryview(b).cast("B") for b in encode(message)]
    if len(buffers) > 512:  # stay well under the kernel's IOV_MAX
        buffers = [memoryview(b"".join(buffers))]
    while buffers:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= buffers[0].nbytes:
            sent -= buffers[0].nbytes
            buffers.pop(0)
        if buffers and sent:
            buffers[0] = buffers[0][sent:]
