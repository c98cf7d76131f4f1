"""`tsctl serve start/stop/status`: `torchserve --start/--stop` and a status table."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tsctl.cli.tls import CACERT_HELP, INSECURE_HELP

if TYPE_CHECKING:
    from tsctl.server.config import ServerConfig

app = typer.Typer(
    help="Start, stop and inspect the model server daemon.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STATE_DIR_HELP = (
    "Where the pid file lives (default: $TSCTL_STATE_DIR, else $XDG_RUNTIME_DIR/tsctl, "
    "else ~/.local/state/tsctl; kept private to this user)."
)


def _state_dir(value: Path | None) -> Path:
    from tsctl.local.pidfile import default_state_dir

    return value if value is not None else default_state_dir()


def _env_path(name: str) -> Path | None:
    """TorchServe's `LOG_LOCATION` / `METRICS_LOCATION`: where its log files go."""
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


@app.command("start")
def start(
    ctx: typer.Context,
    model_store: Path | None = typer.Option(None, "--model-store", help="Model store folder."),
    models: list[str] | None = typer.Option(
        None,
        "--models",
        help="Models to load at start: NAME=PATH, PATH.mar or all (repeat, or comma-separate).",
    ),
    more_models: list[str] | None = typer.Argument(None, hidden=True),
    ts_config: Path | None = typer.Option(
        None, "--ts-config", help="A TorchServe config.properties file.", envvar="TS_CONFIG_FILE"
    ),
    ncs: bool = typer.Option(
        False, "--ncs", "--no-config-snapshots", help="Do not write or restore config snapshots."
    ),
    foreground: bool = typer.Option(
        False, "--foreground", help="Run in this process; logs to stdout."
    ),
    disable_token_auth: bool = typer.Option(
        False, "--disable-token-auth", "--dt", help="Serve without token authorization."
    ),
    enable_model_api: bool = typer.Option(
        False, "--enable-model-api", help="Allow registering and unregistering models."
    ),
    log_config: Path | None = typer.Option(
        None, "--log-config", help="Accepted for compatibility (a log4j file); not used."
    ),
    cpp_log_config: Path | None = typer.Option(
        None, "--cpp-log-config", help="Accepted for compatibility; not used."
    ),
    workflow_store: Path | None = typer.Option(
        None,
        "--workflow-store",
        help="Where workflow archives (.war) are registered from (default: the model store).",
    ),
    plugins_path: Path | None = typer.Option(
        None,
        "--plugins-path",
        "--ppath",
        help="A folder of Python plugins (setting plugins_path); see `tsctl plugins list`.",
    ),
    log_dir: Path | None = typer.Option(
        None, "--log-dir", help="Log folder (default: $LOG_LOCATION, else ./logs)."
    ),
    console_log: bool | None = typer.Option(
        None,
        "--console-log/--no-console-log",
        help="Also write the server's log to this console (default: on; setting console_log).",
        envvar="TSCTL_CONSOLE_LOG",
        show_default=False,
    ),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    start_timeout: float = typer.Option(
        300, "--start-timeout", help="Seconds to wait for readiness."
    ),
) -> None:
    """Start the server: `torchserve --start`'s flags."""
    from tsctl.local.launch import Launched, launch_daemon

    launched = ctx.obj if isinstance(ctx.obj, Launched) else None  # see tsctl.cli.entry
    if launched is None and not foreground:
        from tsctl.server import boot

        # before anything slow: the daemon's first worker imports torch while this process
        # and the daemon read the configuration (it exits if this process sends none)
        launched = launch_daemon(boot.main, early_spares=1 if models or more_models else 0)
    config = start_config(
        model_store=model_store,
        models=models,
        more_models=more_models,
        ts_config=ts_config,
        ncs=ncs,
        disable_token_auth=disable_token_auth,
        enable_model_api=enable_model_api,
        torchserve_only={
            "--log-config": log_config,
            "--cpp-log-config": cpp_log_config,
        },
        plugins_path=plugins_path,
        workflow_store=workflow_store,
        log_dir=log_dir,
        console_log=console_log,
        state_dir=state_dir,
    )
    if foreground:
        raise typer.Exit(run_foreground(config))

    from rich.console import Console

    from tsctl.errors import StartFailed
    from tsctl.local.lifecycle import start as start_daemon
    from tsctl.local.lifecycle import started_line

    assert launched is not None
    err = Console(stderr=True)
    config_json = config.model_dump_json()
    try:
        with err.status("starting tsctl...") if err.is_terminal else contextlib.nullcontext():
            ready = start_daemon(
                launched, config_json, config.state_dir, config.log_dir, start_timeout
            )
    except StartFailed as exc:
        for line in exc.log_tail:
            sys.stderr.write(f"  | {line}\n")
        raise
    typer.echo(started_line(ready["pid"], ready["inference"], ready["management"]))
    for line in ready.get("not_loaded", []):
        sys.stderr.write(f"tsctl: warning: not loaded: {line} (ts_log.log has the details)\n")
    if ready.get("key_file"):
        typer.echo(
            f"Token authorization is on: keys are in {ready['key_file']} "
            "(tsctl commands use them; curl needs -H 'Authorization: Bearer <key>')."
        )


