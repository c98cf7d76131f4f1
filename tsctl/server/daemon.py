"""The daemon process: one asyncio loop running the HTTP APIs, the registry and the workers.

`tsctl serve start` launches it through `tsctl.local.launch` (a fork of the CLI),
which starts spare workers first (or runs it in-process with `--foreground`). Start-up binds
every API first (so a port in use fails at once), writes the pid file, loads the start-up
models, then reports readiness on the notify pipe as one JSON line: `{"ok": true, ...}` or
`{"ok": false, "error": ...}`. SIGTERM and SIGINT drain: stop accepting, let in-flight requests
finish (bounded by `drain_timeout`), stop the workers, remove the pid file, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tsctl.errors import InvalidInput, TsctlError
from tsctl.local import pidfile
from tsctl.local.lifecycle import started_line, tail
from tsctl.plugins import loader
from tsctl.server import snapshot, tls
from tsctl.server.auth import TokenAuth
from tsctl.server.config import ServerConfig, parse_address
from tsctl.server.plugins import ServerPlugins
from tsctl.server.registry import Registry
from tsctl.server.settings import LoadOptions
from tsctl.server.state import ServerState
from tsctl.server.telemetry import declared, logs
from tsctl.server.telemetry.console import ConsoleHandler
from tsctl.server.telemetry.metric_log import MetricLog
from tsctl.server.telemetry.prometheus import Metrics
from tsctl.server.workers.spares import Spares

log = logging.getLogger("tsctl.server")


def _bind(address: str, what: str) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    host, port = parse_address(address)
    try:
        return bind_sockets(port, address=host, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InvalidInput(f"{what} address {host}:{port} is already in use") from None
        raise InvalidInput(
            f"cannot listen on {what} address {host}:{port}: {exc.strerror}"
        ) from None


def _address_of(sockets: list[socket.socket], secure: bool = False) -> str:
    host, port = sockets[0].getsockname()[:2]
    return f"{'https' if secure else 'http'}://{host}:{port}"


def startup_models(config: ServerConfig) -> list[tuple[str | None, str]]:
    """(name override, archive path) for each `--models` entry; `all` expands the store."""
    found: list[tuple[str | None, str]] = []
    for entry in config.load_models:
        if entry == "all":
            store = config.model_store
            if store is None:
                raise InvalidInput("--models all needs --model-store")
            for path in sorted(store.iterdir()):
                if path.name.endswith((".mar", ".tar.gz")) or (path / "MAR-INF").is_dir():
                    found.append((None, path.name))
        elif "=" in entry:
            name, _, url = entry.partition("=")
            found.append((name.strip(), url.strip()))
        else:
            found.append((None, entry))
    return found


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one (logged), so that every API can hold
    `max_connections` connections; a limit that cannot be raised is logged and kept."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open-file limit: %s", "unlimited" if hard == resource.RLIM_INFINITY else hard)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %s: %s", soft, hard, exc)
        return
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("raised the open-file limit from %d to %s (the hard limit)", soft, shown)


class Daemon:
    def __init__(
        self, config: ServerConfig, foreground: bool, spares: Spares, console_fd: int = -1
    ) -> None:
        self.config = config
        self.foreground = foreground
        #: the starter's stdout (background) for the log on the console; -1: none
        self.console_fd = console_fd
        self.spares = spares
        self.stopping = asyncio.Event()
        self.servers: list[Any] = []
        self.grpc_servers: list[Any] = []
        self.pid_path = pidfile.pid_path(config.state_dir)
        self.tls: tls.Material | None = None

    async def run(self, notify: Callable[[dict[str, Any]], None]) -> int:
        config = self.config
        console = self._console()
        files = logs.setup(config.log_dir, config.metrics_dir, console, config.async_logging)
        access_log = files.access
        raise_open_file_limit()
        try:
            declarations = declared.load(config.metrics_config)
            found = loader.load(config.plugins_path)
        except TsctlError as exc:
            log.error("start-up failed: %s", exc.message)
            notify({"ok": False, "error": exc.message})
            files.close()
            return 1
        stats = Metrics(
            config.metrics_mode,
            declarations,
            config.model_metrics_auto_detect,
            server_log=files.server_metrics,
            model_log=files.model_metrics,
        )
        registry = Registry(config, stats, spares=self.spares)
        metric_log = MetricLog(config.log_dir, stats, config.number_of_gpu)
        state = ServerState(config, registry, stats, metric_log, access_log, started_at=time.time())
        state.loading_startup_models = True  # not ready before the start-up models serve
        for warning in found.warnings:
            log.warning("plugins: %s", warning)
        state.plugins = ServerPlugins.of(found.plugins)
        registry.strategies = state.plugins.strategies  # what batchingStrategy may name
        if not config.disable_token_authorization:
            state.auth = TokenAuth.create(Path.cwd(), config.token_expiration_min)
            log.info("token authorization is on; keys in %s", state.auth.path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            state.plugins.setup(state)
            self.tls = tls.load(config)
            if self.tls is not None:
                log.info("TLS: key and certificate from %s", self.tls.source)
            addresses = await self._listen(state)
            if config.enable_grpc:
                addresses.update(await self._start_grpc(state))
            pidfile.write(
                self.pid_path,
                pidfile.PidInfo(
                    pid=os.getpid(),
                    start_ticks=pidfile.process_start_ticks(os.getpid()),
                    inference_address=addresses["inference"],
                    management_address=addresses["management"],
                    log_dir=str(config.log_dir.resolve()),
                    metrics_address=addresses.get("metrics", ""),
                    key_file=str(state.auth.path) if state.auth else "",
                    grpc_inference_address=addresses.get("grpc_inference", ""),
                    grpc_management_address=addresses.get("grpc_management", ""),
                    grpc_oip_address=addresses.get("grpc_oip", ""),
                ),
            )
            not_loaded = await self._load_startup_models(registry)
            state.loading_startup_models = False
        except (TsctlError, OSError) as exc:
            self.spares.discard()
            message = exc.message if isinstance(exc, TsctlError) else str(exc)
            log.error("start-up failed: %s", message)
            files.flush()
            notify(
                {
                    "ok": False,
                    "error": message,
                    "log_tail": tail(config.log_dir / "model_log.log"),
                }
            )
            await self._shutdown(state, drain=False)
            return 1
        self.spares.discard()  # what start-up did not take would only hold memory
        # before the line scripts wait for (TorchServe's tests count startup.cfg files then)
        state.snapshot("startup")
        log.info(started_line(os.getpid(), addresses["inference"], addresses["management"]))
        if not config.disable_system_metrics:
            metric_log.report()  # the first sample: there when the server says it is ready
        key_file = str(state.auth.path) if state.auth else ""
        notify(
            {
                "ok": True,
                "pid": os.getpid(),
                "key_file": key_file,
                "not_loaded": not_loaded,
                **addresses,
            }
        )
        reporting = None
        if not config.disable_system_metrics:
            reporting = asyncio.create_task(metric_log.run(config.metric_time_interval))
        await self.stopping.wait()
        if reporting is not None:
            reporting.cancel()
        log.info("stopping: draining in-flight requests")
        try:
            state.snapshot("shutdown")
            await self._shutdown(state, drain=True)
            if not config.disable_system_metrics:
                metric_log.report()
            log.info("stopped")
        finally:  # the access and metric lines still buffered (logs.LineLog) are written
            files.close()
            if console is not None:
                console.close()
        return 0

    def _console(self) -> ConsoleHandler | None:
        """The log on the console: this process's stdout in `--foreground`, else the
        starter's (`console_fd`); none with `console_log` off."""
        if not self.config.console_log:
            return None
        formatter = logs.ConsoleFormatter()
        if self.foreground:
            sys.stdout.flush()
            return ConsoleHandler(sys.stdout.fileno(), formatter, own_fd=False)
        if self.console_fd < 0:
            return None
        return ConsoleHandler(self.console_fd, formatter, own_fd=True)

    async def _start_grpc(self, state: ServerState) -> dict[str, str]:
        from tsctl.server.api import grpc_api

        config = self.config
        found = {}
        for api, host, port in (
            ("inference", config.grpc_inference_address, config.grpc_inference_port),
            ("management", config.grpc_management_address, config.grpc_management_port),
        ):
            material = self.tls if config.enable_grpc_ssl else None
            pem = (material.key_pem, material.chain_pem) if material is not None else None
            server, address = await grpc_api.start(state, f"{host}:{port}", api, pem)
            self.grpc_servers.append(server)
            # a TLS port is recorded as https://host:port (clients then speak TLS)
            found[f"grpc_{api}"] = f"https://{address}" if pem is not None else address
        from tsctl.server.api import grpc_oip  # the Open Inference Protocol's own port

        server, address = await grpc_oip.start(
            state, f"{config.grpc_oip_address}:{config.grpc_oip_port}", pem
        )
        self.grpc_servers.append(server)
        found["grpc_oip"] = f"https://{address}" if pem is not None else address
        return found

    async def _load_startup_models(self, registry: Registry) -> list[str]:
        """`--models`; else the config file's `models` (or a snapshot's `model_snapshot`, when
        `--ts-config` names one); else the newest snapshot in the log folder, unless `--ncs`.

        A `--models` entry that fails stops the start-up. An entry restored from a snapshot
        (or the `models` setting) that fails is logged and left out, and the others are
        served: one broken archive must not keep every model down. Returns what was left out,
        one line each."""
        config = self.config
        planned: list[tuple[str, LoadOptions, bool]] = []
        source = ""
        if config.load_models:
            for name, url in startup_models(config):
                planned.append((url, LoadOptions(name=name, startup=True, trusted=True), False))
        else:
            entries: list[snapshot.SnapshotModel] = []
            if config.models:
                entries, source = snapshot.from_models_setting(config.models), "models setting"
            elif not config.no_config_snapshots and (found := snapshot.newest(config)):
                path, entries = found
                source = f"snapshot {path}"
                log.info("restoring %d model versions from snapshot %s", len(entries), path)
            for entry in entries:
                planned.append((entry.mar_name, snapshot.load_options(entry), entry.default))
        failed: list[str] = []

        def left_out(what: str, exc: TsctlError) -> None:
            if not source:
                raise exc
            line = f"{what}: {exc.message}"
            log.error("not loaded from the %s: %s; the other models are served", source, line)
            failed.append(line)

        # register every model before starting any worker, so that each worker's share of
        # the cores counts all the workers about to start, not only those started so far
        loaded = []
        for url, options, default in planned:
            try:
                mv = await registry.add(url, options)
            except TsctlError as exc:
                left_out(f"{options.name or url} ({url})", exc)
                continue
            if default:
                registry.set_default(mv.name, mv.version)
            loaded.append((mv, url))
        for mv, url in loaded:
            try:
                await mv.pool.scale(mv.min_workers)
            except TsctlError as exc:
                await registry.unload(mv)
                left_out(f"{mv.name} version {mv.version} ({url})", exc)
                continue
            log.info("loaded model %s version %s from %s", mv.name, mv.version, url)
        return failed

    async def _listen(self, state: ServerState) -> dict[str, str]:
        from tsctl.server.api import rest_inference, rest_management, rest_metrics, rest_server

        config = self.config
        context = tls.server_context(self.tls) if self.tls is not None else None

        def tls_for(address: str) -> ssl.SSLContext | None:
            return context if address.startswith("https://") else None

        inference_sockets = _bind(config.inference_address, "inference")
        management_sockets = _bind(config.management_address, "management")
        inference_tls = tls_for(config.inference_address)
        self.servers.append(await rest_inference.serve(state, inference_sockets, inference_tls))
        apps: list[tuple[str, Any, list[socket.socket], ssl.SSLContext | None]] = [
            (
                "management",
                rest_management.make_app(state),
                management_sockets,
                tls_for(config.management_address),
            ),
        ]
        addresses = {
            "inference": _address_of(inference_sockets, inference_tls is not None),
            "management": _address_of(management_sockets, apps[0][3] is not None),
        }
        if config.enable_metrics_api:
            metrics_sockets = _bind(config.metrics_address, "metrics")
            metrics_tls = tls_for(config.metrics_address)
            apps.append(("metrics", rest_metrics.make_app(state), metrics_sockets, metrics_tls))
            addresses["metrics"] = _address_of(metrics_sockets, metrics_tls is not None)
        for api, app, sockets, api_tls in apps:
            self.servers.append(rest_server.serve(app, state, api, sockets, api_tls))
        return addresses

    async def _shutdown(self, state: ServerState, drain: bool) -> None:
        """Stop accepting, give requests in progress (REST and gRPC alike) `drain_timeout`,
        then stop the workers: one still running a batch then is killed, so that stopping
        never waits on a handler (or a response timeout) past the drain."""
        state.draining = True
        for server in self.servers:
            server.stop()
        grace = self.config.drain_timeout if drain else 0
        # gRPC refuses new calls at once and cancels those left after `grace`: the same
        # drain as REST's, at the same time
        grpc_stopped = [asyncio.ensure_future(s.stop(grace)) for s in self.grpc_servers]
        if drain and state.in_flight:
            try:
                await asyncio.wait_for(state.idle.wait(), grace)
            except TimeoutError:
                log.warning(
                    "stopping with %d request(s) still in flight after %s s of draining",
                    state.in_flight,
                    grace,
                )
        await asyncio.gather(*grpc_stopped, return_exceptions=True)
        _kill_busy_workers(state.registry)
        await state.registry.close()
        _kill_leftover_children()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.close_all_connections()
        with contextlib.suppress(TsctlError, OSError):
            pidfile.remove(self.pid_path, os.getpid())


