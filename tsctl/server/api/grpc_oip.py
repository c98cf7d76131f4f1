"""The Open Inference Protocol (v2) over gRPC: `inference.GRPCInferenceService` on its own port
(`grpc_oip_address`:`grpc_oip_port`, off with `enable_grpc=false`, TLS with `enable_grpc_ssl`).

A thin adapter on the daemon's event loop, like `grpc_api`: `ModelInfer` turns the protobuf
request into one OIP part (`tsctl.ipc.oip`: the request's JSON header, then every input's data
as a blob, typed `contents` packed into the same little-endian layout as raw ones) and sends it
down the one request path (`tsctl.server.inference.Pending`: the model's queue, batches that
may mix protocols, its workers, its response timeout). The worker answers in the REST binary
extension's form; its blobs become `raw_output_contents` as they are, sliced, never decoded
here. The daemon reads tensor data only to pack typed `contents` (which the client chose to
send as lists) and to check that each input's size agrees with its shape and datatype.

Probes (`ServerLive`, `ServerReady`, `ModelReady`) answer from `tsctl.server.readiness` and need
no token; metadata and inference calls need the inference key (`authorization` metadata), as
TorchServe's gRPC inference API does. Every method wears `grpc_errors.funnel`: unknown model
NOT_FOUND, bad input INVALID_ARGUMENT (with the reason), a full queue RESOURCE_EXHAUSTED, the
model's own failures as `/predictions` answers them. Message sizes follow `max_request_size` /
`max_response_size` (`grpc_api.server_options`). Event-loop only; nothing here blocks.
"""

from __future__ import annotations

import array
import json
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from grpc import aio

import tsctl
from tsctl.errors import BadRequest, PredictionFailed, TsctlError, prediction_failed
from tsctl.ipc import oip
from tsctl.ipc.messages import Part
from tsctl.proto_gen import grpc_predict_v2_pb2 as pb
from tsctl.proto_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from tsctl.proto_gen import health_pb2_grpc
from tsctl.server import readiness
from tsctl.server.api.grpc_api import HealthService, request_info, server_options
from tsctl.server.api.grpc_errors import funnel
from tsctl.server.inference import Pending
from tsctl.server.registry import ModelVersion
from tsctl.server.request import InferenceRequest, Response, new_request_id
from tsctl.server.state import ServerState

#: what ServerMetadata names
SERVER_NAME = "tsctl"
#: the protocol extensions tsctl implements (Triton's names)
EXTENSIONS = ("binary_tensor_data",)
#: ModelMetadata's platform for every model
PLATFORM = "pytorch"
#: the service's method paths start with this (the RPC's name follows)
OIP_PATH = "/inference.GRPCInferenceService/"

#: datatype -> (the `InferTensorContents` field that carries it, its `array` typecode)
TYPED: Mapping[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "B"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "UINT8": ("uint_contents", "B"),
    "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"),
    "UINT64": ("uint64_contents", "Q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
}
_LENGTH = struct.Struct("<I")


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def param_value(param: Any) -> Any:
    """An `InferParameter`'s value as JSON has it (None when none is set)."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def params_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf parameter map as the OIP JSON's `parameters` object."""
    return {key: param_value(value) for key, value in params.items()}


