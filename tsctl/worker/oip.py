"""Open Inference Protocol (v2) requests in the worker: an OIP part → the handler's inputs, and
the handler's answer → the protocol's response (see `tsctl.ipc.oip` for the part's layout).

`read` checks the JSON header and finds each input's data: a JSON `data` list, or a blob of the
binary tensor data extension (`parameters.binary_data_size`, in input order after the header).
`inputs` turns them into what a handler without an envelope receives, one `OipInputs` row per
request: a dict `{input name: torch.Tensor}` (a `BYTES` input: nested lists of `bytes`, shaped
like the tensor), with the request's `id`, `parameters` and requested output names as
attributes. A blob becomes a tensor without a copy (`torch.frombuffer` on the frame's buffer)
unless its address is not aligned to its element size, or the machine is big-endian; `BOOL`
blobs are always copied (a byte other than 0 or 1 is no valid torch bool). `envelope_body` gives
a `kservev2`-envelope handler the request as TorchServe would: all data as JSON lists.

`respond` encodes an answer: a tensor is one output (named after the first output that
model-config.yaml declares, else `output0`), a mapping of names to values several outputs; a
value that is no tensor goes through `torch.as_tensor`, except text and bytes (alone or in
nested lists), which become `BYTES`. Each output is JSON `data`, or a binary blob when the
request asks for it (`parameters.binary_data_output`, or the requested output's own
`parameters.binary_data`, which wins). Requested `outputs` select and order the outputs.

Whatever the client got wrong raises `OipInputError`, which fails that request alone. Worker
process only; torch is imported on first use.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tsctl.ipc.oip import DATATYPES, HEADER_LENGTH, OipFormatError, element_count, header_length

if TYPE_CHECKING:
    import torch

#: the output name of a bare tensor answer when model-config.yaml declares no outputs
DEFAULT_OUTPUT = "output0"
_TORCH_NAMES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
_DATATYPE_OF = {name: datatype for datatype, name in _TORCH_NAMES.items()}


class OipInputError(ValueError):
    """This request cannot be read, or cannot be answered as it asks: the client's mistake."""


class OipInputs(dict[str, Any]):
    """The inputs of one OIP request as a handler receives them: `{name: tensor}`, plus
    `id` (the request's id or None), `parameters` (the request's `parameters` object) and
    `outputs` (the output names the request asked for, or None)."""

    id: str | None
    parameters: dict[str, Any]
    outputs: list[str] | None


@dataclass
class Tensor:
    """One input as the request gave it: JSON `data`, or a blob at `offset` of `size` bytes."""

    name: str
    datatype: str
    shape: list[int]
    header: dict[str, Any]
    data: Any = None
    offset: int = -1
    size: int = 0


@dataclass
class OipRequest:
    """A read OIP request: its header, its inputs, and the buffer holding its blobs."""

    header: dict[str, Any]
    tensors: list[Tensor]
    buffer: bytes | bytearray | memoryview
    #: requested outputs, in order: (name, binary or None when the request-level rule applies)
    requested: list[tuple[str, bool | None]] | None
    binary_output: bool

    @property
    def id(self) -> str | None:
        value = self.header.get("id")
        return value if isinstance(value, str) else None

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.header.get("parameters")
        return params if isinstance(params, dict) else {}


