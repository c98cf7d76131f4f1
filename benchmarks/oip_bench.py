"""Benchmark: the Open Inference Protocol (REST JSON, REST binary, gRPC) against `/predictions`,
same tsctl server, same model, same run.

Run from the repository root (about 4 minutes on 2 cores; `--quick` about 1.5):

    .venv/bin/python benchmarks/oip_bench.py [--quick] [--concs 1,8,32] [--duration S]
        [--warmup S] [--models mlp,resnet] [--venv .venv] [--json-out FILE] [--keep]

Models:

- `mlp`: the tiny TorchScript MLP of serve_bench.py (16→64→64→4, benchmarks/models/), one
  worker, batch size 8, maxBatchDelay 5 ms. `/predictions` gets the 16 floats as a JSON list;
  OIP gets them as one FP32 input of shape [16]: as JSON `data` (REST JSON), as a 64-byte blob
  (REST with the binary tensor data extension, binary output asked for too), or as
  `raw_input_contents` (gRPC `ModelInfer`).
- `resnet`: examples/resnet_faces, one worker, batch size 8, maxBatchDelay 50 ms. One JPEG per
  request: `/predictions` gets it as the raw body; OIP as a BYTES input of shape [1] (binary
  REST and gRPC; a JPEG has no JSON form, so there is no REST JSON row).

Every target of a model runs against the same server, one after another, each after a warm-up
run, with h2load (`-t1 -m1 -c<conc>`; `--h1` for REST, h2c for gRPC: one prebuilt gRPC frame).
Before measuring, each target's answer is checked against `/predictions`' (the same numbers);
gRPC answers must also carry their prediction (DATA bytes at least answers times the frame size).
Besides req/s and latency, each row shows the CPU the daemon (`fe`) and the worker (`wk`)
used per answered request, in µs: the cost the protocol adds is the daemon's column.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import MLP_BODY, mlp_archives, resnet_archive
from benchmarks.lib.grpc_runs import grpc_frame
from benchmarks.lib.load import Run, run_h2load, with_cpu
from benchmarks.lib.procs import machine_line
from benchmarks.lib.quiet import QuietGate
from benchmarks.lib.rest import Reply, call
from benchmarks.lib.script import (
    ROOT,
    log,
    missing,
    programs,
    stopped_at_end,
    workspace,
)
from benchmarks.lib.servers import TsctlServer, running, threads_for
from benchmarks.lib.table import print_head, ratio

OIP_GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
TARGETS = ("predictions", "oip-json", "oip-binary", "oip-grpc")
LABELS = {
    "predictions": "/predictions (raw body)",
    "oip-json": "OIP REST, JSON",
    "oip-binary": "OIP REST, binary",
    "oip-grpc": "OIP gRPC, raw contents",
}


@dataclass
class Target:
    """One way of sending a model its request: what h2load posts, where, and how to read the
    answer into numbers for the correctness check."""

    key: str
    path: str
    body: bytes
    headers: list[str]
    grpc: bool = False


@dataclass
class Row:
    model: str
    target: str
    conc: int
    load: Run
    fe_us: float = 0.0  # daemon CPU µs per answered request
    wk_us: float = 0.0  # worker CPU µs per answered request


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def oip_binary(datatype: str, shape: list[int], blob: bytes) -> tuple[bytes, int]:
    """A REST binary-extension request of one input and its JSON header's length."""
    header = {
        "inputs": [
            {
                "name": "input0",
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + blob, len(head)


def oip_grpc(model: str, datatype: str, shape: list[int], blob: bytes) -> bytes:
    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input0", datatype
    tensor.shape.extend(shape)
    request.raw_input_contents.append(blob)
    return grpc_frame(bytes(request.SerializeToString()))


def targets(model: str, payload: bytes) -> list[Target]:
    """The targets of `model` (`payload`: the MLP's JSON floats, or a JPEG)."""
    infer = f"/v2/models/{model}/infer"
    if model == "mlp":
        floats = json.loads(payload)
        blob = struct.pack(f"<{len(floats)}f", *floats)
        shape, datatype = [len(floats)], "FP32"
        as_json = {"inputs": [{"name": "input0", "shape": shape, "datatype": datatype}]}
        as_json["inputs"][0]["data"] = floats
        json_type = ["content-type: application/json"]
        found = [
            Target("predictions", f"/predictions/{model}", payload, json_type),
            Target("oip-json", infer, json.dumps(as_json).encode(), json_type),
        ]
    else:
        blob = struct.pack("<I", len(payload)) + payload
        shape, datatype = [1], "BYTES"
        found = [
            Target("predictions", f"/predictions/{model}", payload, ["content-type: image/jpeg"])
        ]
    body, head = oip_binary(datatype, shape, blob)
    found.append(
        Target(
            "oip-binary", infer, body,
            ["content-type: application/octet-stream", f"inference-header-content-length: {head}"],
        )
    )  # fmt: skip
    frame = oip_grpc(model, datatype, shape, blob)
    found.append(Target("oip-grpc", OIP_GRPC_PATH, frame, GRPC_HEADERS, grpc=True))
    return found


def floats_of(reply: Reply) -> list[float]:
    """The numbers of an answer: `/predictions`' JSON, OIP JSON, or OIP binary (FP32)."""
    if reply.headers.get("inference-header-content-length"):
        head = int(reply.headers["inference-header-content-length"])
        output = json.loads(reply.body[:head])["outputs"][0]
        blob = reply.body[head : head + output["parameters"]["binary_data_size"]]
        return list(struct.unpack(f"<{len(blob) // 4}f", blob))
    answer = json.loads(reply.body)
    if isinstance(answer, dict) and "outputs" in answer:
        answer = answer["outputs"][0]["data"]
    flat: list[float] = []
    stack: list[Any] = [answer]
    while stack:
        item = stack.pop(0)
        if isinstance(item, list):
            stack[:0] = item
        else:
            flat.append(float(item))
    return flat


def grpc_answer(address: str, target: Target) -> tuple[list[float], int]:
    """One ModelInfer call through grpcio: the FP32 numbers and the response frame's size."""
    import grpc

    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary(
            OIP_GRPC_PATH,
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        reply = method(target.body[5:], timeout=30)
    blob = reply.raw_output_contents[0]
    return list(struct.unpack(f"<{len(blob) // 4}f", blob)), 5 + reply.ByteSize()


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= 1e-4 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True)
    )


def measure_model(
    model: str,
    archive_name: str,
    payload: bytes,
    server: TsctlServer,
    concs: list[int],
    args: argparse.Namespace,
    work: Path,
    results: Results,
    gate: QuietGate,
) -> None:
    with running(server, archive_name, model, 1, threads_for(1)):
        address = f"http://127.0.0.1:{server.inference_port}"
        frame_len: dict[str, int] = {}
        files: dict[str, Path] = {}
        want: list[float] | None = None
        for target in targets(model, payload):
            files[target.key] = work / f"{model}-{target.key}.body"
            files[target.key].write_bytes(target.body)
            if target.grpc:
                got, frame_len[target.key] = grpc_answer(server.oip_address, target)
            else:
                headers = dict(h.split(": ", 1) for h in target.headers)
                reply = call(address, "POST", target.path, target.body, headers, timeout=60)
                if reply.status != 200:
                    raise RuntimeError(f"{target.key}: {reply.status} {reply.body[:300]!r}")
                got = floats_of(reply)
            want = got if want is None else want
            if not close(got, want):
                raise RuntimeError(f"{target.key} answers {got[:4]}…, /predictions {want[:4]}…")
        log(f"  {model}: every target answers the same {len(want or [])} numbers")
        for conc in concs:
            for target in targets(model, payload):
                url = (
                    f"http://{server.oip_address}{target.path}"
                    if target.grpc
                    else f"{address}{target.path}"
                )

                def once(seconds: float, t: Target = target, u: str = url, c: int = conc) -> Run:
                    return run_h2load(
                        u, files[t.key], t.headers, c, seconds, not t.grpc, work,
                        frame_len.get(t.key, 0),
                    )  # fmt: skip

                once(args.warmup)
                load = gate.measured(
                    lambda o=once: with_cpu(lambda: o(args.duration), server.root_pid),  # type: ignore[misc]
                    server.root_pid, 2, f"{model} {target.key} c={conc}",
                )  # fmt: skip
                answered = load.rps * load.seconds
                row = Row(model, target.key, conc, load)
                if answered:
                    # with_cpu's cores are over the run's wall time, about `seconds`
                    row.fe_us = load.fe_cores * load.seconds / answered * 1e6
                    row.wk_us = load.wk_cores * load.seconds / answered * 1e6
                results.rows.append(row)
                log(
                    f"    {target.key:<12} c={conc:<3} {load.rps:7.0f} req/s  p50 "
                    f"{load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  daemon "
                    f"{row.fe_us:5.0f} µs/req  worker {row.wk_us:5.0f} µs/req  {load.problems()}"
                )
                if load.problems():
                    results.errors.append(f"{model} {target.key} c={conc}: {load.problems()}")


def report(results: Results, concs: list[int], models: list[str], args: argparse.Namespace) -> None:
    by = {(r.model, r.target, r.conc): r for r in results.rows}
    print(
        f"\n{args.duration:g} s per run after a {args.warmup:g} s warm-up; h2load -t1 -m1 "
        "(--h1 for REST); 1 worker, batch size 8; fe/wk: daemon/worker CPU µs per answered "
        "request\n"
    )
    head = (
        f"{'model':<7} {'conc':>4}  {'target':<26} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'fe µs':>6} {'wk µs':>6}  {'req/s ÷ /predictions':>20}  problems"
    )
    print_head(head)
    for model in models:
        for conc in concs:
            base = by.get((model, "predictions", conc))
            for key in TARGETS:
                row = by.get((model, key, conc))
                if row is None:
                    continue
                x = row.load
                versus = ratio(x.rps, base.load.rps) if base else "-"
                print(
                    f"{model:<7} {conc:>4}  {LABELS[key]:<26} {x.rps:>7.0f} {x.p50_ms:>7.2f} "
                    f"{x.p99_ms:>7.2f} {row.fe_us:>6.0f} {row.wk_us:>6.0f}  {versus:>20}  "
                    f"{x.problems()}"
                )
            print()


def prepare(
    models: list[str], python: Path, tsctl: Path, work: Path
) -> dict[str, tuple[str, bytes]]:
    """Each model's archive file name (in `work/store`) and request payload."""
    store, found = work / "store", {}
    if "mlp" in models:
        mlp_archives(python, tsctl, work, store, {(1, 8)})
        found["mlp"] = ("mlp_w1_b8.mar", json.dumps(MLP_BODY).encode())
    if "resnet" in models:
        name = resnet_archive(python, tsctl, work, store)
        found["resnet"] = (name, (work / "images" / "face_a.jpg").read_bytes())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="conc 8 only, 3 s runs")
    parser.add_argument("--concs", default=None, help="concurrencies (default 1,8,32)")
    parser.add_argument("--models", default="mlp,resnet")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="tsctl's venv")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    concs = [int(c) for c in (args.concs or ("8" if args.quick else "1,8,32")).split(",")]
    models = [m for m in args.models.split(",") if m]
    python, tsctl, needed = programs(args.venv, Path("/nonexistent"), False)
    problem = missing(needed, ["h2load"], {"h2load": " (Debian: apt-get install nghttp2-client)"})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    gate = QuietGate(30 if args.quick else 120)
    results = Results()
    began = time.monotonic()
    with workspace("oip-bench-", None, args.keep) as work:
        server = TsctlServer(work, work / "store", tsctl, grpc=True)
        with stopped_at_end([server]):
            log(f"work dir {work}; machine: {machine_line()}")
            for model, (name, payload) in prepare(models, python, tsctl, work).items():
                served = "resnet_faces" if model == "resnet" else model
                try:
                    measure_model(served, name, payload, server, concs, args, work, results, gate)
                except (RuntimeError, OSError) as exc:
                    results.errors.append(f"{model}: {exc}")
                    log(f"  ERROR: {exc}")
    print(f"\noip_bench: {machine_line()}; Python {sys.version.split()[0]}")
    print(f"{time.monotonic() - began:.0f} s in all")
    report(results, concs, ["mlp", "resnet_faces"], args)
    if results.errors:
        print("\nERRORS:\n" + "\n".join(f"  {e}" for e in results.errors))
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(results), indent=2, default=str))
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
