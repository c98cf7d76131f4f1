"""The gRPC inference and management APIs: thin grpc.aio adapters on the daemon's event loop.

They speak TorchServe 0.12's protos (wire-identical, see proto/) and go down the same request
path as REST: `Predictions` builds the same `InferenceRequest` (each `input` entry one field,
as bytes) and waits on the same queue, batches and workers; management calls run the same
operations and answer in `msg` what TorchServe answers there: the JSON document for describe
and list, the plain status sentence for the others. Every servicer method wears
`tsctl.server.api.grpc_errors`' funnel: a `TsctlError` answers its `grpc_code`, anything else
INTERNAL with a request id and no details. Message sizes follow `max_request_size` /
`max_response_size`. Event-loop only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import MappingProxyType
from typing import Any

import grpc
from grpc import aio

from tsctl.errors import TsctlError
from tsctl.ipc.messages import Part
from tsctl.plugins.api import RequestInfo
from tsctl.proto_gen import (
    health_pb2,
    health_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from tsctl.server import management
from tsctl.server.api.grpc_errors import funnel, funnel_stream, status_of
from tsctl.server.config import ServerConfig
from tsctl.server.inference import Pending
from tsctl.server.request import InferenceRequest, Job, Response, new_request_id
from tsctl.server.sessions import SEQUENCE_ID, SEQUENCE_START, HeldChunks, SequenceIdRequired
from tsctl.server.state import ServerState

HEALTHY = json.dumps({"status": "Healthy"}, indent=2)


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


#: the services' method paths start with these (the RPC's name follows)
INFERENCE_PATH = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
MANAGEMENT_PATH = "/org.pytorch.serve.grpc.management.ManagementAPIsService/"


def request_info(
    context: aio.ServicerContext,
    metadata: dict[str, str],
    api: str,
    path: str,
    model: str | None,
) -> RequestInfo:
    """What the authorizers know of a call (built only when there are authorizers):
    `path` the full method path, its last part the RPC's name."""
    peer = context.peer() or ""
    if peer.startswith(("ipv4:", "ipv6:")):  # grpc's "ipv4:127.0.0.1:5000": "host:port"
        peer = peer[5:]
    rpc = path.rpartition("/")[2]
    headers = MappingProxyType(metadata)
    return RequestInfo(api, rpc, path, headers, peer, model or None, "grpc")


