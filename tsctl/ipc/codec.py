"""The frontend ↔ worker frame codec: `tsctl.ipc.messages` in length-prefixed frames.

One module owns the format; both sides use it. A frame is::

    prefix   12 bytes, network order: magic b"TW" | version u8 | kind u8 | meta_len u32
             | payload_len u32
    meta     meta_len bytes of UTF-8 JSON: the message's small structured fields, plus
             "lens", the byte lengths of the payload's segments in order
    payload  payload_len bytes: the segments (request and response bodies) back to back, raw

The one exception to a JSON meta is `PLAIN_RESULT`, the result of a batch whose every
answer is a status, a content type and a body (no headers, reason or failure) and which
carries no handler metrics, the usual case, sent most often: its meta is binary, little
endian (`_PLAIN_HEAD`: batch id u64, handler ms f64, answers u32; then `_PLAIN_ANSWER` per
answer: status u16, content type length u16, body length u32, and the content type's UTF-8
bytes), read without JSON into the same `Result` a `RESULT` frame gives.

Bodies are never base64'd or re-encoded: a request body goes from the HTTP parser into the
socket as is, and arrives in the worker as one `bytearray` (what TorchServe handlers receive).
The worker reads frames with blocking calls on its own socket; the frontend feeds what its
socket receives to a `FrameReader` on the event loop and writes with `encode()` buffers.
Failures travel as data (`Failure`: a kind and a message), never as pickled exceptions. In a
frame's meta a failure is the list `[kind, message, detail]`, or `[kind, message, detail,
status]` when the handler chose the HTTP status itself (TorchServe's `PredictionException`);
readers accept both. Anything malformed (a bad prefix, meta that is not the message's shape,
lengths that do not add up, an unknown failure kind or spec field) is a `ProtocolError`.

Bounds. A frame's meta is at most `MAX_META` bytes: the frontend encodes each request's entry
in a batch's meta once, before the request is queued (`request_entry`; a batch of them is
joined, not re-encoded: `Batch.entries`), and checks what it adds (`entry_size`); `encode`
refuses a frame over the limit (`FrameTooLarge`) before anything is written. The frontend's
reader takes the largest body it accepts (`max_body`): a longer response body is skipped as it
is read, never held, and arrives as a `RESPONSE_TOO_LARGE` failure of its own response. The
worker's reader may `recover`: a frame whose prefix is sound but whose contents are not is read
to its end and reported as `FrameRejected`, so the stream stays in step and the worker answers
that frame with a failure instead of exiting.
"""

from __future__ import annotations

import dataclasses
import json
import json.scanner
import socket
import struct
from collections.abc import Sequence
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Protocol

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

