"""The daemon's log files, under TorchServe's names, in the log directory.

`ts_log.log` the server, `access_log.log` one line per request, `model_log.log` every
worker's stdout and stderr (handler prints and tracebacks), `model_metrics.log` per-batch
handler timings, `ts_metrics.log` periodic system metrics. Set up once at daemon start.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s [%(levelname)-5s] %(name)s - %(message)s"
MODEL_FORMAT = "%(asctime)s [%(levelname)-5s] %(worker)s MODEL_LOG - %(message)s"


class IsoFormatter(logging.Formatter):
    """TorchServe's (log4j's) ISO8601 timestamps: 2026-11-25T07:55:10,327."""

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s,%03d"


class DeferredHandler(logging.Handler):
    """Buffers records and writes them to `target` shortly after, in one go.

    For logs written on every request (the access log): a write per request costs the event
    loop more than the request's own routing. On the loop, records wait at most `delay`
    seconds; off the loop (start-up, shutdown) they are written at once.
    """

    def __init__(self, target: logging.Handler, delay: float = 0.1) -> None:
        super().__init__()
        self.target = target
        self.delay = delay
        self.buffer: list[logging.LogRecord] = []
        self.scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        self.buffer.append(record)
        if self.scheduled:
            return
        try:
            asyncio.get_running_loop().call_later(self.delay, self.flush)
            self.scheduled = True
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        self.scheduled = False
        records, self.buffer = self.buffer, []
        if not records:
            return
        target = self.target
        if isinstance(target, logging.FileHandler):  # one write for the lot
            if target.stream is None:
                target.stream = target._open()
            target.stream.write("".join(target.format(r) + "\n" for r in records))
            target.flush()
            return
        for record in records:
            target.handle(record)
        target.flush()

    def close(self) -> None:
        self.flush()
        self.target.close()
        super().close()


class LineLog:
    """A log written on every request (the access log), without the logging module's cost.

    Lines get TorchServe's ISO8601 timestamp and are written in one go shortly after (at most
    `delay` seconds), so a busy server makes one write call per batch of lines, not per line.
    Event-loop only; `flush()` at shutdown writes what is left.
    """

    def __init__(self, path: Path, delay: float = 0.1) -> None:
        self.path = path
        self.delay = delay
        self.lines: list[str] = []
        self.scheduled = False
        self._second = -1
        self._stamp = ""

    def write(self, text: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        self.lines.append(f"{self._stamp},{int(now * 1000) % 1000:03d} - {text}\n")
        if not self.scheduled:
            self.scheduled = True
            try:
                asyncio.get_running_loop().call_later(self.delay, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        if not self.lines:
            return
        text, self.lines = "".join(self.lines), []
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)


def _file_logger(
    name: str, path: Path, fmt: str, propagate: bool = False, deferred: bool = False
) -> logging.Logger:
    logger = logging.getLogger(name)
    handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(IsoFormatter(fmt))
    if deferred:
        handler = DeferredHandler(handler)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = propagate
    return logger


def setup(log_dir: Path, foreground: bool) -> LineLog:
    """Open the log files under TorchServe's names; returns the access log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    server = _file_logger("tsctl.server", log_dir / "ts_log.log", FORMAT)
    for name in ("tornado.access", "tornado.application", "tornado.general", "asyncio"):
        logging.getLogger(name).parent = server
    _file_logger("tsctl.model", log_dir / "model_log.log", MODEL_FORMAT, deferred=True)
    _file_logger(
        "tsctl.metrics.model",
        log_dir / "model_metrics.log",
        "%(asctime)s - %(message)s",
        deferred=True,
    )
    _file_logger("tsctl.metrics.ts", log_dir / "ts_metrics.log", "%(asctime)s - %(message)s")
    if foreground:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(IsoFormatter(FORMAT))
        server.addHandler(console)
    return LineLog(log_dir / "access_log.log")


def flush_all() -> None:
    """Write out every buffered record (before reading a log back, and at exit)."""
    for name in ("tsctl.model", "tsctl.metrics.model"):
        for handler in logging.getLogger(name).handlers:
            handler.flush()
