"""How a KServe v1 or Open Inference Protocol (v2) request travels to a worker, and back.

The daemon never parses tensor data: an API adapter wraps what the client sent in one `Part`
whose media type says which protocol it came from, and the worker (which has torch) turns it
into the handler's inputs and the handler's answers into the protocol's reply. This module is
the contract both sides share; it imports nothing but the standard library.

**OIP v2** (REST, REST with the binary tensor data extension, gRPC): the part's data is an
inference request *in the binary extension's layout*: a JSON header (the protocol's request
object: `id`, `parameters`, `inputs`, `outputs`) followed by the binary blobs its inputs name
with `parameters.binary_data_size`, in input order. Its media type carries the header's length::

    application/vnd.tsctl.oip-v2; header-length=1234

A plain JSON request is the same thing with no blobs (`header-length` = the body's length), so
the REST adapter forwards any body as it came. The gRPC adapter builds the header from the
protobuf message (raw contents become blobs; `binary_data_output` set in `parameters`).

The worker answers with the protocol's response object (`model_name`, `model_version`, `id`,
`parameters`, `outputs`): all-JSON as `application/json`; when any output is binary as
`application/octet-stream`, the JSON header followed by the blobs, with the header's length in
the response header `Inference-Header-Content-Length` (the REST extension's wire form: the
REST adapter sends it as is, the gRPC adapter slices the blobs into `raw_output_contents`).
A request the worker cannot read fails alone as `FailureKind.INVALID_INPUT`, whose message the
adapter answers as `{"error": message}` (400) or `INVALID_ARGUMENT`.

**KServe v1**: the part's data is the client's JSON body (`{"instances": [...]}`), media type
`application/vnd.tsctl.kserve-v1+json`; the worker gives it TorchServe's `kserve` envelope
semantics (each instance a row of the handler's batch) and answers `{"predictions": [...]}`
(or `{"explanations": [...]}` when the request carries the `explain: True` header).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

OIP_MEDIA = "application/vnd.tsctl.oip-v2"
KSERVE_V1_MEDIA = "application/vnd.tsctl.kserve-v1+json"
#: the binary extension's header (request and response) giving the JSON header's length
HEADER_LENGTH = "Inference-Header-Content-Length"
#: the part name an OIP or KServe v1 request travels under
PART_NAME = "body"

#: every OIP datatype and its element size in bytes; BYTES elements are each a 4-byte
#: little-endian length followed by that many bytes (the binary extension's layout)
DATATYPES: Mapping[str, int | None] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
    "BYTES": None,
}


class OipFormatError(ValueError):
    """A request or response that does not follow this contract; the message names why."""


def media_type(header_length: int) -> str:
    """The media type of an OIP part whose JSON header is `header_length` bytes long."""
    return f"{OIP_MEDIA}; header-length={header_length}"


def header_length(content_type: str, total: int) -> int | None:
    """The JSON header's length an OIP part's media type gives, checked against the part's
    `total` length; None when `content_type` is not an OIP part's."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != OIP_MEDIA:
        return None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "header-length":
            try:
                length = int(value.strip())
            except ValueError:
                break
            if 0 < length <= total:
                return length
            raise OipFormatError(f"header length {length} does not fit a body of {total} bytes")
    raise OipFormatError("an OIP part without a valid header-length")


def pack(
    header: Mapping[str, Any], blobs: Iterable[bytes | bytearray | memoryview] = ()
) -> tuple[str, bytes]:
    """`(media type, data)` of an OIP part: `header` as compact JSON, then `blobs`."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return media_type(len(head)), b"".join((head, *blobs))


def element_count(shape: Iterable[int]) -> int:
    """How many elements a tensor of `shape` holds (1 for a scalar's empty shape)."""
    count = 1
    for size in shape:
        count *= size
    return count