MAGIC = b"TW"
VERSION = 1
PREFIX = struct.Struct("!2sBBII")
#: a frame's meta is small by construction; anything larger is a protocol error
MAX_META = 16 << 20
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerSpec))
#: the meta's encoder, made once (`json.dumps` with options makes one per call)
_JSON = json.JSONEncoder(separators=(",", ":"))
#: the C encoder `_JSON.encode` makes on every call, made once: a request's meta entry is
#: encoded with it (lists of strings: no circular check needed); `_JSON` where there is none
_ENTRY = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _JSON.default, encode_basestring_ascii, None, ":", ",", False, False, True
    )
)
#: the JSON scanner `json.loads` ends in: (value, end) of the text from an index
_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
#: a `PLAIN_RESULT` frame's meta: its head, then each answer's fields and content type
_PLAIN_HEAD = struct.Struct("<QdI")
_PLAIN_ANSWER = struct.Struct("<HHI")
_U16 = 1 << 16


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class FrameRejected(ProtocolError):
    """A frame of `kind` whose contents are invalid, read to its end: the stream is still in
    step, the next frame can be read."""

    def __init__(self, kind: int, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class FrameTooLarge(ValueError):
    """A message whose meta would exceed `MAX_META`: refused by `encode`, nothing written."""


#: what a batch frame's meta holds besides its requests (`{"id":N,"reqs":[],"lens":[]}`)
BATCH_META_OVERHEAD = 64
_SKIP = 1 << 16  # bytes read at a time when a body is skipped


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
    declared = raw.get("declared_metrics")
    if declared is not None:  # JSON has lists where the spec has tuples
        raw = {**raw, "declared_metrics": tuple((n, u, tuple(d), k) for n, u, d, k in declared)}
    return WorkerSpec(**raw)


def _request_meta(request: WireRequest) -> list[Any]:
    headers = request.headers  # JSON writes a list or tuple of pairs as they are
    return [
        request.request_id,
        [(part.name, part.content_type) for part in request.parts],
        headers if type(headers) in (list, tuple) else list(headers),
    ]


def request_entry(request: WireRequest) -> bytes:
    """`request`'s entry in a batch frame's meta (its id, part names and types, headers), as
    `encode` writes it: a sender that queues requests encodes each once, as it is queued,
    and passes the entries in `Batch.entries`."""
    if _ENTRY is None:
        return _JSON.encode(_request_meta(request)).encode()
    return "".join(_ENTRY(_request_meta(request), 0)).encode()


def entry_size(entry: bytes, parts: Sequence[Part]) -> int:
    """The bytes a request with this `entry` adds to a batch frame's meta, exactly: the entry
    and the lengths of its bodies in "lens", with their commas."""
    size = len(entry) + 1
    for part in parts:
        size += len(str(memoryview(part.data).nbytes)) + 1
    return size


def request_meta_size(request: WireRequest) -> int:
    """The bytes `request` adds to a batch frame's meta, at most (its entry in "reqs", the
    lengths of its bodies in "lens", the commas). See `request_meta_bound`."""
    return request_meta_bound(request.request_id, request.parts, request.headers)


def request_meta_bound(
    request_id: str, parts: Sequence[Part], headers: Sequence[tuple[str, str]]
) -> int:
    """`request_meta_size` of a request not built yet (it runs once per request, so it
    builds nothing). A cheap bound first, from lengths alone: JSON escapes a character in at
    most 12 bytes (a surrogate pair) and a body's length takes at most 20 digits; the exact
    size only when that bound is large, so an ordinary request is not encoded twice."""
    strings = len(request_id)
    for part in parts:
        strings += len(part.name) + len(part.content_type)
    for name, value in headers:
        strings += len(name) + len(value)
    count = len(parts) + len(headers) + 1
    bound = 12 * strings + 16 * count + 21 * len(parts) + 8
    if bound <= 1 << 16:
        return bound
    lens = sum(len(str(memoryview(p.data).nbytes)) + 1 for p in parts)
    meta = _request_meta(WireRequest(request_id, parts, headers))
    return len(_JSON.encode(meta)) + 1 + lens


def request_meta_budget(batch_size: int) -> int:
    """The most meta one request may add to a batch frame of up to `batch_size` requests, so
    that a full batch stays within `MAX_META`."""
    return (MAX_META - BATCH_META_OVERHEAD) // max(1, batch_size)


def encode(message: Message) -> list[bytes | bytearray | memoryview]:
    """The frame for `message`, as buffers to write in order (bodies are not copied).
    `FrameTooLarge` when its meta would exceed `MAX_META`."""
    segments: list[bytes | bytearray | memoryview] = []
    meta: dict[str, Any]
    if isinstance(message, Batch):
        if message.entries:  # each request's meta encoded already: joined, as JSON writes it
            return _encode_batch(message)
        kind = Kind.BATCH
        reqs = []
        for request in message.requests:
            segments.extend(part.data for part in request.parts)
            reqs.append(_request_meta(request))
        meta = {"id": message.batch_id, "reqs": reqs}
    elif isinstance(message, (Result, Chunk)):
        if isinstance(message, Result) and _plain(message):
            return _encode_plain_result(message)
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
    encoded = _JSON.encode(meta).encode()
    if len(encoded) > MAX_META:
        raise FrameTooLarge(
            f"the frame's meta of {len(encoded)} bytes exceeds the limit of {MAX_META}"
        )
    prefix = PREFIX.pack(MAGIC, VERSION, kind, len(encoded), sum(lens))
    return [prefix, encoded, *segments]


def _plain(result: Result) -> bool:
    """Whether `result` goes as a `PLAIN_RESULT`: every answer a status, a content type and a
    body that its binary meta can hold, and nothing else."""
    if (
        result.failure is not None
        or result.metrics
        or type(result.batch_id) is not int
        or not 0 <= result.batch_id < 1 << 64
    ):
        return False
    for response in result.responses:
        if (
            response.headers
            or response.reason
            or response.failure is not None
            or type(response.status) is not int
            or not 0 <= response.status < _U16
            or len(response.content_type) >= _U16 // 4  # UTF-8: at most 4 bytes a character
        ):
            return False
    return True


def _encode_plain_result(result: Result) -> list[bytes | bytearray | memoryview]:
    segments: list[bytes | bytearray | memoryview] = []
    meta = [_PLAIN_HEAD.pack(result.batch_id, result.handler_ms, len(result.responses))]
    for response in result.responses:
        ctype = response.content_type.encode()
        size = memoryview(response.body).nbytes
        meta.append(_PLAIN_ANSWER.pack(response.status, len(ctype), size))
        meta.append(ctype)
        segments.append(response.body)
    encoded = b"".join(meta)
    if len(encoded) > MAX_META:
        raise FrameTooLarge(
            f"the frame's meta of {len(encoded)} bytes exceeds the limit of {MAX_META}"
        )
    total = sum(memoryview(s).nbytes for s in segments)
    return [PREFIX.pack(MAGIC, VERSION, Kind.PLAIN_RESULT, len(encoded), total), encoded, *segments]


def _plain_meta(raw: bytes | bytearray | memoryview, payload_len: int) -> dict[str, Any]:
    """A `PLAIN_RESULT` frame's meta, as the dict `decode` reads: "id", "ms", "res" (each
    answer's status and content type) and "lens"."""
    try:
        batch_id, ms, count = _PLAIN_HEAD.unpack_from(raw, 0)
        at = _PLAIN_HEAD.size
        res, lens = [], []
        for _ in range(count):
            status, ctype_len, size = _PLAIN_ANSWER.unpack_from(raw, at)
            at += _PLAIN_ANSWER.size + ctype_len
            if at > len(raw):
                raise ValueError("a content type cut short")
            ctype = str(raw[at - ctype_len : at], "utf-8")
            res.append((status, ctype))
            lens.append(size)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"bad plain result meta: {exc!r}") from None
    if at != len(raw):
        raise ProtocolError(f"bad plain result meta: extra data at {at}")
    if sum(lens) != payload_len:
        raise ProtocolError("frame segment lengths do not add up to its payload")
    return {"id": batch_id, "ms": ms, "res": res, "lens": lens}


