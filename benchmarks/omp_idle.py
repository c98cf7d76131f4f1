"""Benchmark: what torch's idle OpenMP threads cost a worker's neighbours (issue 16, item 4).

Run from the repository root (about 2 minutes on 2 cores):

    .venv/bin/python benchmarks/omp_idle.py [--variant NAME=VALUE[,NAME=VALUE]|- ...]
        [--rounds N] [--batches N] [--gap-ms MS] [--threads N] [--alone] [--venv .venv]
        [--keep]

resnet_faces (examples/resnet_faces) runs in-process as a worker runs it: its handler on
batches of 8 raw JPEGs with `--threads` torch threads, each batch followed by `--gap-ms` of
sleep (the worker waiting for its next batch). Beside it a busy Python process stands for the
daemon and counts the loop turns it gets (`--alone`: no neighbour, the cores all the
worker's, as in a plain loop). Each variant is one fresh process with those
variables in its environment (libgomp reads them once, when torch loads it); the variants
run in `--rounds` rounds, their order reversed every other round.

Per run: the median wall time of a batch, the worker's CPU per batch while it runs and
while it waits (the spin after the last parallel region), and the neighbour's turns per
second, relative to the first variant of the same round. The default variants are libgomp's
default, `OMP_WAIT_POLICY=PASSIVE` and `GOMP_SPINCOUNT` 10,000 and 100,000.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: benchmarks.lib

from benchmarks.lib.archives import RESNET_DIR
from benchmarks.lib.procs import machine_line
from benchmarks.lib.script import ROOT, log, run_checked, workspace

_WORKER = r"""
import importlib.util, json, os, statistics, sys, time, types, warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
handler_path, model_dir, image, threads, gap_ms, batches = sys.argv[1:7]
torch.set_num_threads(int(threads))
spec = importlib.util.spec_from_file_location("bench_handler", handler_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handler = [c for c in vars(module).values()
           if isinstance(c, type) and c.__module__ == module.__name__][0]()
context = types.SimpleNamespace(
    system_properties={"model_dir": model_dir, "batch_size": 8, "gpu_id": None},
    manifest={"model": {"serializedFile": "resnet_faces.pt"}},
)
handler.initialize(context)
raw = open(image, "rb").read()
def rows():
    return [{"body": bytearray(raw)} for _ in range(8)]
for _ in range(3):
    handler.handle(rows(), context)
print("go", flush=True)
walls, busy, idle = [], [], []
for _ in range(int(batches)):
    t0, c0 = time.perf_counter(), time.process_time()
    handler.handle(rows(), context)
    t1, c1 = time.perf_counter(), time.process_time()
    time.sleep(float(gap_ms) / 1000)
    walls.append(t1 - t0)
    busy.append(c1 - c0)
    idle.append(time.process_time() - c1)
print(json.dumps({
    "wall_ms": statistics.median(walls) * 1e3,
    "busy_cpu_ms": statistics.mean(busy) * 1e3,
    "idle_cpu_ms": statistics.mean(idle) * 1e3,
    "threads": len(os.listdir("/proc/self/task")),
}), flush=True)
"""

_NEIGHBOUR = r"""
import select, sys, time
turns, start = 0, time.perf_counter()
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(10000):
        pass
    turns += 10000
print(turns / (time.perf_counter() - start), flush=True)
"""


def run_variant(
    python: Path, work: Path, env: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    """One worker run beside one busy neighbour: the worker's figures and the neighbour's."""
    variables = {**os.environ, **env, "OMP_NUM_THREADS": str(args.threads)}
    worker = subprocess.Popen(
        [
            str(python), "-c", _WORKER, str(RESNET_DIR / "handler.py"), str(work / "resnet"),
            str(work / "images" / "face_a.jpg"), str(args.threads), str(args.gap_ms),
            str(args.batches),
        ],
        env=variables, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "go", "the worker did not start"
    if args.alone:
        report: dict[str, float] = json.loads(worker.stdout.readline())
        report["neighbour_turns_s"] = 1.0
        worker.wait(30)
        return report
    neighbour = subprocess.Popen(
        [str(python), "-c", _NEIGHBOUR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    report = json.loads(worker.stdout.readline())
    assert neighbour.stdin is not None and neighbour.stdout is not None
    neighbour.stdin.write("stop\n")
    neighbour.stdin.flush()
    report["neighbour_turns_s"] = float(neighbour.stdout.readline())
    neighbour.wait(30)
    worker.wait(30)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alone", action="store_true", help="no busy neighbour")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="tsctl's venv")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    texts = args.variant or [
        "-", "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=10000", "GOMP_SPINCOUNT=100000"
    ]  # fmt: skip
    variants = [
        (text, {} if text == "-" else dict(item.split("=", 1) for item in text.split(",")))
        for text in texts
    ]
    python = args.venv / "bin" / "python"
    print(f"omp_idle: {machine_line()}; Python {sys.version.split()[0]}")
    print(
        f"resnet_faces, batch 8, {args.threads} threads, {args.gap_ms:g} ms between batches, "
        + ("alone" if args.alone else "beside a busy neighbour")
    )
    with workspace("omp-idle-", None, args.keep) as work:
        (work / "resnet").mkdir()
        run_checked(
            [python, RESNET_DIR / "build_model.py", "--out", work / "resnet" / "resnet_faces.pt"],
            timeout=300,
        )
        run_checked([python, RESNET_DIR / "make_images.py", "--out-dir", work / "images"], 120)
        print(
            f"{'round':>5} {'variant':<26} {'batch ms':>9} {'÷ first':>8} {'cpu ms busy':>12} "
            f"{'cpu ms idle':>12} {'neighbour':>10} {'÷ first':>8}"
        )
        for index in range(args.rounds):
            order = variants if index % 2 == 0 else variants[::-1]
            first: dict[str, float] | None = None
            for name, env in order:
                log(f"round {index + 1}: {name} ({time.strftime('%H:%M:%S')})")
                got = run_variant(python, work, env, args)
                first = first or got
                print(
                    f"{index + 1:>5} {name:<26} {got['wall_ms']:>9.1f} "
                    f"{got['wall_ms'] / first['wall_ms']:>8.2f} {got['busy_cpu_ms']:>12.1f} "
                    f"{got['idle_cpu_ms']:>12.2f} {got['neighbour_turns_s'] / 1e6:>9.1f}M "
                    f"{got['neighbour_turns_s'] / first['neighbour_turns_s']:>8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
