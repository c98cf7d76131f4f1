"""The daemon's log files, under TorchServe's names.

In the log directory (`LOG_LOCATION`): `ts_log.log` the server, `access_log.log` one line
per request, `model_log.log` every worker's stdout and stderr (handler prints and
tracebacks). In the metrics directory (`METRICS_LOCATION`, else the log directory):
`ts_metrics.log` the server's metric lines and `model_metrics.log` the handlers' (see
`prometheus.py` for which metrics are written in which `metrics_mode`). The server's and the
models' lines also go to the console (`console.py`) unless `console_log` is off. Set up once
at daemon start, on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = "%(asctime)s [%(levelname)-5s] %(name)s - %(message)s"
MODEL_FORMAT = "%(asctime)s [%(levelname)-5s] %(worker)s MODEL_LOG - %(message)s"


class IsoFormatter(logging.Formatter):
    """TorchServe's (log4j's) ISO8601 timestamps: 2026-11-25T07:55:10,327."""

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s,%03d"


class ConsoleFormatter(IsoFormatter):
    """The server's lines as in ts_log.log, the workers' as in model_log.log."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self.model = IsoFormatter(MODEL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.model.format(record) if hasattr(record, "worker") else super().format(record)


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
    """A log written line by line by the daemon itself (the access log, the metric logs),
    without the logging module's cost, with TorchServe's ISO8601 timestamps.

    The file is created at once (TorchServe creates its log files at start-up) and kept open.
    Lines are never written one by one on the event loop: they are buffered and written in
    one call. With `delay` 0 the buffer is written at the end of the current turn of the
    event loop (`call_soon`: before the loop waits for I/O again, and before whatever the
    code that wrote a line schedules after it, e.g. the response a metric line belongs
    to); with `delay` > 0 at most `delay` seconds later. A buffer that reaches `MAX_LINES`
    is written at once. Off the event loop (start-up, shutdown, tests) each line is written
    as it comes. Event-loop only; `flush()` writes what is buffered (shutdown calls it
    through `Logs.close`).
    """

    #: lines held at most before the buffer is written, whatever the delay
    MAX_LINES = 4096

    def __init__(self, path: Path, delay: float = 0.1) -> None:
        self.path = path
        self.delay = delay
        self.lines: list[str] = []
        self.scheduled = False
        #: the timestamp text ("2026-11-25T07:55:10,327 - ") of the millisecond `_millis`
        self._millis = -1
        self._prefix = ""
        self._second = -1
        self._stamp = ""
        self._second_text = ""
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held until close()

    def write(self, text: str) -> None:
        millis = int(time.time() * 1000)
        if millis != self._millis:
            self._stamp_millis(millis)
        self.lines.append(f"{self._prefix}{text}\n")
        if not self.scheduled or len(self.lines) >= self.MAX_LINES:
            self._schedule()

    def write_metric(self, head: str, value: float, tail: str) -> None:
        """A metric line: `head`, `repr(value)`, `tail`, then the epoch second of the line's
        own timestamp (TorchServe's metric lines end with `timestamp:<seconds>`): one clock
        reading for both, one string built."""
        millis = int(time.time() * 1000)
        if millis != self._millis:
            self._stamp_millis(millis)
        self.lines.append(f"{self._prefix}{head}{value!r}{tail}{self._second_text}\n")
        if not self.scheduled or len(self.lines) >= self.MAX_LINES:
            self._schedule()

    def _stamp_millis(self, millis: int) -> None:
        """The timestamp text of this millisecond (the date's once per second)."""
        self._millis = millis
        second = millis // 1000
        if second != self._second:
            self._second = second
            self._second_text = str(second)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        self._prefix = f"{self._stamp},{millis % 1000:03d} - "

    def _schedule(self) -> None:
        if self.scheduled:  # the buffer is full: write it now, the timer stays armed
            self.flush(keep_scheduled=True)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the loop: at once
            self.flush()
            return
        self.scheduled = True
        if self.delay:
            loop.call_later(self.delay, self.flush)
            return
        global _END_OF_TURN_LOOP
        if not _END_OF_TURN or _END_OF_TURN_LOOP is not loop:  # one callback for them all
            _END_OF_TURN_LOOP = loop
            loop.call_soon(_flush_end_of_turn)
        _END_OF_TURN.append(self)

    def settle(self) -> None:
        """Without a delay: write the buffer now rather than at the end of the turn. Called
        before a batch's answers are sent, so its metric lines are in the file before a
        client that has its answer reads it (TorchServe writes them synchronously)."""
        if not self.delay and self.lines:
            self.flush(keep_scheduled=self.scheduled)

    def flush(self, keep_scheduled: bool = False) -> None:
        if not keep_scheduled:
            self.scheduled = False
        if not self.lines or self._file.closed:
            return
        text, self.lines = "".join(self.lines), []
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


#: the logs without a delay that have lines to write at the end of this turn of the loop
_END_OF_TURN: list[LineLog] = []
_END_OF_TURN_LOOP: asyncio.AbstractEventLoop | None = None  # the loop its callback is on


def _flush_end_of_turn() -> None:
    due = _END_OF_TURN[:]
    _END_OF_TURN.clear()
    for line_log in due:
        line_log.flush()


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


@dataclass
class Logs:
    """The logs the daemon writes itself; the server and model logs go through `logging`."""

    access: LineLog
    server_metrics: LineLog
    model_metrics: LineLog

    def flush(self) -> None:
        for name in ("tsctl.server", "tsctl.model"):
            for handler in logging.getLogger(name).handlers:
                handler.flush()
        for line_log in (self.access, self.server_metrics, self.model_metrics):
            line_log.flush()

    def close(self) -> None:
        self.flush()
        for line_log in (self.access, self.server_metrics, self.model_metrics):
            line_log.close()


def setup(
    log_dir: Path,
    metrics_dir: Path | None = None,
    console: logging.Handler | None = None,
    async_logging: bool = False,
) -> Logs:
    """Open the log files under TorchServe's names: ts_log.log, access_log.log and
    model_log.log in `log_dir`, ts_metrics.log and model_metrics.log in `metrics_dir`
    (`log_dir` when None). `console` also gets the server's and the models' lines.
    With `async_logging` the metric lines are written in batches, shortly after."""
    metrics_dir = metrics_dir or log_dir
    for folder in (log_dir, metrics_dir):
        folder.mkdir(parents=True, exist_ok=True)
    server = _file_logger("tsctl.server", log_dir / "ts_log.log", FORMAT)
    for name in ("tornado.access", "tornado.application", "tornado.general", "asyncio"):
        logging.getLogger(name).parent = server
    model = _file_logger("tsctl.model", log_dir / "model_log.log", MODEL_FORMAT, deferred=True)
    if console is not None:
        server.addHandler(console)
        model.addHandler(console)
    delay = 0.1 if async_logging else 0.0
    return Logs(
        access=LineLog(log_dir / "access_log.log"),
        server_metrics=LineLog(metrics_dir / "ts_metrics.log", delay),
        model_metrics=LineLog(metrics_dir / "model_metrics.log", delay),
    )
