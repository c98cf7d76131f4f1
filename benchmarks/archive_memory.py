"""Benchmark: `tsctl archive` streams, so archiving a 1 GiB model keeps peak RSS under 150 MB.

Run from the repository root:

    .venv/bin/python benchmarks/archive_memory.py [--size-mib 1024]
        [--formats default,zip-store,tgz,no-archive] [--reference/--no-reference] [--workdir DIR]

Writes an incompressible serialized file of the given size and a tiny handler.py into a
temporary directory, then archives them once per format with `tsctl archive` and (with
`--reference`, the default) with torch-model-archiver 0.12, side by side. Each archiver runs in
a fresh process under a small Python wrapper that reports the child's peak RSS
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`), its wall time and the bytes it wrote to disk
(`ru_oublock`). Prints a table, the tsctl/reference ratios, and `PASS`/`FAIL`; exits 1 on FAIL.
The temporary directory is removed at the end, even on failure.

This is a benchmark, not a test: it takes minutes (deflating 1 GiB is slow) and its timings
depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

FORMATS = ("default", "zip-store", "tgz", "no-archive")
SUFFIXES = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
LIMIT_BYTES = 150 * 1000 * 1000  # 150 MB
MIB = 1 << 20
BLOCK_BYTES = 64 * MIB  # deflate only sees 32 KiB back, so a repeated 64 MiB block stays random
TIMEOUT_S = 600.0
MODEL_NAME = "big"

# Runs argv[2:] with a timeout of argv[1] seconds; prints its exit code, wall time, peak RSS
# and bytes written to disk (ru_oublock, in 512-byte blocks: a staging copy shows up here).
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
try:
    proc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=float(sys.argv[1]))
    rc, err = proc.returncode, proc.stderr
except subprocess.TimeoutExpired as exc:
    rc, err = None, exc.stderr or b""
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": usage.ru_maxrss,
                  "written_blocks": usage.ru_oublock,
                  "stderr": err.decode(errors="replace")[-2000:]}))
"""


@dataclass(frozen=True)
class Result:
    tool: str
    fmt: str
    peak_rss_bytes: int
    wall_s: float
    output_bytes: int
    written_bytes: int
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="serialized file size")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated archive formats (default: {','.join(FORMATS)})",
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run torch-model-archiver with the same inputs (default: on)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the temp dir")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    if args.size_mib < 1:
        parser.error("--size-mib must be at least 1")
    args.formats = formats
    return args


def write_inputs(folder: Path, size_mib: int) -> tuple[Path, Path]:
    """An incompressible `big.pt` of `size_mib` MiB and a tiny `handler.py` in `folder`."""
    serialized = folder / f"{MODEL_NAME}.pt"
    block = os.urandom(min(BLOCK_BYTES, size_mib * MIB))
    remaining = size_mib * MIB
    with serialized.open("wb") as out:
        while remaining > 0:
            n = min(len(block), remaining)
            out.write(block[:n] if n < len(block) else block)
            remaining -= n
    handler = folder / "handler.py"
    handler.write_text(
        "from ts.torch_handler.base_handler import BaseHandler\n\n\n"
        "class Handler(BaseHandler):\n    pass\n"
    )
    return serialized, handler


