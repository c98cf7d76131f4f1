"""`ts.torch_handler.request_envelope.kservev2.KServev2Envelope` (`service_envelope=kservev2`).

The Open Inference Protocol (KServe v2), as TorchServe 0.12 reads and writes it. A request::

    {"id": "42", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
                             "data": [1, 2, 3, 4]}]}

gives the handler one input per tensor: the input object with `data` reshaped to `shape` as
nested lists (or, for `BYTES`, the first element of `data` only), TorchServe's reading. The
handler returns one result per input, and the request is answered::

    {"id": "42", "model_name": "m", "model_version": "1.0",
     "outputs": [{"name": "x", "datatype": "FP64", "data": [...], "shape": [4]}]}

where output i takes input i's name, its data is the result flattened, its shape the flat
length, and its datatype is inferred the way numpy would type the result (TorchServe goes
through numpy; tsctl does not need it): a tensor's own dtype, else bools `BOOL`, integers
`INT64`, numbers with a float `FP64`, anything with text `BYTES`. `id` is the request's own,
or the server's request id when it sent none; `model_name` and `model_version` are the
archive manifest's. `context.input_names` holds the input names while the handler runs.

TorchServe reads only the first request of a batch; tsctl reads each one and gives each its
share of the results, so batching works.
"""

from __future__ import annotations

import math
from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope, request_list
from tsctl.worker.envelope import EnvelopeInputError

_EXPECTED = '{"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}'

#: a tensor's dtype name (torch's without its `torch.` prefix, or numpy's) → v2 datatype
_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
}


class KServev2Envelope(BaseEnvelope):
    """Open Inference Protocol tensors in and out; see the module docstring."""

    def __init__(self, handle_fn: Any) -> None:
        super().__init__(handle_fn)
        #: per request of the current batch: (its id or None, its input names)
        self._requests: dict[int, tuple[str | None, list[str]]] = {}

    def parse_input(self, data: Any) -> list[Any]:
        self._requests = {}
        inputs = self._gather(data, self._inputs)
        if self.context is not None:
            self.context.input_names = [n for _, names in self._requests.values() for n in names]
        return inputs

    def format_output(self, data: Any) -> list[Any]:
        try:
            return self._scatter(data, self._response)
        finally:
            self._requests = {}
            if self.context is not None and hasattr(self.context, "input_names"):
                del self.context.input_names

    def _inputs(self, idx: int, row: Any) -> list[Any]:
        body, inputs = request_list(row, "kservev2", _EXPECTED, "inputs")
        parsed = [_read_input(pos, tensor) for pos, tensor in enumerate(inputs)]
        request_id = body.get("id")
        own_id = request_id if isinstance(request_id, str) and request_id.strip() else None
        self._requests[idx] = (own_id, [tensor["name"] for tensor in parsed])
        return parsed

    def _response(self, idx: int, results: Any, count: int) -> dict[str, Any]:
        own_id, names = self._requests[idx]
        results = list(results)
        if len(results) > len(names):
            raise ValueError(
                f"the handler returned {len(results)} results for {len(names)} inputs: each "
                "output takes the name of the input at its position"
            )
        context = self.context
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        return {
            "id": own_id if own_id is not None else context.get_request_id(idx),
            "model_name": model.get("modelName"),
            "model_version": model.get("modelVersion"),
            "outputs": [_output(r, n) for r, n in zip(results, names[: len(results)], strict=True)],
        }


def _read_input(pos: int, tensor: Any) -> dict[str, Any]:
    """One input object, checked, with its `data` as the handler sees it."""
    if not isinstance(tensor, dict):
        raise EnvelopeInputError(f"kservev2 input {pos} is not an object like {_EXPECTED}")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise EnvelopeInputError(f'kservev2 input {pos} has no "name" string')
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise EnvelopeInputError(f'kservev2 input {name!r} has no "datatype" string')
    data = tensor.get("data")
    if not isinstance(data, list):
        raise EnvelopeInputError(f'kservev2 input {name!r} has no "data" list')
    if datatype == "BYTES":
        if not data:
            raise EnvelopeInputError(f'kservev2 input {name!r}: "data" is empty')
        value: Any = data[0]
    else:
        value = _reshape(name, _coerce(_flatten(data)), tensor.get("shape"))
    return {**tensor, "data": value}


def _reshape(name: str, flat: list[Any], shape: Any) -> Any:
    """`flat` as nested lists of `shape` (one dimension may be -1), like numpy's reshape."""
    valid = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
    )
    if not valid or sum(d == -1 for d in shape) > 1:
        raise EnvelopeInputError(
            f'kservev2 input {name!r}: "shape" must be a list of sizes (at most one -1), '
            f"not {shape!r}"
        )
    dims = list(shape)
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims and known and len(flat) % known == 0:
        dims[dims.index(-1)] = len(flat) // known
    if -1 in dims or math.prod(dims) != len(flat):
        raise EnvelopeInputError(
            f"kservev2 input {name!r}: {len(flat)} values do not fit shape {shape!r}"
        )
    if not dims:
        return flat[0]
    return _nest(flat, dims)


def _nest(flat: list[Any], dims: list[int]) -> list[Any]:
    if len(dims) == 1:
        return flat
    step = len(flat) // dims[0] if dims[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], dims[1:]) for i in range(dims[0])]


def _output(result: Any, name: str) -> dict[str, Any]:
    datatype, flat = _typed_flat(result)
    return {"name": name, "datatype": datatype, "data": flat, "shape": [len(flat)]}


def _typed_flat(value: Any) -> tuple[str, list[Any]]:
    """A result as (v2 datatype, flat list of JSON values)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "reshape") and hasattr(value, "tolist"):
        flat = value.reshape(-1).tolist()  # a torch tensor or a numpy array
        datatype = _DATATYPES.get(str(dtype).removeprefix("torch."))
        if datatype is not None:
            return datatype, flat
        if getattr(dtype, "kind", "") in ("U", "S", "O"):
            return "BYTES", [_text(v) for v in flat]
        value = flat
    values = _flatten(value)
    return _datatype(values), _coerce(values)


def _flatten(value: Any) -> list[Any]:
    """Nested lists, tuples and tensors → one flat list; anything else is one element."""
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _flatten(part)]
    if hasattr(value, "tolist") and hasattr(value, "reshape"):
        return _flatten(value.reshape(-1).tolist())
    return [value]


def _datatype(values: list[Any]) -> str:
    """numpy's choice for `numpy.array(values)`, as a v2 datatype."""
    if not values:
        return "FP64"  # numpy's default for an empty array
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) for v in values):
        return "INT64"
    if all(isinstance(v, (int, float)) for v in values):
        return "FP64"
    return "BYTES"


def _coerce(values: list[Any]) -> list[Any]:
    """The values as numpy would hold them in one array: bools become ints beside ints,
    numbers floats beside a float, everything text beside text."""
    datatype = _datatype(values)
    if datatype == "INT64":
        return [int(v) for v in values]
    if datatype == "FP64":
        return [float(v) for v in values]
    if datatype == "BYTES" and all(isinstance(v, (str, bytes, int, float)) for v in values):
        return [_text(v) for v in values]
    return values


def _text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) or not isinstance(value, (int, float)) else str(value)
