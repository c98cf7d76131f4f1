"""grpc_bench's plan, its gRPC correctness gate and its runs: one server at a time with the MLP
archive of one batch size, checked (REST 200, and a gRPC call through grpcio and tsctl's
generated stubs that must come back OK with the same prediction), then every target of that
server (tsctl gRPC and REST, TorchServe gRPC and REST; TARGETS) at every concurrency, each
after a warm-up run, with the gRPC check made again after every gRPC run.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lib.archives import mlp_archive_name
from benchmarks.lib.load import Load, Run, run_h2load, run_wrk, with_cpu
from benchmarks.lib.quiet import QuietGate
from benchmarks.lib.script import log
from benchmarks.lib.servers import Server, running

GRPC_PATH = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
REST_PATH = "/predictions/mlp"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
#: (key, server, protocol, tool): every kind of measured run, in table order
TARGETS = [
    ("tsctl gRPC", "tsctl", "grpc", "h2load"),
    ("tsctl REST", "tsctl", "rest", "h2load"),
    ("tsctl REST wrk", "tsctl", "rest", "wrk"),
    ("TS gRPC", "TorchServe", "grpc", "h2load"),
    ("TS REST", "TorchServe", "rest", "wrk"),
]


@dataclass
class Plan:
    batches: list[int]
    concs: list[int]
    duration: float
    warmup: float
    retries: int
    servers: list[str]
    ts_rest: bool
    wrk: bool


@dataclass
class Row:
    target: str  # a TARGETS key
    batch: int
    conc: int
    threads: list[int]
    load: Run


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- gRPC


def request_message(body: bytes) -> bytes:
    from tsctl.proto_gen import inference_pb2

    message = inference_pb2.PredictionsRequest(model_name="mlp", input={"data": body})
    return bytes(message.SerializeToString())


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\0" + struct.pack(">I", len(message)) + message


@dataclass
class GrpcCheck:
    code: str
    prediction: bytes
    frame_len: int  # bytes of the response's gRPC message frame (what h2load counts as DATA)


def grpc_call(address: str, body: bytes, timeout: float = 30) -> GrpcCheck:
    """One Predictions call through grpcio and tsctl's generated stubs."""
    import grpc

    from tsctl.proto_gen import inference_pb2, inference_pb2_grpc

    request = inference_pb2.PredictionsRequest(model_name="mlp", input={"data": body})
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            reply, call = stub.Predictions.with_call(request, timeout=timeout)
        except grpc.RpcError as exc:
            return GrpcCheck(f"{exc.code().name}: {exc.details()}", b"", 0)
        return GrpcCheck(call.code().name, bytes(reply.prediction), 5 + reply.ByteSize())


# ----------------------------------------------------------------------------- runs


def wanted(plan: Plan, server: str) -> list[tuple[str, str, str]]:
    """(key, protocol, tool) of the runs to make on `server`."""
    keep = []
    for key, name, protocol, tool in TARGETS:
        if name != server:
            continue
        if key == "tsctl REST wrk" and not plan.wrk:
            continue
        if name == "TorchServe" and protocol == "rest" and not plan.ts_rest:
            continue
        keep.append((key, protocol, tool))
    return keep


def checked(server: Server, body: bytes) -> GrpcCheck:
    """The correctness gate: REST 200, gRPC OK with the same prediction bytes."""
    reply = server.post(REST_PATH, body, "application/json", timeout=30)
    if reply.status != 200:
        raise RuntimeError(
            f"{server.name}: POST {REST_PATH} → {reply.status}: {reply.body[:300]!r}"
        )
    check = grpc_call(server.grpc_address, body)
    if check.code != "OK":
        raise RuntimeError(f"{server.name}: gRPC Predictions → {check.code}")
    if check.prediction != reply.body:
        raise RuntimeError(
            f"{server.name}: gRPC prediction {check.prediction[:200]!r} differs from the "
            f"REST answer {reply.body[:200]!r}"
        )
    return check


def measure_server(
    plan: Plan,
    server: Server,
    batch: int,
    threads: dict[int, int],
    files: dict[str, Path],
    work: Path,
    results: Results,
    gate: QuietGate,
) -> None:
    """Start `server` with the batch-size archive, check it, and make all its runs."""
    models = f"mlp={mlp_archive_name(1, batch)}.mar"
    body = files["body"].read_bytes()
    with running(server, models, "mlp", 1, threads[1]):
        observed = server.worker_threads()
        if server.name == "tsctl" and observed and observed[0] != threads[1]:
            log(f"  note: tsctl gives its worker {observed[0]} threads, not {threads[1]}")
            threads[1] = observed[0]
        check = checked(server, body)
        results.answers.setdefault(server.name, check.prediction.decode(errors="replace"))
        log(f"  gRPC check: {check.code}, response frame {check.frame_len} bytes")
        grpc_url = f"http://{server.grpc_address}{GRPC_PATH}"
        rest_url = f"http://127.0.0.1:{server.inference_port}{REST_PATH}"

        def run_once(protocol: str, tool: str, conc: int, seconds: float) -> Load:
            if tool == "wrk":
                return run_wrk(
                    server.inference_port, REST_PATH, files["body"], "application/json",
                    conc, seconds, 10,
                )  # fmt: skip
            if protocol == "grpc":
                return run_h2load(
                    grpc_url, files["frame"], GRPC_HEADERS, conc, seconds, False, work,
                    check.frame_len,
                )  # fmt: skip
            return run_h2load(
                rest_url, files["body"], ["content-type: application/json"], conc, seconds,
                True, work,
            )  # fmt: skip

        for conc in plan.concs:
            for key, protocol, tool in wanted(plan, server.name):
                run_once(protocol, tool, conc, plan.warmup)  # warm-up, not recorded
                load = gate.measured(
                    lambda p=protocol, t=tool, c=conc: with_cpu(  # type: ignore[misc]
                        lambda: run_once(p, t, c, plan.duration), server.root_pid
                    ),
                    server.root_pid,
                    plan.retries,
                    f"{key} c={conc}",
                )
                if protocol == "grpc":
                    after = grpc_call(server.grpc_address, body)
                    if after.code != "OK" or after.prediction != check.prediction:
                        load.error = (load.error + "; " if load.error else "") + (
                            f"gRPC check after the run: {after.code}"
                        )
                results.rows.append(Row(key, batch, conc, observed, load))
                log(
                    f"    {key:<15} c={conc:<3} {load.rps:7.0f} req/s  p50 {load.p50_ms:6.2f} ms"
                    f"  p99 {load.p99_ms:6.2f} ms  lg/fe/wk {load.lg_cores:.2f}/"
                    f"{load.fe_cores:.2f}/{load.wk_cores:.2f}  {load.problems()}"
                )
                if load.problems():
                    results.errors.append(f"{key} batch={batch} c={conc}: {load.problems()}")
