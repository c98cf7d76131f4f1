"""Worker process entry point: `python -m tsctl.worker SPEC_JSON`.

Started by the frontend only. SPEC_JSON names the socket's file descriptor (inherited), the
model and its directory, and the settings the handler's context exposes. The worker reports
`Hello` once its handler is initialized (or `InitFailed` with the error), then answers each
`Batch` with a `Result` until it reads `Stop` or its socket closes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import traceback
from typing import Any

from tsctl import __version__
from tsctl.protocol import (
    Batch,
    Describe,
    Failure,
    Hello,
    InitFailed,
    Stop,
    recv_message,
    send_message,
)
from tsctl.worker.context import Context
from tsctl.worker.loader import HandlerLoadError, load_entry
from tsctl.worker.metrics import MetricsCache
from tsctl.worker.service import Service


def _set_threads(threads: int) -> None:
    if threads > 0 and "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def serve(spec: dict[str, Any]) -> int:
    sock = socket.socket(fileno=int(spec["fd"]))
    stream = sock.makefile("rb", buffering=1 << 16)  # a BufferedReader: has readinto
    log = logging.getLogger("tsctl.worker")
    context = Context(
        model_name=spec["model_name"],
        model_dir=spec["model_dir"],
        manifest=spec["manifest"],
        batch_size=int(spec["batch_size"]),
        gpu=spec.get("gpu_id"),
        server_version=__version__,
        model_yaml_config=spec.get("model_yaml_config") or {},
    )
    context.metrics = MetricsCache(spec["model_name"])
    threads = int(spec.get("threads", 0))
    try:
        # OMP_NUM_THREADS (set in main) covers torch ops run inside initialize()
        entry = load_entry(spec["handler"], spec["model_dir"], context)
        _set_threads(threads)
    except BaseException as exc:
        detail = traceback.format_exc()
        log.error("loading handler %r failed:\n%s", spec["handler"], detail)
        kind = "HandlerLoadError" if isinstance(exc, HandlerLoadError) else "HandlerInitError"
        message = f"{type(exc).__name__}: {exc}" if kind == "HandlerInitError" else str(exc)
        send_message(sock, InitFailed(Failure(kind, message, detail)))
        return 1
    service = Service(entry, context)
    send_message(sock, Hello(os.getpid()))
    log.info("worker ready (pid %d)", os.getpid())
    while True:
        try:
            incoming = recv_message(stream)  # type: ignore[arg-type]
        except EOFError:
            return 0
        if isinstance(incoming, Stop):
            return 0
        if isinstance(incoming, Batch):
            result = service.run(incoming, lambda chunk: send_message(sock, chunk))
            send_message(sock, result)
        elif isinstance(incoming, Describe):
            send_message(sock, service.describe())


def main() -> None:
    spec = json.loads(sys.argv[1])
    threads = int(spec.get("threads", 0))
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # like TorchServe's workers: logging goes to stdout, which the frontend copies into
    # model_log.log line by line (stderr lines are marked as warnings there)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    sys.exit(serve(spec))


if __name__ == "__main__":
    main()
