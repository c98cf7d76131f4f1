"""The worker side of a multi-process instance: one rank of those torchrun started.

`python -m tsctl.worker 0 --ranks PATH` runs under torchrun (`tsctl.server.workers.torchrun`),
which gives each rank `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `RANK`, `WORLD_SIZE`, `MASTER_ADDR`
and `MASTER_PORT`; every rank inherits torchrun's stdin, the daemon's socket.

- Rank 0 keeps that socket and listens at PATH (in a folder only this user may enter) for the
  others. It reads the daemon's frames through a `Relay`, which writes each frame on to every
  other rank byte for byte as it is read: the `Assign`, the `Stop`, and with `parallelType`
  tp or pptp every `Batch` (TorchServe sends a pp model's batches to rank 0 only). Before it
  says `Hello` to the daemon it waits for every other rank's `Hello` (`Relay.gather`): the
  instance is ready when all of its ranks are, and one rank's `InitFailed` is the instance's.
- Every other rank gives its stdin up, connects to PATH and serves that connection as a
  worker serves the daemon's socket. Its answers reach rank 0, which reads and drops them
  (TorchServe's ranks other than 0 answer nothing; `send_intermediate_predict_response`
  sends from rank 0 only, as there).
- A tp or pptp batch that fails on any rank ends the instance: its ranks' collectives would be
  out of step (the next all-reduce pairing with a stale one). Rank 0 exits non-zero when a
  rank's answer is a failed batch (`_watch`), or after sending its own failed batch's answer
  (`Relay.batch_failed`); torchrun then stops every rank, and the daemon starts the instance
  anew, as for a rank that died.

No rank outlives its instance: each asks the kernel to kill it when torchrun dies
(PR_SET_PDEATHSIG), and when rank 0 ends, the others read the end of their connection and
exit. A rank that dies makes torchrun (`--max-restarts 0`) stop the others and exit.

The worker's main thread does everything here with blocking calls, before and between
batches; rank 0 has one thread per other rank reading (and dropping) what it sends.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace

from tsctl.ipc.codec import PREFIX, recv_message, send_message
from tsctl.ipc.messages import (
    Failure,
    FailureKind,
    Hello,
    InitFailed,
    Kind,
    Result,
    WorkerSpec,
)

log = logging.getLogger("tsctl.worker")
#: seconds rank 0 waits for the other ranks to connect, and they to reach it
CONNECT_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1
#: frames every rank gets; batches too where every rank runs them (`broadcast`)
_ALWAYS = frozenset({Kind.ASSIGN, Kind.STOP})
#: rank 0's relay (`join`): the worker's service tells it of a failed batch
current: Relay | None = None


@dataclass
class Rank:
    """This process's place in its instance, and the socket and stream it serves."""

    local_rank: int
    sock: socket.socket
    stream: io.BufferedReader
    relay: Relay | None  # rank 0 only

    def assigned(self, spec: WorkerSpec) -> WorkerSpec:
        """The spec this rank runs: with GPUs, its context's gpu_id is its LOCAL_RANK (its
        index among the instance's CUDA_VISIBLE_DEVICES)."""
        if self.relay is not None:
            self.relay.broadcast = spec.parallel_type in ("tp", "pptp")
        if spec.gpu_id is None:
            return spec
        return replace(spec, gpu_id=self.local_rank)

    def finish(self, code: int) -> None:
        """A rank other than 0 whose start failed gives rank 0 a moment to pass its
        `InitFailed` on before torchrun stops the instance."""
        if code and self.relay is None:
            self.sock.settimeout(10)
            with contextlib.suppress(OSError):
                self.sock.recv(1)


def join(daemon: socket.socket, path: str) -> Rank:
    """Take this rank's place (see the module): rank 0 listens at `path` and takes every other
    rank's connection; the others give up `daemon` (their stdin) and connect."""
    _die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_rank == 0:
        global current
        peers = _accept(path, world - 1)
        relay = current = Relay(daemon, peers)
        return Rank(0, daemon, io.BufferedReader(relay, 1 << 16), relay)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, daemon.fileno())  # the daemon's socket is rank 0's alone
    os.close(devnull)
    daemon.detach()
    sock = _connect(path, local_rank)
    stream = sock.makefile("rb", buffering=1 << 16)
    assert isinstance(stream, io.BufferedReader)
    return Rank(local_rank, sock, stream, None)