def _read_meta(kind: int, raw: bytes | bytearray | memoryview, payload_len: int) -> dict[str, Any]:
    """A frame's meta (`_parse_meta`, or `_plain_meta` for a `PLAIN_RESULT`)."""
    if kind == Kind.PLAIN_RESULT:
        return _plain_meta(raw, payload_len)
    return _parse_meta(raw, payload_len)


def _encode_batch(batch: Batch) -> list[bytes | bytearray | memoryview]:
    """`encode` of a batch whose requests' entries are encoded (`Batch.entries`): the bytes
    the dict would encode to, `{"id":N,"reqs":[...],"lens":[...]}`, joined from them."""
    if len(batch.entries) != len(batch.requests):
        raise ValueError("a batch needs one entry per request")
    segments: list[bytes | bytearray | memoryview] = [
        part.data for request in batch.requests for part in request.parts
    ]
    lens = [memoryview(s).nbytes for s in segments]
    encoded = b'{"id":%d,"reqs":[%b],"lens":[%b]}' % (
        batch.batch_id,
        b",".join(batch.entries),
        ",".join(map(str, lens)).encode(),
    )
    if len(encoded) > MAX_META:
        raise FrameTooLarge(
            f"the frame's meta of {len(encoded)} bytes exceeds the limit of {MAX_META}"
        )
    prefix = PREFIX.pack(MAGIC, VERSION, Kind.BATCH, len(encoded), sum(lens))
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
        if kind == Kind.PLAIN_RESULT:
            responses = [
                WireResponse(status, ctype, body, [], "", None)
                for (status, ctype), body in zip(meta["res"], segments, strict=True)
            ]
            return Result(meta["id"], responses, None, meta["ms"], [])
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
    except (
        KeyError,
        TypeError,
        ValueError,
        OverflowError,
        StopIteration,
        AttributeError,
        IndexError,
    ) as exc:
        raise ProtocolError(f"malformed frame of kind {kind}: {exc!r}") from None
    raise ProtocolError(f"unknown frame kind {kind}")