class InferenceService(inference_pb2_grpc.InferenceAPIsServiceServicer):  # type: ignore[misc]
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @funnel
    async def Ping(self, request: Any, context: aio.ServicerContext) -> Any:
        return inference_pb2.TorchServeHealthResponse(health=HEALTHY)

    async def _predict(
        self,
        request: Any,
        context: aio.ServicerContext,
        on_chunk: Callable[[Response], None] | None = None,
        sequence: str | None = None,
        rpc: str = "Predictions",
        sequences: list[str] | None = None,
        jobs: list[Job] | None = None,
    ) -> bytes:
        meta = _metadata(context)
        state = self.state
        if state.authorizers:
            path = INFERENCE_PATH + rpc
            state.authorize(request_info(context, meta, "inference", path, request.model_name))
        mv = state.model_for_inference(request.model_name, request.model_version or None)
        if sequences is not None and sequence is None and mv.queue.sessions is not None:
            start = bytes(request.input.get(SEQUENCE_START, b"")).lower()
            if start != b"true":  # TorchServe's rule: a new session is asked for explicitly
                raise SequenceIdRequired(
                    f"Parameter sequenceId is required (or input {SEQUENCE_START}: true, "
                    "to open a new session)"
                )
        parts = [Part(name, "", bytes(value)) for name, value in request.input.items()]
        request_id = new_request_id(meta.get("x-request-id"))
        headers = list(meta.items())
        if sequence is not None:  # the handler reads it (`context.get_sequence_id`)
            headers.append((SEQUENCE_ID, sequence))
        wire = InferenceRequest(request_id, parts, headers, time.monotonic())
        # the peer (one HTTP/2 connection, many calls) is the batcher's source
        pending = Pending(mv, wire, context.peer(), on_chunk, sequence)
        if jobs is not None:
            jobs.append(pending.job)
        if sequences is not None and pending.job.sequence is not None:
            sequences.append(pending.job.sequence)  # a stateful model's new session's too
        try:
            response = await pending.result()
        except BaseException:
            pending.abandon()  # a cancelled call: its request must not reach a worker
            raise
        state.answered(response.status)
        return bytes(response.body)

    @funnel
    async def Predictions(self, request: Any, context: aio.ServicerContext) -> Any:
        try:
            body = await self._predict(request, context)
        except TsctlError as exc:
            self.state.answered(exc.http_status)  # counted; the funnel answers it
            raise
        return inference_pb2.PredictionResponse(prediction=body)

    @funnel_stream
    async def StreamPredictions(
        self, request: Any, context: aio.ServicerContext
    ) -> AsyncGenerator[Any, None]:
        """One message per intermediate answer of a streaming handler, then the final one."""
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        final = asyncio.ensure_future(
            self._predict(
                request,
                context,
                lambda r: chunks.put_nowait(bytes(r.body)),
                rpc="StreamPredictions",
            )
        )
        final.add_done_callback(lambda _: chunks.put_nowait(None))
        try:
            while (body := await chunks.get()) is not None:
                yield inference_pb2.PredictionResponse(prediction=body)
            answer = await final
        finally:
            final.cancel()
        yield inference_pb2.PredictionResponse(prediction=answer)

    @funnel_stream
    async def StreamPredictions2(
        self, requests: AsyncIterator[Any], context: aio.ServicerContext
    ) -> AsyncGenerator[Any, None]:
        """One answer per request, in order (and before it, one per intermediate answer of
        a continuous batch: `tsctl.server.sessions`); a request that fails has its error in
        the answer's `status`, and the stream goes on (a bug ends it through the funnel). A
        stateful model's request without `sequence_id` opens a session: its answers carry
        the new id."""
        from google.rpc import status_pb2

        async for request in requests:
            sequence = request.sequence_id if request.HasField("sequence_id") else None
            sequence = sequence or None
            held = HeldChunks()
            sequences: list[str] = []
            final = asyncio.ensure_future(
                self._predict(
                    request,
                    context,
                    held.put,
                    sequence,
                    "StreamPredictions2",
                    sequences,
                    held.jobs,
                )
            )
            final.add_done_callback(held.end)
            try:
                while (body := await held.chunks.get()) is not None:
                    yield _with_sequence(
                        inference_pb2.PredictionResponse(prediction=body), sequences
                    )
                answer = inference_pb2.PredictionResponse(prediction=await final)
            except TsctlError as exc:
                code, message = status_of(exc)
                answer = inference_pb2.PredictionResponse(
                    status=status_pb2.Status(code=code.value[0], message=message)
                )
            finally:
                final.cancel()
            yield _with_sequence(answer, sequences or ([sequence] if sequence else []))


def _with_sequence(answer: Any, sequences: list[str]) -> Any:
    """`answer` with the session id its request had (`sequences`: none or one)."""
    if sequences:
        answer.sequence_id = sequences[0]
    return answer


#: TorchServe's gRPC answer to register and unregister while `enable_model_api` is off
MODEL_API_DISABLED = "Model API disabled"


def _given(value: int) -> int | None:
    """A proto3 int as TorchServe reads it: 0 or less is "not given"."""
    return value if value > 0 else None


