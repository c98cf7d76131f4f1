"""Worker process entry point: `python -m tsctl.worker FD [--preload]`.

Started by the frontend only, with one end of a socketpair inherited as FD. The first frame it
reads is `Assign`: the model, its directory and the settings the handler's context exposes.
The worker reports `Hello` once its handler is initialized (or `InitFailed` with the error),
then answers each `Batch` with a `Result` until it reads `Stop` or its socket closes.
A model with `asyncCommunication: true` is served by `tsctl.worker.async_service` instead
(an event loop, several batches in flight at once, each answered when it is done).

Nothing in a frame ends the worker: a frame it cannot read (read to its end, `FrameRejected`)
and any exception while running a batch (beyond the handler's own, which `Service` reports)
are answered with a failure for that batch, and the worker reads the next frame. Only a
broken stream (a bad frame prefix, the socket closed) ends it.

With `--preload` (a spare started before its model is known, see `tsctl.server.workers.spares`) it
imports torch on a background thread while it waits: a handler that needs torch then finds it
imported, or waits on the import lock for the rest; one that does not is not held up.

The garbage collector is off until the handler is initialized: importing torch creates
hundreds of thousands of objects, none of them garbage, and collecting while it does so costs
about a tenth of the import. What start-up built is then frozen (`gc.freeze`), so the
collections made while serving do not walk torch's modules again and again.
"""

from __future__ import annotations

import functools
import gc
import io
import logging
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable

from tsctl import __version__
from tsctl.ipc.codec import FrameRejected, recv_message, send_message
from tsctl.ipc.messages import (
    Assign,
    Batch,
    Describe,
    Described,
    Failure,
    FailureKind,
    Hello,
    InitFailed,
    Kind,
    Result,
    Stop,
    WorkerSpec,
)
from tsctl.worker import async_service, envelope, ranks
from tsctl.worker.context import Context
from tsctl.worker.loader import HandlerLoadError, load_entry
from tsctl.worker.metrics import MetricsCache
from tsctl.worker.service import Service
from tsctl.worker.threads import Threads, ThreadTuner

_Fallback = Callable[[Failure], Result | Described]


def _preload(done: threading.Event) -> None:
    try:
        import torch  # noqa: F401
    except Exception:  # the handler meets the same error and reports it
        pass
    finally:
        done.set()


def serve(
    sock: socket.socket,
    stream: io.BufferedReader,
    spec: WorkerSpec,
    preloading: threading.Event | None,
    relay: ranks.Relay | None = None,
) -> int:
    log = logging.getLogger("tsctl.worker")
    context = Context(
        model_name=spec.model_name,
        model_dir=spec.model_dir,
        manifest=dict(spec.manifest),
        batch_size=spec.batch_size,
        gpu=spec.gpu_id,
        limit_max_image_pixels=spec.limit_max_image_pixels,
        server_version=__version__,
        model_yaml_config=dict(spec.model_yaml_config),
    )
    context.metrics = MetricsCache(spec.model_name, spec.declared_metrics)
    threads = Threads(spec.threads, preloading)
    tuner = ThreadTuner(threads) if spec.tune_threads and not spec.async_communication else None
    try:
        threads.apply()  # torch ops inside initialize() too, when torch is already imported
        dep_path = spec.dep_path
        if dep_path:  # after the model folder and tsctl's `ts`, which load_entry put first
            sys.path.insert(0, dep_path)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (dep_path, os.environ.get("PYTHONPATH")) if p
            )
        # asyncCommunication: the loop exists before the handler loads (see async_service)
        loop = async_service.new_loop() if spec.async_communication else None
        awaits = loop.run_until_complete if loop is not None else None
        entry = load_entry(spec.handler, spec.model_dir, context, awaits)
        entry = envelope.wrap(entry, spec.service_envelope)
        threads.apply()
    except BaseException as exc:
        detail = traceback.format_exc()
        log.error("loading handler %r failed:\n%s", spec.handler, detail)
        if isinstance(exc, HandlerLoadError):
            kind, message = FailureKind.HANDLER_LOAD, str(exc)
        else:
            kind, message = FailureKind.HANDLER_INIT, f"{type(exc).__name__}: {exc}"
        send_message(sock, InitFailed(Failure(kind, message, detail)))
        return 1
    service = Service(entry, context)
    gc.freeze()
    gc.enable()
    failed = relay.gather() if relay is not None else None  # rank 0: every rank is ready
    if failed is not None:
        send_message(sock, InitFailed(failed))
        return 1
    send_message(sock, Hello(os.getpid()))
    log.info("worker ready (pid %d, %s threads)", os.getpid(), spec.threads or "default")
    if loop is not None:
        return async_service.serve(
            sock, stream, service, loop, threads.apply, functools.partial(_send, sock)
        )
    while True:
        try:
            incoming = recv_message(stream, recover=True)
        except EOFError:
            return 0
        except FrameRejected as exc:
            log.error("could not read a frame of kind %d: %s", exc.kind, exc)
            _answer_rejected(sock, exc)
            continue
        if isinstance(incoming, Stop):
            return 0
        if isinstance(incoming, Batch):
            if threads.pending:
                threads.apply()
            if tuner is None or tuner.done:
                _answer(sock, incoming, service)
                continue
            tuner.before()
            result = _answer(sock, incoming, service)
            if result.failure is None:  # per answered request (undecodable ones never ran)
                tuner.after(result.handler_ms, sum(r.failure is None for r in result.responses))
        elif isinstance(incoming, Describe):
            _send(sock, service.describe(), lambda failure: Described(failure=failure))