#: `start_config`'s last step: given the configuration built and the config.properties it was
#: built from, the configuration to serve (`tsctl torchserve` applies KServe's environment)
Adjust = Callable[["ServerConfig", dict[str, str]], "ServerConfig"]


def start_config(
    *,
    model_store: Path | None,
    models: list[str] | None,
    more_models: list[str] | None,
    ts_config: Path | None,
    ncs: bool,
    disable_token_auth: bool,
    enable_model_api: bool,
    torchserve_only: dict[str, Path | None],
    log_dir: Path | None,
    plugins_path: Path | None = None,
    workflow_store: Path | None = None,
    console_log: bool | None,
    state_dir: Path | None,
    adjust: Adjust | None = None,
) -> ServerConfig:
    """`torchserve --start`'s flags, the config.properties (or the newest snapshot) and the
    environment as one `ServerConfig`; warnings on stderr. Shared by `serve start` and
    `tsctl torchserve`."""
    from tsctl.errors import InvalidInput
    from tsctl.server.config import ServerConfig, build_config, is_loopback, unknown_keys
    from tsctl.server.snapshot import startup_properties

    entries = [*(models or []), *(more_models or [])]
    if more_models and not models:
        raise InvalidInput(f"unexpected argument {more_models[0]!r}; did you mean --models?")
    wanted = tuple(m.strip() for e in entries for m in e.split(",") if m.strip())
    for flag, value in torchserve_only.items():
        if value is not None:
            sys.stderr.write(f"tsctl: warning: {flag} {value} is TorchServe-only (ignored)\n")
    # --ts-config, else the newest snapshot (its addresses and ports too), as TorchServe
    where = log_dir or _env_path("LOG_LOCATION") or ServerConfig.model_fields["log_dir"].default
    chosen = startup_properties(ts_config, where, ncs)
    for line in chosen.skipped:
        sys.stderr.write(f"tsctl: warning: config snapshot skipped: {line}\n")
    properties = chosen.properties
    for key in unknown_keys(properties):
        sys.stderr.write(f"tsctl: warning: unknown setting {key!r} in {chosen.source} (ignored)\n")
    overrides: dict[str, Any] = {
        "model_store": model_store,
        "plugins_path": plugins_path,
        "workflow_store": workflow_store,
        "load_models": wanted or None,
        "log_dir": log_dir or _env_path("LOG_LOCATION"),
        # TorchServe's rule: METRICS_LOCATION, else ./logs even when LOG_LOCATION moves the
        # other logs; --log-dir moves them all
        "metrics_dir": _env_path("METRICS_LOCATION")
        or (Path("logs") if log_dir is None and _env_path("LOG_LOCATION") else None),
        "console_log": console_log,
        "state_dir": _state_dir(state_dir),
        "no_config_snapshots": ncs,
        "disable_token_authorization": True if disable_token_auth else None,
        "enable_model_api": True if enable_model_api else None,
    }
    if model_store is not None and not model_store.is_dir():
        raise InvalidInput(f"model store {str(model_store)!r} is not a directory")
    if workflow_store is not None and not workflow_store.is_dir():
        raise InvalidInput(f"workflow store {str(workflow_store)!r} is not a directory")
    config = build_config(properties, overrides, dict(os.environ))
    if adjust is not None:
        config = adjust(config, properties)
    for what, address in (
        ("management", config.management_address),
        ("metrics", config.metrics_address),
    ):
        if config.disable_token_authorization and not is_loopback(address):
            sys.stderr.write(
                f"tsctl: warning: the {what} API listens on {address}, beyond this machine, "
                "with token authorization off\n"
            )
    return config