def fill_params(target: Any, values: Mapping[str, Any]) -> None:
    """Set a protobuf parameter map from JSON values (lists and objects travel as JSON text)."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            param.int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            param.uint64_param = value
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            param.string_param = json.dumps(value, separators=(",", ":"))


def pack_elements(datatype: str, values: Iterable[Any], where: str) -> bytes:
    """Elements as the raw layout: little-endian fixed-size items, or BYTES' length-prefixed
    items. `BadRequest` naming `where` for a value that does not fit the datatype."""
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
        return b"".join(part for item in items for part in (_LENGTH.pack(len(item)), item))
    if datatype not in TYPED:
        raise BadRequest(f"{where}: datatype {datatype} has no typed contents: send raw contents")
    try:
        packed = array.array(TYPED[datatype][1], values)
    except (OverflowError, TypeError, ValueError) as exc:
        raise BadRequest(f"{where}: a value does not fit datatype {datatype}: {exc}") from None
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def check_tensor(datatype: str, shape: list[int], where: str) -> None:
    """`BadRequest` for a datatype OIP does not have, or a shape with a negative size."""
    if datatype not in oip.DATATYPES:
        known = ", ".join(oip.DATATYPES)
        raise BadRequest(f"{where}: unknown datatype {datatype!r} (one of {known})")
    if any(size < 0 for size in shape):
        raise BadRequest(f"{where}: shape {shape} has a negative dimension")


def check_size(datatype: str, shape: list[int], data: bytes, where: str) -> None:
    """`BadRequest` when `data` cannot hold a tensor of `shape` and `datatype` (BYTES: at
    least a length prefix per element; the worker reads them)."""
    count = oip.element_count(shape)
    size = oip.DATATYPES[datatype]
    if size is None:
        if len(data) < 4 * count:
            raise BadRequest(f"{where}: {len(data)} bytes cannot hold {count} BYTES elements")
    elif len(data) != size * count:
        raise BadRequest(
            f"{where}: shape {shape} of {datatype} takes {size * count} bytes, got {len(data)}"
        )


def input_data(tensor: Any, raw: bytes | None, where: str) -> bytes:
    """One input's data as a blob: its raw contents, or its typed `contents` packed."""
    used = [field.name for field, _ in tensor.contents.ListFields()]
    if raw is not None:
        if used:
            raise BadRequest(f"{where}: has both raw_input_contents and contents; send one")
        return raw
    datatype = tensor.datatype
    field = "bytes_contents" if datatype == "BYTES" else TYPED.get(datatype, ("", ""))[0]
    others = [name for name in used if name != field]
    if others:
        raise BadRequest(f"{where}: datatype {datatype} cannot be sent in {others[0]}")
    values = getattr(tensor.contents, field) if field else ()
    if len(values) != oip.element_count(tensor.shape):
        raise BadRequest(
            f"{where}: shape {list(tensor.shape)} takes {oip.element_count(tensor.shape)} "
            f"elements, contents has {len(values)}"
        )
    return pack_elements(datatype, values, where)


def request_part(request: Any) -> Part:
    """The OIP part (`tsctl.ipc.oip`) of a `ModelInferRequest`: its JSON header, then one
    blob per input. Outputs are asked for in binary form."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for i, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        shape = list(tensor.shape)
        check_tensor(tensor.datatype, shape, where)
        data = input_data(tensor, raw[i] if raw else None, where)
        check_size(tensor.datatype, shape, data, where)
        parameters = params_of(tensor.parameters)
        parameters["binary_data_size"] = len(data)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": shape,
                "parameters": parameters,
            }
        )
        blobs.append(data)
    outputs = [
        {"name": out.name, "parameters": {**params_of(out.parameters), "binary_data": True}}
        for out in request.outputs
    ]
    header: dict[str, Any] = {
        "parameters": {**params_of(request.parameters), "binary_data_output": True},
        "inputs": inputs,
    }
    if request.id:
        header["id"] = request.id
    if outputs:
        header["outputs"] = outputs
    media, data = oip.pack(header, blobs)
    return Part(oip.PART_NAME, media, data)


def _json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError):
        raise PredictionFailed(f"the model answered {what} that is not JSON") from None


def infer_response(mv: ModelVersion, answer: Response) -> Any:
    """A `ModelInferResponse` from the worker's answer (JSON header + blobs, or JSON alone):
    every output's data in `raw_output_contents`."""
    body = memoryview(answer.body)
    headers = {k.lower(): v for k, v in answer.headers}
    length = headers.get(oip.HEADER_LENGTH.lower())
    if length is not None:
        n = int(length) if length.isdigit() else -1
        if not 0 < n <= len(body):
            raise PredictionFailed(f"the model's answer has a bad {oip.HEADER_LENGTH}: {length}")
        header, blobs = _json(body[:n], "a header"), body[n:]
    else:
        header, blobs = _json(body, "an OIP response"), body[:0]
    if answer.status >= 400:
        message = header.get("error") if isinstance(header, dict) else None
        raise prediction_failed(str(message or "Prediction failed"), answer.status)
    if not isinstance(header, dict) or not isinstance(header.get("outputs", []), list):
        raise PredictionFailed("the model's answer is not an OIP inference response")
    reply = pb.ModelInferResponse(
        model_name=str(header.get("model_name") or mv.name),
        model_version=str(header.get("model_version") or mv.version),
        id=str(header.get("id") or ""),
    )
    fill_params(reply.parameters, header.get("parameters") or {})
    offset = 0
    for out in header.get("outputs", []):
        params = dict(out.get("parameters") or {})
        size = params.pop("binary_data_size", None)
        datatype, shape = str(out.get("datatype", "")), out.get("shape") or []
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(blobs):
                raise PredictionFailed(f"output {out.get('name')!r}: its data is missing")
            data = bytes(blobs[offset : offset + size])
            offset += size
        else:
            data = pack_elements(datatype, _flat(out.get("data", [])), f"output {out.get('name')}")
        tensor = reply.outputs.add(name=str(out.get("name", "")), datatype=datatype, shape=shape)
        fill_params(tensor.parameters, params)
        reply.raw_output_contents.append(data)
    return reply


