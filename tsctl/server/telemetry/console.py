"""The daemon's log on the console of the process that started it, as TorchServe does.

In `--foreground` that is the daemon's own stdout; in the background, the stdout that
`tsctl serve start` had, which the daemon keeps (`tsctl.local.launch`). Whoever reads it
(a terminal, `kubectl logs`, a test reading a pipe) sees the server's lines and the workers'
(a handler's traceback included).

Writing must never block the event loop: a reader that stops reading fills the pipe, and a
closed terminal fails every write. So records are formatted on the loop and handed to one
writer thread through a bounded queue; when the queue is full, lines are dropped (and
counted in the next line that gets through), and once a write fails (the reader is gone) the
console is given up for good. `close()` writes what is queued and stops the thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

#: lines waiting for the console; beyond this, new ones are dropped
QUEUE_LINES = 10_000


class ConsoleHandler(logging.Handler):
    def __init__(self, fd: int, formatter: logging.Formatter, own_fd: bool) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.fd = fd
        self.own_fd = own_fd  # close it at the end (a kept copy of the starter's stdout)
        self.lines: queue.Queue[str | None] = queue.Queue(QUEUE_LINES)
        self.dropped = 0
        self.broken = False
        self.thread = threading.Thread(target=self._write_lines, name="console", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        try:
            text = self.format(record) + "\n"
        except Exception:  # a record that cannot be formatted: the files say so already
            return
        if self.dropped:
            text = f"[{self.dropped} console lines dropped: nobody was reading]\n" + text
        try:
            self.lines.put_nowait(text)
            self.dropped = 0
        except queue.Full:
            self.dropped += 1

    def _write_lines(self) -> None:
        while (text := self.lines.get()) is not None:
            data = text.encode("utf-8", "replace")
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:  # the reader went away (EPIPE, EIO): stop writing
                self.broken = True
                break
        if self.own_fd:
            os.close(self.fd)

    def close(self) -> None:
        if not self.broken:
            with contextlib.suppress(queue.Full):  # a reader that stopped: give up
                self.lines.put(None, timeout=5)
        self.thread.join(timeout=5)
        super().close()