def _unpack_prefix(prefix: bytes) -> tuple[int, int, int]:
    """(kind, meta_len, payload_len); a bad magic or version is a `ProtocolError`: after
    one, nothing tells where the next frame starts."""
    magic, version, kind, meta_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame prefix {prefix!r}")
    return kind, meta_len, payload_len


def _meta_too_large(meta_len: int) -> str:
    return f"frame meta of {meta_len} bytes is too large (the limit is {MAX_META})"


def _parse_prefix(prefix: bytes) -> tuple[int, int, int]:
    kind, meta_len, payload_len = _unpack_prefix(prefix)
    if meta_len > MAX_META:
        raise ProtocolError(_meta_too_large(meta_len))
    return kind, meta_len, payload_len


def _parse_meta(raw: bytes | bytearray | memoryview, payload_len: int) -> dict[str, Any]:
    """A frame's meta: a JSON object with "lens", the lengths of its segments, which add up
    to `payload_len`. Read with the JSON scanner itself (what `json.loads` calls after two
    layers of Python), so the whole text must be the one object."""
    meta: dict[str, Any]
    try:
        text = str(raw, "utf-8")
        meta, end = _SCAN(text, 0)
        if end != len(text):
            raise ValueError(f"extra data at {end}")
        lens = meta["lens"]  # a TypeError unless an object: any other JSON value is refused
    except (ValueError, KeyError, TypeError, RecursionError, StopIteration) as exc:
        raise ProtocolError(f"bad frame meta: {exc!r}") from None
    if type(lens) is not list or not all(type(n) is int for n in lens):
        raise ProtocolError("frame meta `lens` is not a list of integers")
    if sum(lens) != payload_len or any(n < 0 for n in lens):
        raise ProtocolError("frame segment lengths do not add up to its payload")
    return meta


def _too_large(kind: int, message: Message, skipped: dict[int, int], limit: int) -> Message:
    """`message` with each skipped body's response (by segment index) a failure."""

    def failure(size: int) -> Failure:
        text = f"the response of {size} bytes exceeds max_response_size ({limit})"
        return Failure(FailureKind.RESPONSE_TOO_LARGE, text)

    if isinstance(message, (Result, Chunk)):
        responses = [
            dataclasses.replace(r, body=b"", failure=failure(skipped[i])) if i in skipped else r
            for i, r in enumerate(message.responses)
        ]
        return dataclasses.replace(message, responses=responses)
    if isinstance(message, Described):
        return Described(failure=failure(skipped[0]))
    raise ProtocolError(f"a frame of kind {kind} carries a body over the limit of {limit} bytes")


