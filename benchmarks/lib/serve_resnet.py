"""serve_bench's section (b): resnet_faces (examples/resnet_faces), batch size 8, one worker,
concurrency 16, one JPEG per request, served images/s against a plain in-process loop that
calls the same handler on batches of 8 raw JPEGs with the worker's torch thread count.

The loop runs before, between and after the servers; each server is divided by the mean of
the two loops around it, so host-side drift during the section hits both sides of its ratio.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
from pathlib import Path

from benchmarks.lib.archives import RESNET_DIR
from benchmarks.lib.load import Load, run_wrk
from benchmarks.lib.quiet import QuietGate
from benchmarks.lib.script import log, run_checked
from benchmarks.lib.serve_plan import Plan, ResnetResult, Results
from benchmarks.lib.servers import Server, running, threads_for

_RESNET_LOOP = r"""
import importlib.util, json, sys, time, types, warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
handler_path, model_dir, serialized, image, threads, batch, warmup, duration = sys.argv[1:9]
torch.set_num_threads(int(threads))
spec = importlib.util.spec_from_file_location("bench_handler", handler_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
classes = [c for c in vars(module).values()
           if isinstance(c, type) and c.__module__ == module.__name__]
assert len(classes) == 1, classes
handler = classes[0]()
context = types.SimpleNamespace(
    system_properties={"model_dir": model_dir, "batch_size": int(batch), "gpu_id": None},
    manifest={"model": {"serializedFile": serialized}},
)
handler.initialize(context)
with open(image, "rb") as fh:
    raw = fh.read()
batch = int(batch)
def rows():
    return [{"body": bytearray(raw)} for _ in range(batch)]
end = time.perf_counter() + float(warmup)
while time.perf_counter() < end:
    handler.handle(rows(), context)
count, start = 0, time.perf_counter()
end = start + float(duration)
while True:
    answers = handler.handle(rows(), context)
    assert len(answers) == batch
    count += batch
    now = time.perf_counter()
    if now >= end:
        break
print(json.dumps({"items": count, "seconds": now - start, "threads": torch.get_num_threads()}))
"""


def resnet_loop(python: Path, work: Path, image: Path, threads: int, plan: Plan) -> Load:
    model_dir = work / "resnet"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = run_checked(
        [
            python, "-c", _RESNET_LOOP, RESNET_DIR / "handler.py", model_dir,
            "resnet_faces.pt", image, threads, 8, plan.warmup, plan.resnet_duration,
        ],
        timeout=plan.resnet_duration + plan.warmup + 120,
        env=env,
    )  # fmt: skip
    report = json.loads(out.strip().splitlines()[-1])
    seconds = float(report["seconds"])
    return Load(requests=int(report["items"]), seconds=seconds, rps=report["items"] / seconds)


def section_resnet(
    plan: Plan,
    servers: dict[str, Server],
    python: Path,
    work: Path,
    results: Results,
    gate: QuietGate,
) -> None:
    image = work / "images" / "face_a.jpg"
    threads = threads_for(1)
    res = ResnetResult(loop_threads=threads)
    results.resnet = res

    def loop(label: str) -> float:
        log(f"(b) plain loop ({label}), {threads} torch threads")
        load = gate.measured(
            lambda: resnet_loop(python, work, image, threads, plan), None, plan.retries, "loop"
        )
        res.loop_items_s.append(load.rps)
        res.loop_other_cores.append(load.other_cores)
        log(f"    {load.rps:.1f} images/s (others used {load.other_cores:.2f} cores)")
        return load.rps

    # loop, server, loop, server, loop: each server is judged against the loops around it
    before = loop("first")
    for name in plan.servers:
        server = servers[name]
        log(f"(b) resnet_faces: {name}")
        try:
            with running(server, "resnet_faces.mar", "resnet_faces", 1, threads):
                res.threads[name] = server.worker_threads()
                run_wrk(
                    server.inference_port, "/predictions/resnet_faces", image,
                    "image/jpeg", 16, plan.warmup, 30,
                )  # fmt: skip
                load = gate.measured(
                    functools.partial(
                        run_wrk, server.inference_port, "/predictions/resnet_faces", image,
                        "image/jpeg", 16, plan.resnet_duration, 30,
                    ),
                    server.root_pid, plan.retries, name,
                )  # fmt: skip
                res.served[name] = load
                log(f"    {load.rps:.1f} images/s, p99 {load.p99_ms:.0f} ms {load.problems()}")
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            results.errors.append(f"(b) {name}: {exc}")
            log(f"  ERROR: {exc}")
        after = loop(f"after {name}")
        res.loop_base[name] = (before + after) / 2
        before = after