def _flat(data: Any) -> list[Any]:
    """A JSON tensor's elements, flattened in row-major order (the fallback for an output
    the worker sent as a JSON list)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    return [value for item in data for value in _flat(item)]


def declared(yaml_config: Mapping[str, Any], key: str) -> list[Any]:
    """The tensors `model-config.yaml` declares under `key` (`inputs` or `outputs`): a list of
    `{name, datatype, shape}`; entries that are not such a mapping are skipped."""
    found = []
    entries = yaml_config.get(key)
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        shape = entry.get("shape") or []
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            continue
        found.append(
            pb.ModelMetadataResponse.TensorMetadata(
                name=entry["name"], datatype=str(entry.get("datatype", "")), shape=shape
            )
        )
    return found


class OipService(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _authorize(
        self,
        context: aio.ServicerContext,
        rpc: str,
        model: str | None,
        meta: dict[str, str] | None = None,
    ) -> None:
        """The authorizers' leave for a call of the inference API (none asked for probes)."""
        state = self.state
        if state.authorizers:
            meta = _metadata(context) if meta is None else meta
            state.authorize(request_info(context, meta, "inference", OIP_PATH + rpc, model))

    @funnel
    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=readiness.server_live(self.state))

    @funnel
    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=readiness.server_ready(self.state))

    @funnel
    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:
        ready = readiness.model_ready(self.state, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @funnel
    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        self._authorize(context, "ServerMetadata", None)
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=tsctl.__version__, extensions=EXTENSIONS
        )

    @funnel
    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        state = self.state
        self._authorize(context, "ModelMetadata", request.name)
        mv = state.registry.get(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=mv.name,
            versions=sorted(state.registry.models.get(mv.name, {})),
            platform=PLATFORM,
            inputs=declared(mv.yaml_config, "inputs"),
            outputs=declared(mv.yaml_config, "outputs"),
        )

    @funnel
    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> Any:
        state = self.state
        try:
            meta = _metadata(context)
            if state.authorizers:
                self._authorize(context, "ModelInfer", request.model_name, meta)
            mv = state.model_for_inference(request.model_name, request.model_version or None)
            part = request_part(request)
            request_id = new_request_id(meta.get("x-request-id"))
            wire = InferenceRequest(request_id, [part], list(meta.items()), time.monotonic())
            # the peer (one HTTP/2 connection, many calls) is the batcher's source
            pending = Pending(mv, wire, context.peer())
            try:
                answer = await pending.result()
            except BaseException:
                pending.abandon()  # a cancelled call: its request must not reach a worker
                raise
            reply = infer_response(mv, answer)
        except TsctlError as exc:
            state.answered(exc.http_status)  # counted; the funnel answers it
            raise
        state.answered(answer.status)
        return reply


async def start(
    state: ServerState, address: str, tls: tuple[bytes, bytes] | None = None
) -> tuple[aio.Server, str]:
    """Start the OIP gRPC server (with grpc.health.v1 beside it); returns it and its address.
    `tls`: (private key, certificate chain) in PEM, as for the other gRPC ports."""
    server = aio.server(
        options=server_options(state.config),
        maximum_concurrent_rpcs=state.config.max_connections,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipService(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(state), server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if port == 0:
        raise TsctlError(f"cannot listen on gRPC OIP address {address}")
    await server.start()
    host = address.rsplit(":", 1)[0]
    return server, f"{host}:{port}"