def _die_with_parent() -> None:
    """Be killed when torchrun dies, however it dies (Linux; elsewhere nothing)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        sys.exit("tsctl worker: torchrun exited before this rank started")


def _accept(path: str, count: int) -> list[socket.socket]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(count)
    listener.settimeout(CONNECT_TIMEOUT)
    peers = []
    try:
        for _ in range(count):
            peer, _ = listener.accept()
            peer.settimeout(None)
            peers.append(peer)
    except TimeoutError:
        sys.exit(f"tsctl worker: {count - len(peers)} rank(s) did not connect to rank 0")
    finally:
        listener.close()
        os.unlink(path)
    return peers


def _connect(path: str, local_rank: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                sys.exit(f"tsctl worker: rank {local_rank} could not reach rank 0")
            time.sleep(0.02)  # rank 0 has not bound its socket yet


class Relay(io.RawIOBase):
    """Rank 0's reading end of the daemon's socket: what is read is also written, frame by
    frame, to the other ranks that are to get it (their sockets are blocking: a rank that
    falls behind holds rank 0 back, never its memory)."""

    def __init__(self, daemon: socket.socket, peers: list[socket.socket]) -> None:
        super().__init__()
        self.daemon = daemon
        self.peers = peers
        self.broadcast = False  # batches too (tp, pptp); set once the spec is known
        self._head = bytearray()
        self._left = 0  # bytes of the current frame not read yet, after its prefix
        self._passing = False  # the current frame goes to the other ranks

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        read = self.daemon.recv_into(buffer)
        if read:
            self._pass(memoryview(buffer)[:read])
        return read

    def _pass(self, data: memoryview) -> None:
        while data:
            if self._left == 0:
                need = PREFIX.size - len(self._head)
                self._head += data[:need]
                data = data[need:]
                if len(self._head) < PREFIX.size:
                    return
                _, _, kind, meta_len, payload_len = PREFIX.unpack(self._head)
                self._passing = kind in _ALWAYS or (self.broadcast and kind == Kind.BATCH)
                self._left = meta_len + payload_len
                if self._passing:
                    self._send(self._head)
                self._head = bytearray()
            else:
                part = data[: self._left]
                data = data[self._left :]
                self._left -= len(part)
                if self._passing:
                    self._send(part)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        for peer in self.peers:
            with contextlib.suppress(OSError):  # that rank is gone: torchrun stops them all
                peer.sendall(data)

    def gather(self) -> Failure | None:
        """Wait for every other rank's `Hello`; the first `InitFailed` (or a rank that ended
        instead) is returned. Then read and drop what they send, on a thread each."""
        streams = [peer.makefile("rb") for peer in self.peers]  # read on by `_watch`
        for number, stream in enumerate(streams, start=1):
            try:
                said = recv_message(stream)
            except (EOFError, OSError) as exc:
                return Failure(
                    FailureKind.HANDLER_INIT, f"rank {number} ended during start-up: {exc}"
                )
            if isinstance(said, InitFailed):
                return said.failure
            if not isinstance(said, Hello):
                return Failure(
                    FailureKind.HANDLER_INIT, f"rank {number} sent {type(said).__name__}"
                )
        for number, stream in enumerate(streams, start=1):
            threading.Thread(target=_watch, args=(stream, number), daemon=True).start()
        return None

    def batch_failed(self, result: Result) -> None:
        """Rank 0's own batch failed (the worker's service calls it, main thread): with tp or
        pptp the other ranks may wait in a collective it never joined, so the answer is sent
        and the instance ends (see the module). A pp batch ran on rank 0 alone: nothing."""
        if not self.broadcast:
            return
        log.error(
            "batch %d failed on rank 0; ending the instance so that it restarts whole",
            result.batch_id,
        )
        with contextlib.suppress(OSError, TypeError, ValueError):
            send_message(self.daemon, result)
        _end()


def _watch(stream: io.BufferedReader, number: int) -> None:
    """Read what rank `number` sends, until its end, and drop it; a failed batch of its
    ends the instance (see the module). On a thread of its own."""
    while True:
        try:
            said = recv_message(stream)
        except Exception:  # its end, or a stream out of step: torchrun sees to its rank
            return
        if isinstance(said, Result) and said.failure is not None:
            log.error(
                "batch %d failed on rank %d (%s); ending the instance so that it restarts "
                "whole",
                said.batch_id, number, said.failure.message,
            )  # fmt: skip
            _end()


def _end() -> None:
    """Exit at once, non-zero: torchrun (`--max-restarts 0`) stops the other ranks."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(1)
