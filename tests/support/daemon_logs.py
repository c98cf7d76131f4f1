"""The daemons' own logs, read after each test: an ERROR line or a traceback that the test did
not declare fails it (tests/conftest.py's `no_unexpected_error_logs`).

Every `Server` (tests/support/daemon.py) registers its log directory with `WATCHED.watch` when
it is made and when it starts. For each watched directory a `Watcher` keeps how far
`ts_log.log` and `model_log.log` have been checked, so a daemon shared by the tests of a module
(a module-scoped fixture) is checked test by test: each check reads only what was written since
the one before. What a module fixture's daemon logs while it starts belongs to the first test
that uses it, and what it logs while it stops to the check at the end of its module. A
directory is forgotten once its daemon's pid file is gone and its logs are read to the end.

An *entry* is one error: in `ts_log.log` a record at ERROR or CRITICAL with the lines that
follow it (a traceback), or a record of any level (or output that is no record) holding
`Traceback (most recent call last):`; in `model_log.log`, where each line of a worker's output
is a record, a traceback in a worker's output. A test that makes a daemon log such entries on
purpose says so with `@pytest.mark.daemon_errors(pattern, ...)`: each pattern is a regular
expression searched in an entry's text; it must match at least one entry of the test unless
the mark says `required=False` (for a race the test does not control), and an entry no pattern
matches fails the test.

A worker's output reaches `model_log.log` through a pipe and a buffer (up to 100 ms), so it
can land after the answer a test waited for: a check for a test that declared errors first
waits for the logs to settle; a late entry of another test is reported by the next check.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: the daemon's logs that are checked (access_log.log and the metrics logs hold no errors)
FILES = ("ts_log.log", "model_log.log")
#: a record's first line: `2026-11-25T07:55:10,327 [ERROR] name - message`
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3} \[(?P<level>[A-Z]+) *\] (?P<rest>.*)$")
#: the rest of a `model_log.log` record: `W-9000-m_1.0-stdout MODEL_LOG - a line of output`
MODEL_LINE = re.compile(r"^(?P<worker>\S+) MODEL_LOG - (?P<message>.*)$")
ERROR_LEVELS = ("ERROR", "CRITICAL")
TRACEBACK = "Traceback (most recent call last):"
#: the lines that join two tracebacks of one chain
CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
#: an entry's lines shown in a failure
SHOWN_LINES = 40


@dataclass(frozen=True)
class Entry:
    """One error in a daemon's log: the file, and its text (the record and its traceback)."""

    path: Path
    text: str

    def __str__(self) -> str:
        lines = self.text.splitlines()
        more = len(lines) - SHOWN_LINES
        tail = f"\n... ({more} more lines)" if more > 0 else ""
        return f"{self.path}:\n" + "\n".join(lines[:SHOWN_LINES]) + tail


@dataclass
class Expected:
    """The errors a test declared with `@pytest.mark.daemon_errors(*patterns, required=...)`."""

    patterns: list[re.Pattern[str]] = field(default_factory=list)
    required: list[re.Pattern[str]] = field(default_factory=list)

    def add(self, patterns: Sequence[str], required: bool = True) -> None:
        compiled = [re.compile(p) for p in patterns]
        self.patterns += compiled
        if required:
            self.required += compiled

    def problems(self, entries: Sequence[Entry]) -> list[str]:
        """Why `entries` fail the test: each one no pattern matches, each required pattern
        that matched none of them."""
        found = [
            f"unexpected error in a daemon's log {entry}"
            for entry in entries
            if not any(p.search(entry.text) for p in self.patterns)
        ]
        found += [
            f"daemon_errors pattern {p.pattern!r} matched no error in the daemons' logs"
            for p in self.required
            if not any(p.search(entry.text) for entry in entries)
        ]
        return found