def _kill_busy_workers(registry: Registry) -> None:
    """Kill the workers still running a batch once the drain is over (their requests had
    their time); idle ones are asked to exit."""
    from tsctl.ipc.messages import WorkerState

    busy = [
        worker
        for versions in registry.models.values()
        for mv in versions.values()
        for worker in mv.pool.workers
        if worker.state in (WorkerState.BUSY, WorkerState.RETIRING)
    ]
    for worker in busy:
        log.warning("stopping: killing worker %s, still busy after the drain", worker.worker_id)
        worker.kill()


def _kill_leftover_children() -> None:
    """Kill any child process still alive once the workers are stopped (a worker still
    loading its handler, a spare nobody took): the daemon leaves none behind."""
    children: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                children.update(int(pid) for pid in (task / "children").read_text().split())
    for pid in sorted(children):
        if pidfile.process_state(pid) in (None, "Z", "X"):
            continue  # gone, or exited and waiting for its watcher to reap it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            log.warning("stopping: killed child process %d, still running after the workers", pid)


def run(
    config: ServerConfig,
    foreground: bool,
    notify_fd: int | None = None,
    spares: Spares | None = None,
    console_fd: int = -1,
) -> int:
    """Run the daemon until stopped; returns its exit status. `spares` are workers started
    ahead (see `tsctl.server.workers.spares`) for the start-up models to take."""

    def notify(message: dict[str, Any]) -> None:
        if foreground and message.get("ok"):
            print(
                started_line(message["pid"], message["inference"], message["management"]),
                flush=True,
            )
            for line in message.get("not_loaded", []):
                print(f"tsctl: warning: not loaded: {line}", file=sys.stderr, flush=True)
        elif foreground:
            print(f"tsctl: error: {message['error']}", file=sys.stderr, flush=True)
        if notify_fd is not None:
            with contextlib.suppress(OSError), os.fdopen(notify_fd, "w") as pipe:
                pipe.write(json.dumps(message) + "\n")

    daemon = Daemon(config, foreground, spares or Spares(), console_fd)
    return asyncio.run(daemon.run(notify))


def main(raw_config: str, notify_fd: int | None, spares: Spares, console_fd: int = -1) -> int:
    """The launched daemon (from `tsctl.local.launch`); `console_fd`: see `Daemon`."""
    config = ServerConfig.model_validate_json(raw_config)
    return run(config, foreground=False, notify_fd=notify_fd, spares=spares, console_fd=console_fd)