def output_size(path: Path) -> int:
    if path.is_dir():
        return sum(
            (Path(folder) / name).stat().st_size
            for folder, _dirs, files in os.walk(path)
            for name in files
        )
    return path.stat().st_size if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_one(tool: str, exe: Path, fmt: str, serialized: Path, handler: Path, work: Path) -> Result:
    """Archive once with `exe` in a fresh process; measure it; delete the output."""
    export = work / f"out-{tool}-{fmt}"
    export.mkdir()
    command = [
        str(exe),
        *(["archive"] if tool == "tsctl" else []),
        "--model-name", MODEL_NAME,
        "--version", "1.0",
        "--serialized-file", str(serialized),
        "--handler", str(handler),
        "--archive-format", fmt,
        "--export-path", str(export),
        "-f",
    ]  # fmt: skip
    # torch-model-archiver stages a copy in $TMPDIR/<model-name>: keep it inside the work dir.
    staging = work / "tmp"
    staging.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(staging)}
    wrapper = [sys.executable, "-c", _WRAPPER, str(TIMEOUT_S), *command]
    try:
        done = subprocess.run(
            wrapper, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 60, check=True
        )
        report = json.loads(done.stdout)
        error = None
        if report["rc"] is None:
            error = f"timed out after {TIMEOUT_S:.0f} s"
        elif report["rc"] != 0:
            print(report["stderr"], file=sys.stderr)
            last_line = (report["stderr"].strip().splitlines() or [""])[-1]
            error = f"exit {report['rc']}: {last_line}"
        produced = export / f"{MODEL_NAME}{SUFFIXES[fmt]}"
        return Result(
            tool=tool,
            fmt=fmt,
            peak_rss_bytes=int(report["maxrss_kib"]) * 1024,
            wall_s=float(report["wall_s"]),
            output_bytes=output_size(produced),
            written_bytes=int(report["written_blocks"]) * 512,
            error=error,
        )
    finally:
        remove(export)
        remove(staging)


def print_table(results: list[Result]) -> None:
    header = (
        f"{'tool':<22} {'format':<11} {'peak RSS MiB':>12} {'wall s':>8} {'output MiB':>10} "
        f"{'written MiB':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.tool:<22} {r.fmt:<11} {r.peak_rss_bytes / MIB:>12.1f} {r.wall_s:>8.1f} "
            f"{r.output_bytes / MIB:>10.1f} {r.written_bytes / MIB:>11.1f}"
            + (f"  ERROR: {r.error}" if r.error else "")
        )


def print_ratios(results: list[Result], formats: list[str]) -> None:
    by_key = {(r.tool, r.fmt): r for r in results}
    print()
    print("tsctl / torch-model-archiver:")
    for fmt in formats:
        ours, ref = by_key.get(("tsctl", fmt)), by_key.get(("torch-model-archiver", fmt))
        if ours is None or ref is None or ours.error or ref.error:
            print(f"  {fmt:<11} n/a (a run failed)")
            continue
        rss = ours.peak_rss_bytes / ref.peak_rss_bytes
        wall = ours.wall_s / ref.wall_s
        print(f"  {fmt:<11} peak RSS x{rss:.2f}   wall time x{wall:.2f}")


def verdict(results: list[Result]) -> list[str]:
    """Reasons to fail; empty when every run worked and every tsctl row is under the limit."""
    problems = [f"{r.tool} {r.fmt} failed: {r.error}" for r in results if r.error]
    problems += [
        f"tsctl {r.fmt} peaked at {r.peak_rss_bytes / 1e6:.0f} MB"
        for r in results
        if r.tool == "tsctl" and r.peak_rss_bytes >= LIMIT_BYTES
    ]
    return problems


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bin_dir = Path(sys.executable).parent
    tools = [("tsctl", bin_dir / "tsctl")]
    if args.reference:
        tools.append(("torch-model-archiver", bin_dir / "torch-model-archiver"))
    for _name, exe in tools:
        if not exe.exists():
            print(f"not found: {exe}", file=sys.stderr)
            return 2

    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the finally below still cleans up
    work = Path(tempfile.mkdtemp(prefix="archive-memory-", dir=args.workdir))
    results: list[Result] = []
    try:
        print(f"writing {args.size_mib} MiB of random data to {work}", file=sys.stderr)
        serialized, handler = write_inputs(work, args.size_mib)
        for fmt in args.formats:
            for tool, exe in tools:
                print(f"running {tool} --archive-format {fmt} ...", file=sys.stderr, flush=True)
                result = run_one(tool, exe, fmt, serialized, handler, work)
                results.append(result)
                print(
                    f"  peak RSS {result.peak_rss_bytes / MIB:.1f} MiB, {result.wall_s:.1f} s"
                    + (f", ERROR: {result.error}" if result.error else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\narchiving a {args.size_mib} MiB serialized file (incompressible)\n")
    print_table(results)
    if args.reference:
        print_ratios(results, args.formats)
    print()
    problems = verdict(results)
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print("PASS: peak RSS < 150 MB in every tsctl row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