def server_entries(lines: Iterable[str], path: Path) -> list[Entry]:
    """The errors among `ts_log.log`'s lines: each record with the lines that follow it."""
    records: list[tuple[str | None, list[str]]] = []
    for line in lines:
        match = RECORD.match(line)
        if match is not None:
            records.append((match["level"], [line]))
        elif records:
            records[-1][1].append(line)
        else:  # output before any record (a traceback printed before logging was set up)
            records.append((None, [line]))
    return [
        Entry(path, "\n".join(text))
        for level, text in records
        if level in ERROR_LEVELS or any(TRACEBACK in line for line in text)
    ]


def model_entries(lines: Iterable[str], path: Path) -> list[Entry]:
    """The errors among `model_log.log`'s lines: each traceback in a worker's output, from its
    first line up to the next traceback of that output that is not chained to it (a traceback
    has no end marker: TorchScript's go on past the exception line), and each record at ERROR
    or above that is not a worker's line."""
    entries: list[Entry] = []
    tracebacks: dict[str, list[str]] = {}  # worker output -> its open traceback's lines
    last: dict[str, str] = {}  # worker output -> its open traceback's last line not blank
    for line in lines:
        record = RECORD.match(line)
        parts = MODEL_LINE.match(record["rest"]) if record is not None else None
        if record is None or parts is None:
            if record is not None and record["level"] in ERROR_LEVELS:
                entries.append(Entry(path, line))
            continue
        worker, message = parts["worker"], parts["message"].strip()
        if message.startswith(TRACEBACK) and last.get(worker) not in CHAINED:
            if worker in tracebacks:
                entries.append(Entry(path, "\n".join(tracebacks.pop(worker))))
            tracebacks[worker] = []
        if worker in tracebacks:
            tracebacks[worker].append(line)
            last[worker] = message or last.get(worker, "")
    entries += [Entry(path, "\n".join(text)) for text in tracebacks.values()]
    return entries


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_new(path: Path, offset: int) -> tuple[list[str], int]:
    """The whole lines written to `path` after `offset`, and the offset past them."""
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) < offset:  # made again: read it from the start
                offset = 0
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1  # a line still being written is read by the next check
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end


class Watcher:
    """The log directories of the daemons that tests started, and how far each log has been
    checked."""

    def __init__(self) -> None:
        self.offsets: dict[Path, dict[str, int]] = {}  # log dir -> log file -> checked up to
        self.pid_files: dict[Path, Path] = {}  # log dir -> its daemon's pid file

    def watch(self, log_dir: Path, pid_file: Path) -> None:
        """Check `log_dir`'s logs from their current ends on, while the daemon that writes them
        holds `pid_file` (a directory already watched keeps its offsets)."""
        self.offsets.setdefault(log_dir, {name: _size(log_dir / name) for name in FILES})
        self.pid_files[log_dir] = pid_file

    def settle(self, quiet: float = 0.3, timeout: float = 3.0) -> None:
        """Wait until no watched log has grown for `quiet` seconds (at most `timeout`)."""
        deadline = time.monotonic() + timeout
        sizes, still_since = self._sizes(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - still_since < quiet:
            time.sleep(0.05)
            now = self._sizes()
            if now != sizes:
                sizes, still_since = now, time.monotonic()

    def _sizes(self) -> list[int]:
        return [_size(log_dir / name) for log_dir in self.offsets for name in FILES]

    def new_entries(self) -> list[Entry]:
        """The errors every watched daemon logged since the last call; forgets the directories
        of daemons that are gone, once read to the end."""
        found: list[Entry] = []
        for log_dir, offsets in self.offsets.items():
            for name in FILES:
                lines, offsets[name] = _read_new(log_dir / name, offsets[name])
                parse = model_entries if name == "model_log.log" else server_entries
                found += parse(lines, log_dir / name)
        for log_dir in [d for d, pid_file in self.pid_files.items() if not pid_file.exists()]:
            del self.offsets[log_dir], self.pid_files[log_dir]
        return found

    def check(self, expected: Expected) -> None:
        """Fail (AssertionError) on what the watched daemons logged since the last check that
        `expected` does not allow, or on an error `expected` requires that none logged."""
        if expected.patterns:
            self.settle()
        problems = expected.problems(self.new_entries())
        assert not problems, "\n\n".join(problems)


#: the daemons of this test session (`Server` registers each)
WATCHED = Watcher()