class FrameReader:
    """The frontend's reader of a worker's frames: fed bytes as they arrive (from an asyncio
    protocol's `data_received`), it returns each message as soon as its frame is complete, so
    a frame costs no awaits and no read call per segment.

    A body longer than `max_body` is dropped as it arrives, never held: its response (in a
    RESULT, CHUNK or DESCRIBED frame) becomes a `RESPONSE_TOO_LARGE` failure; in any other
    frame it is a `ProtocolError`. A `ProtocolError` (bad prefix, meta or fields) leaves the
    reader unusable: nothing tells where the next frame starts."""

    def __init__(self, max_body: int | None = None) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._kind = -1  # -1: waiting for a prefix
        self._meta_len = 0
        self._payload_len = 0
        self._meta: dict[str, Any] | None = None
        self._lens: list[int] = []
        self._segments: list[bytes] = []
        self._skipped: dict[int, int] = {}
        self._skipping = 0  # bytes of the current too-large body still to drop
        #: the most bytes held at once (a body being skipped is held one `data` at a time)
        self.most_held = 0

    @property
    def idle(self) -> bool:
        """No frame is under way: the peer may stop here without cutting one short."""
        return self._kind < 0 and not self._buffer

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages whose frames `data` completes, in order."""
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        at = 0
        try:
            while True:
                if self._skipping:
                    dropped = min(self._skipping, len(buffer) - at)
                    at += dropped
                    self._skipping -= dropped
                    if self._skipping:
                        break
                    self._next_segment(b"")
                    continue
                if self._kind < 0:
                    if len(buffer) - at < PREFIX.size:
                        break
                    prefix = bytes(buffer[at : at + PREFIX.size])
                    kind, meta_len, payload_len = _parse_prefix(prefix)
                    at += PREFIX.size
                    if len(buffer) - at >= meta_len + payload_len and (
                        self.max_body is None or payload_len <= self.max_body
                    ):  # the whole frame is here (the usual case): read in one step
                        meta = _read_meta(kind, buffer[at : at + meta_len], payload_len)
                        at += meta_len
                        segments = []
                        for size in meta["lens"]:
                            segments.append(bytes(buffer[at : at + size]))
                            at += size
                        messages.append(decode(kind, meta, segments))
                        continue
                    self._kind, self._meta_len, self._payload_len = kind, meta_len, payload_len
                if self._meta is None:
                    if len(buffer) - at < self._meta_len:
                        break
                    raw = buffer[at : at + self._meta_len]
                    self._meta = _read_meta(self._kind, raw, self._payload_len)
                    self._lens = list(self._meta["lens"])
                    at += self._meta_len
                if len(self._segments) == len(self._lens):
                    messages.append(self._finish())
                    continue
                size = self._lens[len(self._segments)]
                if self.max_body is not None and size > self.max_body:
                    self._skipping = size
                    continue
                if len(buffer) - at < size:
                    break
                self._next_segment(bytes(buffer[at : at + size]) if size else b"")
                at += size
        finally:
            self.most_held = max(self.most_held, len(buffer))
            del buffer[:at]
        return messages

    def _next_segment(self, data: bytes) -> None:
        """The current segment is read (`data`), or was dropped (`self._skipping` set it)."""
        index = len(self._segments)
        if self.max_body is not None and self._lens[index] > self.max_body:
            self._skipped[index] = self._lens[index]
        self._segments.append(data)

    def _finish(self) -> Message:
        assert self._meta is not None
        kind, meta, segments, skipped = self._kind, self._meta, self._segments, self._skipped
        self._kind, self._meta, self._lens, self._segments, self._skipped = -1, None, [], [], {}
        message = decode(kind, meta, segments)
        if skipped:
            assert self.max_body is not None
            return _too_large(kind, message, skipped, self.max_body)
        return message


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


def _discard(stream: _Readable, size: int) -> None:
    buffer = memoryview(bytearray(min(size, _SKIP)))
    while size:
        n = stream.readinto(buffer[: min(size, _SKIP)])
        if not n:
            raise EOFError("the peer closed the connection")
        size -= n


def recv_message(stream: _Readable, recover: bool = False) -> Message:
    """Read one message with blocking calls (the worker side); `EOFError` at end of stream.

    With `recover`, a frame with a sound prefix but invalid contents (meta over `MAX_META`,
    meta or fields malformed) is read to its end and raised as `FrameRejected`: the next
    frame can be read. Without it, such a frame is a `ProtocolError` and is not read on."""
    kind, meta_len, payload_len = _unpack_prefix(bytes(_read_exactly(stream, PREFIX.size)))
    if meta_len > MAX_META:
        if not recover:
            raise ProtocolError(_meta_too_large(meta_len))
        _discard(stream, meta_len + payload_len)
        raise FrameRejected(kind, _meta_too_large(meta_len))
    try:
        meta = _read_meta(kind, bytes(_read_exactly(stream, meta_len)), payload_len)
    except ProtocolError as exc:
        if not recover:
            raise
        _discard(stream, payload_len)
        raise FrameRejected(kind, str(exc)) from None
    segments = [_read_exactly(stream, n) for n in meta["lens"]]
    try:
        return decode(kind, meta, segments)
    except ProtocolError as exc:
        if not recover:
            raise
        raise FrameRejected(kind, str(exc)) from None


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