def read(content_type: str, data: bytes | bytearray | memoryview) -> OipRequest:
    """Check an OIP part and locate its inputs' data; `OipInputError` names what is wrong."""
    view = memoryview(data)
    try:
        length = header_length(content_type, view.nbytes)
    except OipFormatError as exc:
        raise OipInputError(str(exc)) from None
    assert length is not None, "read() is only called on OIP parts"
    try:
        header = json.loads(bytes(view[:length]))
    except (ValueError, RecursionError) as exc:
        raise OipInputError(f"the request's JSON header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise OipInputError("the request's JSON header must be an object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OipInputError('the request has no "inputs" list')
    params = header.get("parameters", {})
    if not isinstance(params, dict):
        raise OipInputError('"parameters" must be an object')
    if "id" in header and not isinstance(header["id"], str):
        raise OipInputError('"id" must be a string')
    offset = length
    tensors: list[Tensor] = []
    for pos, spec in enumerate(inputs):
        tensor = _input(pos, spec)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise OipInputError(f"input {tensor.name!r}: binary_data_size must be a size")
            if offset + size > view.nbytes:
                raise OipInputError(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the body's end"
                )
            if "data" in spec:
                raise OipInputError(f"input {tensor.name!r} has both data and binary_data_size")
            tensor.offset, tensor.size = offset, size
            offset += size
        elif "data" not in spec:
            raise OipInputError(f'input {tensor.name!r} has neither "data" nor binary_data_size')
        else:
            tensor.data = spec["data"]
        tensors.append(tensor)
    if offset != view.nbytes:
        raise OipInputError(
            f"the body has {view.nbytes - offset} bytes more than its header and the inputs' "
            "binary_data_size account for"
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise OipInputError("two inputs have the same name")
    return OipRequest(
        header, tensors, data, _requested(header), _flag(params, "binary_data_output")
    )


def _input(pos: int, spec: Any) -> Tensor:
    if not isinstance(spec, dict):
        raise OipInputError(f"input {pos} is not an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise OipInputError(f'input {pos} has no "name"')
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise OipInputError(f"input {name!r}: unknown datatype {datatype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise OipInputError(f'input {name!r}: "shape" must be a list of sizes, not {shape!r}')
    params = spec.get("parameters", {})
    if not isinstance(params, dict):
        raise OipInputError(f'input {name!r}: "parameters" must be an object')
    return Tensor(name, datatype, shape, spec)


def _requested(header: dict[str, Any]) -> list[tuple[str, bool | None]] | None:
    outputs = header.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise OipInputError('"outputs" must be a list')
    requested: list[tuple[str, bool | None]] = []
    for pos, spec in enumerate(outputs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise OipInputError(f'requested output {pos} has no "name"')
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise OipInputError(f'requested output {name!r}: "parameters" must be an object')
        binary = params.get("binary_data")
        requested.append((name, None if binary is None else _flag(params, "binary_data")))
    return requested


def _flag(params: Mapping[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise OipInputError(f"parameter {key} must be true or false")
    return value


# the handler's inputs


def inputs(request: OipRequest) -> OipInputs:
    """The request's inputs as tensors (`BYTES`: nested lists of bytes)."""
    row = OipInputs()
    for tensor in request.tensors:
        row[tensor.name] = _value(request, tensor)
    row.id = request.id
    row.parameters = request.parameters
    row.outputs = None if request.requested is None else [n for n, _ in request.requested]
    return row


def _value(request: OipRequest, tensor: Tensor) -> Any:
    count = element_count(tensor.shape)
    if tensor.datatype == "BYTES":
        if tensor.offset >= 0:
            items = _split_bytes(tensor, request.buffer)
        else:
            items = [_as_bytes(tensor.name, v) for v in _flat(tensor.data)]
        _check_count(tensor, len(items), count)
        return _nest(items, tensor.shape)
    import torch

    dtype = getattr(torch, _TORCH_NAMES[tensor.datatype])
    if tensor.offset < 0:
        values = _flat(tensor.data)
        _check_count(tensor, len(values), count)
        try:
            return torch.tensor(values, dtype=dtype).reshape(tensor.shape)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            message = f"input {tensor.name!r}: data is no {tensor.datatype}: {exc}"
            raise OipInputError(message) from None
    itemsize = DATATYPES[tensor.datatype] or 1
    if tensor.size != count * itemsize:
        raise OipInputError(
            f"input {tensor.name!r}: {tensor.size} bytes of binary data do not hold "
            f"{count} {tensor.datatype} elements (shape {tensor.shape})"
        )
    if count == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    buffer = request.buffer
    if isinstance(buffer, bytes) or memoryview(buffer).readonly:
        buffer = bytearray(buffer)  # torch only shares memory it may write to
    if tensor.datatype == "BOOL":
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=tensor.offset)
        return raw.ne(0).reshape(tensor.shape)
    flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=tensor.offset)
    if flat.data_ptr() % itemsize:
        flat = flat.clone()  # unaligned: the header's length decides where a blob starts
    if sys.byteorder == "big" and itemsize > 1:
        flat = _swapped(flat)
    return flat.reshape(tensor.shape)


def _swapped(flat: torch.Tensor) -> torch.Tensor:
    """A copy of little-endian `flat` in the machine's (big-endian) byte order."""
    import torch

    size = flat.element_size()
    raw = flat.view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return raw.view(flat.dtype).reshape(-1)


def _split_bytes(tensor: Tensor, buffer: bytes | bytearray | memoryview) -> list[bytes]:
    """A `BYTES` blob's elements: each a 4-byte little-endian length, then that many bytes."""
    view = memoryview(buffer)[tensor.offset : tensor.offset + tensor.size]
    items: list[bytes] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise OipInputError(f"input {tensor.name!r}: a BYTES element's length is cut short")
        size = int.from_bytes(view[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(view):
            raise OipInputError(f"input {tensor.name!r}: a BYTES element runs past its data")
        items.append(bytes(view[pos : pos + size]))
        pos += size
    return items


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    raise OipInputError(f"input {name!r}: BYTES data must be strings, not {type(value).__name__}")


def _check_count(tensor: Tensor, got: int, count: int) -> None:
    if got != count:
        raise OipInputError(
            f"input {tensor.name!r}: {got} elements do not fit shape {tensor.shape} "
            f"({count} elements)"
        )


def _flat(data: Any) -> list[Any]:
    """JSON data, flat: the protocol allows nested lists (row-major) as well as a flat one."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    return [leaf for item in data for leaf in _flat(item)]


def _nest(flat: list[Any], shape: Sequence[int]) -> Any:
    """`flat` as nested lists of `shape` (a scalar's empty shape: the element itself)."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def envelope_body(request: OipRequest) -> dict[str, Any]:
    """The request as TorchServe's `kservev2` envelope reads it: every input with a JSON
    `data` list (binary data converted; `BYTES` as UTF-8 text)."""
    converted: list[dict[str, Any]] = []
    for tensor in request.tensors:
        spec = dict(tensor.header)
        if tensor.offset >= 0:
            value = _value(request, tensor)
            if tensor.datatype == "BYTES":
                spec["data"] = [b.decode("utf-8", "replace") for b in _flat(value)]
            else:
                spec["data"] = value.reshape(-1).tolist()
            params = {k: v for k, v in spec.get("parameters", {}).items()}
            params.pop("binary_data_size", None)
            spec["parameters"] = params
        converted.append(spec)
    return {**request.header, "inputs": converted}


# the answer


@dataclass
class Reply:
    """An encoded OIP response: its content type, body and extra headers."""

    content_type: str
    body: bytes
    headers: list[tuple[str, str]]


def respond(
    request: OipRequest,
    answer: Any,
    base: Mapping[str, Any],
    declared: Sequence[str] = (),
) -> Reply:
    """The protocol's response to `request` for the handler's `answer`; `base` holds the
    response's first members (`model_name`, `model_version`, `id`)."""
    produced = _outputs(answer, declared)
    if request.requested is None:
        chosen = [(name, value, request.binary_output) for name, value in produced.items()]
    else:
        chosen = []
        for name, binary in request.requested:
            if name not in produced:
                known = ", ".join(produced) or "none"
                raise OipInputError(f"unknown output {name!r} (the model answered: {known})")
            chosen.append(
                (name, produced[name], request.binary_output if binary is None else binary)
            )
    outputs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    keep: list[Any] = []  # the tensors whose memory the blobs show, alive until joined
    for name, value, binary in chosen:
        datatype, shape, content = _typed(name, value)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = _blob(datatype, content)
            keep.append(content)
            output["parameters"] = {"binary_data_size": memoryview(blob).nbytes}
            blobs.append(blob)
        else:
            output["data"] = _json_data(name, datatype, content)
        outputs.append(output)
    doc = {**base, "outputs": outputs}
    try:
        head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    except ValueError as exc:  # NaN is written as JSON's extension; a cycle cannot occur
        raise OipInputError(f"the response cannot be written as JSON: {exc}") from None
    if not blobs:
        return Reply("application/json", head, [])
    body = b"".join((head, *blobs))
    return Reply("application/octet-stream", body, [(HEADER_LENGTH, str(len(head)))])


def _outputs(answer: Any, declared: Sequence[str]) -> dict[str, Any]:
    if isinstance(answer, Mapping):
        produced = {}
        for name, value in answer.items():
            if not isinstance(name, str):
                raise TypeError(f"output names must be strings, not {type(name).__name__}")
            produced[name] = value
        return produced
    return {declared[0] if declared else DEFAULT_OUTPUT: answer}


def _typed(name: str, value: Any) -> tuple[str, list[int], Any]:
    """(datatype, shape, a contiguous CPU tensor or a flat list of bytes) of one output."""
    import torch

    if not isinstance(value, torch.Tensor):
        texts = _text_shape(value)
        if texts is not None:
            shape, flat = texts
            return "BYTES", shape, flat
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"output {name!r} cannot be a tensor: {exc}") from None
    tensor = value.detach().cpu().contiguous()
    datatype = _DATATYPE_OF.get(str(tensor.dtype).removeprefix("torch."))
    if datatype is None:
        raise TypeError(f"output {name!r}: dtype {tensor.dtype} has no OIP datatype")
    return datatype, list(tensor.shape), tensor


def _text_shape(value: Any) -> tuple[list[int], list[bytes]] | None:
    """(shape, flat elements) of text or bytes, alone or in nested lists; None otherwise."""
    if isinstance(value, (str, bytes, bytearray)):
        return [1], [_encoded(value)]
    if not isinstance(value, (list, tuple)):
        return None
    shape: list[int] = []
    level: Any = value
    while isinstance(level, (list, tuple)):
        shape.append(len(level))
        if not level:
            return None
        level = level[0]
    if not isinstance(level, (str, bytes, bytearray)):
        return None
    flat = _flat(_lists(value))
    if len(flat) != element_count(shape) or not all(
        isinstance(v, (str, bytes, bytearray)) for v in flat
    ):
        raise TypeError("a BYTES output must be text or bytes in lists of equal lengths")
    return shape, [_encoded(v) for v in flat]


def _lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _encoded(value: str | bytes | bytearray) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _blob(datatype: str, content: Any) -> Any:
    """An output's binary data: the tensor's memory as it is (little-endian machines), or the
    BYTES elements each after its 4-byte length."""
    if datatype == "BYTES":
        return b"".join(b for item in content for b in (len(item).to_bytes(4, "little"), item))
    size = content.numel() * content.element_size()
    if sys.byteorder == "big" and content.element_size() > 1:
        content = _swapped(content.reshape(-1))
    if size == 0:
        return b""
    return (ctypes.c_char * size).from_address(content.data_ptr())


def _json_data(name: str, datatype: str, content: Any) -> list[Any]:
    if datatype != "BYTES":
        data: list[Any] = content.reshape(-1).tolist()
        return data
    try:
        return [item.decode("utf-8") for item in content]
    except UnicodeDecodeError:
        raise OipInputError(
            f"output {name!r} holds bytes that are not UTF-8 text: request it with "
            'parameters {"binary_data": true}'
        ) from None


def from_envelope(answer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `kservev2` envelope's answer as (response base, {output name: value}): each output's
    JSON `data` as a tensor of its datatype and shape (`BYTES`: the list of its elements)."""
    import torch

    base = {k: v for k, v in answer.items() if k != "outputs"}
    values: dict[str, Any] = {}
    for output in answer.get("outputs") or []:
        name, datatype, data = output["name"], output["datatype"], output["data"]
        shape = output.get("shape") or [len(data)]
        if datatype == "BYTES":
            items = [_encoded(v) if isinstance(v, (str, bytes)) else str(v).encode() for v in data]
            values[name] = _nest(_flat(items), shape)
        else:
            dtype = getattr(torch, _TORCH_NAMES[datatype])
            values[name] = torch.tensor(_flat(data), dtype=dtype).reshape(shape)
    return base, values