def run_foreground(config: ServerConfig) -> int:
    """Serve `config` in this process until SIGTERM/SIGINT has drained it; the exit status."""
    from tsctl.server.workers import spares

    ahead = spares.prestart(spares.expected(config.model_dump(), spares.cpu_count()))
    from tsctl.server.daemon import run

    return run(config, foreground=True, spares=ahead)


@app.command("stop")
def stop(
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    timeout: float = typer.Option(60, "--timeout", help="Seconds to wait before killing it."),
    foreground: bool = typer.Option(
        False,
        "--foreground",
        help="Accepted for `torchserve --stop --foreground`: stop always waits for the exit.",
    ),
) -> None:
    """Stop the server: drain in-flight requests, stop workers, exit."""
    from tsctl.local.lifecycle import StopOutcome
    from tsctl.local.lifecycle import stop as stop_daemon

    done = stop_daemon(_state_dir(state_dir), timeout)
    messages = {
        StopOutcome.STOPPED: f"tsctl stopped (pid {done.pid}).",
        StopOutcome.KILLED: f"tsctl did not stop within {timeout:g} s; killed pid {done.pid}.",
        StopOutcome.NOT_RUNNING: "tsctl is not running.",
        StopOutcome.STALE: "tsctl is not running (removed a stale pid file).",
    }
    typer.echo(messages[done.outcome])


@app.command("status")
def status(
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Show whether the server runs, and its models, versions and workers."""
    import json

    from tsctl.cli.tls import tls_options
    from tsctl.client.connect import connect_management
    from tsctl.local.lifecycle import running

    info = running(_state_dir(state_dir))
    if info is None:
        if as_json:
            typer.echo(json.dumps({"running": False}))
        else:
            typer.echo("tsctl is not running.")
        raise typer.Exit(1)
    described: list[dict[str, Any]] = []
    tls = tls_options(cacert, insecure)
    with connect_management(timeout=30, info=info, tls=tls) as client:
        for entry in client.all_models():
            described.extend(client.describe(entry.name, all_versions=True))
    if as_json:
        doc = {
            "running": True,
            "pid": info.pid,
            "inference_address": info.inference_address,
            "management_address": info.management_address,
            # the gRPC ports ("" when enable_grpc=false); OIP: inference.GRPCInferenceService
            "grpc_inference_address": info.grpc_inference_address,
            "grpc_management_address": info.grpc_management_address,
            "grpc_oip_address": info.grpc_oip_address,
            "models": described,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"tsctl is running: pid {info.pid}, inference {info.inference_address}, "
        f"management {info.management_address}, logs {info.log_dir}"
    )
    if info.grpc_inference_address:
        console.print(
            f"gRPC: inference {info.grpc_inference_address}, "
            f"management {info.grpc_management_address}, OIP {info.grpc_oip_address}"
        )
    table = Table("model", "version", "batch", "worker", "pid", "state", title_justify="left")
    for model in described:
        workers = model.get("workers") or [{}]
        for i, worker in enumerate(workers):
            first = i == 0
            table.add_row(
                model["modelName"] if first else "",
                model["modelVersion"] if first else "",
                str(model["batchSize"]) if first else "",
                str(worker.get("id", "-")),
                str(worker.get("pid", "-")),
                str(worker.get("status", "no workers")),
            )
    console.print(table)