def _answer(sock: socket.socket, batch: Batch, service: Service) -> Result:
    """Run one batch and send its result (returned); whatever goes wrong, the batch gets an
    answer."""
    try:
        result = service.run(batch, lambda chunk: send_message(sock, chunk))
    except OSError:
        raise  # the socket is gone: nothing can be answered
    except Exception as exc:
        logging.getLogger("tsctl.worker").error(
            "running a batch failed:\n%s", traceback.format_exc()
        )
        failure = Failure(FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
        result = Result(batch.batch_id, failure=failure)
    _send(sock, result, lambda failure: Result(batch.batch_id, failure=failure))
    return result


def _send(sock: socket.socket, message: Result | Described, instead: _Fallback) -> None:
    """Send `message`; one that cannot be encoded (a handler's header value that is no JSON
    type) is replaced by the failure `instead` builds. Encoding happens before anything is
    written, so the stream stays in step."""
    try:
        send_message(sock, message)
    except (TypeError, ValueError) as exc:
        failure = Failure(FailureKind.BAD_OUTPUT, f"the answer could not be sent: {exc}")
        send_message(sock, instead(failure))


def _answer_rejected(sock: socket.socket, rejected: FrameRejected) -> None:
    """The frontend waits for one answer per batch or describe call, in order."""
    failure = Failure(FailureKind.BAD_FRAME, f"the worker could not read the request: {rejected}")
    if rejected.kind == Kind.BATCH:
        send_message(sock, Result(0, failure=failure))
    elif rejected.kind == Kind.DESCRIBE:
        send_message(sock, Described(failure=failure))


def main() -> None:
    gc.disable()  # until the handler is initialized (see the module's docstring)
    sock = socket.socket(fileno=int(sys.argv[1]))
    preloading: threading.Event | None = None
    if "--preload" in sys.argv[2:]:
        preloading = threading.Event()
        threading.Thread(target=_preload, args=(preloading,), daemon=True).start()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # like TorchServe's workers: logging goes to stdout, which the frontend copies into
    # model_log.log line by line (stderr lines are marked as warnings there)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    rank: ranks.Rank | None = None
    if "--ranks" in sys.argv[2:]:  # one rank of a multi-process instance
        rank = ranks.join(sock, sys.argv[sys.argv.index("--ranks") + 1])
        sock = rank.sock
    stream = rank.stream if rank is not None else sock.makefile("rb", buffering=1 << 16)
    assert isinstance(stream, io.BufferedReader)  # has readinto, which recv_message uses
    try:
        first = recv_message(stream)
    except EOFError:
        sys.exit(0)  # a spare that was never assigned
    if not isinstance(first, Assign):
        sys.exit(f"tsctl worker: expected an Assign frame first, got {type(first).__name__}")
    spec = first.spec if rank is None else rank.assigned(first.spec)
    threads = spec.threads
    if threads > 0:  # for what the handler starts, and torch ops before it is applied
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    code = serve(sock, stream, spec, preloading, rank.relay if rank is not None else None)
    if rank is not None:
        rank.finish(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