class ManagementService(management_pb2_grpc.ManagementAPIsServiceServicer):  # type: ignore[misc]
    """Each call does what its REST twin does; `msg` holds the describe or list JSON, or the
    status sentence (REST's `{"status": ...}` text) for the other calls, as in TorchServe.
    proto3 cannot tell 0 from unset: 0 (or less) means "not given", TorchServe's reading."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _run(
        self, context: aio.ServicerContext, request: Any, call: Any, changes_models: bool = False
    ) -> Any:
        state = self.state
        if state.authorizers:
            # each RPC takes a message named after it (DescribeModel: DescribeModelRequest)
            path = MANAGEMENT_PATH + request.DESCRIPTOR.name.removesuffix("Request")
            model = getattr(request, "model_name", None)
            state.authorize(request_info(context, _metadata(context), "management", path, model))
        if changes_models and not self.state.config.enable_model_api:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, MODEL_API_DISABLED)
        answer = await call()
        if isinstance(answer, management.Outcome):
            return management_pb2.ManagementResponse(msg=answer.message)
        return management_pb2.ManagementResponse(msg=json.dumps(answer, indent=2))

    @funnel
    async def DescribeModel(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            version = request.model_version or None
            return await management.describe_models(
                self.state, request.model_name, version, request.customized
            )

        return await self._run(context, request, call)

    @funnel
    async def ListModels(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            return management.list_models(
                self.state, request.limit or 100, request.next_page_token or 0
            )

        return await self._run(context, request, call)

    @funnel
    async def RegisterModel(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            values = {
                "url": request.url,
                "model_name": request.model_name or None,
                "handler": request.handler or None,
                "runtime": request.runtime or None,
                "batch_size": _given(request.batch_size),
                "max_batch_delay": _given(request.max_batch_delay),
                "initial_workers": _given(request.initial_workers),
                "synchronous": request.synchronous,
                "response_timeout": _given(request.response_timeout),
                "startup_timeout": _given(request.startup_timeout),
            }
            params = management.parse(management.RegisterParams, values)
            return await management.register(self.state, params)

        return await self._run(context, request, call, changes_models=True)

    @funnel
    async def ScaleWorker(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            low = request.min_worker if request.min_worker > 0 else 1
            values = {
                "min_worker": low,
                "max_worker": request.max_worker if request.max_worker > 0 else low,
                "synchronous": request.synchronous,
            }
            params = management.parse(management.ScaleParams, values)
            version = request.model_version or None
            return await management.scale(self.state, request.model_name, version, params)

        return await self._run(context, request, call)

    @funnel
    async def SetDefault(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            return management.set_default(self.state, request.model_name, request.model_version)

        return await self._run(context, request, call)

    @funnel
    async def UnregisterModel(self, request: Any, context: aio.ServicerContext) -> Any:
        async def call() -> Any:
            version = request.model_version or None
            return await management.unregister(self.state, request.model_name, version)

        return await self._run(context, request, call, changes_models=True)


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1: "" is the server; a model name is SERVING once it has a ready worker."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _status(self, service: str) -> int | None:
        status = health_pb2.HealthCheckResponse
        if not service:
            return int(status.NOT_SERVING if self.state.draining else status.SERVING)
        name, _, version = service.partition("/")
        try:
            mv = self.state.registry.get(name, version or None)
        except TsctlError:
            return None
        ready = any(w.state.serving for w in mv.pool.workers)
        return int(status.SERVING if ready else status.NOT_SERVING)

    @funnel
    async def Check(self, request: Any, context: aio.ServicerContext) -> Any:
        found = self._status(request.service)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=found)

    @funnel_stream
    async def Watch(self, request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
        last: int | None = -1
        while True:
            found = self._status(request.service)
            current = found if found is not None else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if current != last:
                last = current
                yield health_pb2.HealthCheckResponse(status=current)
            await asyncio.sleep(0.5)


#: concurrent calls on one HTTP/2 connection (gRPC's default is unbounded)
MAX_CONCURRENT_STREAMS = 100
#: how long the server waits for the answer to a keepalive ping before closing the connection
KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's bounds, from the daemon's settings (docs/configuration.md).

    Messages follow `max_request_size` / `max_response_size` (over-size: RESOURCE_EXHAUSTED,
    the reason in its details); a connection with no call for `keep_alive_timeout` is closed
    (GOAWAY); one with calls in progress is pinged after as long a silence, and closed when the
    ping is not answered. gRPC's own defaults bound what a client sends otherwise: metadata
    (8 KiB), and pings (a client pinging too often is disconnected).
    """
    idle_ms = int(config.keep_alive_timeout * 1000)
    return [
        ("grpc.max_receive_message_length", config.max_request_size),
        ("grpc.max_send_message_length", config.max_response_size),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", idle_ms),
        ("grpc.keepalive_time_ms", idle_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 0),
    ]


async def start(
    state: ServerState, address: str, api: str, tls: tuple[bytes, bytes] | None = None
) -> tuple[aio.Server, str]:
    """Start one gRPC server ("inference" or "management"); returns it and its address.
    `tls`: (private key, certificate chain) in PEM for a TLS port (gRPC's own TLS: 1.2 and
    up, its strong cipher suites)."""
    server = aio.server(
        options=server_options(state.config),
        # calls beyond it get RESOURCE_EXHAUSTED at once (each may hold a whole message)
        maximum_concurrent_rpcs=state.config.max_connections,
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(state), server)
    if api == "inference":
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
            InferenceService(state), server
        )
    else:
        management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server(
            ManagementService(state), server
        )
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if port == 0:
        raise TsctlError(f"cannot listen on gRPC {api} address {address}")
    await server.start()
    host = address.rsplit(":", 1)[0]
    return server, f"{host}:{port}"
