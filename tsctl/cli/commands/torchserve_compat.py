"""`tsctl torchserve`: TorchServe's own command line, for containers (KServe's PyTorch runtime).

KServe's `kserve-torchserve` runtime starts its container with
`torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties` and the environment variables
`TS_SERVICE_ENVELOPE` (`kserve`, `kservev2`) and `PROTOCOL_VERSION` (`v1`, `v2`, `grpc-v2`).
With `tsctl` as the image's entrypoint those arguments arrive here unchanged. Unlike
`torchserve --start`, this command always serves in the foreground: it is the container's
main process, its log goes to stdout, and SIGTERM drains it and ends it with status 0.

The configuration is `serve start`'s (`serve.start_config`: the same flags, config.properties,
`model_snapshot`'s models); what KServe's environment changes is `kserve_adjust` below:

- `TS_SERVICE_ENVELOPE` (non-empty) sets `service_envelope`, over the config file.
- `PROTOCOL_VERSION` set means KServe runs the container (KServe sets it for runtimes of server
  type `torchserve`). TorchServe sat behind KServe's wrapper there, which answered on KServe's
  ports; tsctl answers on them itself:
  - the inference API (TorchServe REST, KServe v1, Open Inference Protocol REST) moves to
    KServe's HTTP port (`--http-port`, 8080), on the config's inference host;
  - the OIP gRPC service moves to KServe's gRPC port (`--grpc-port`, 8081), on the same host,
    unless the config file names `grpc_oip_port` (then it stays there) or the management API
    holds that port: then it stays on `grpc_oip_port`, a warning with `v1`/`v2` and an error
    with `grpc-v2` (KServe would send its gRPC calls to a REST port);
  - token authorization is off unless the config file sets `disable_token_authorization`
    (KServe's clients send no TorchServe key).
- Without `PROTOCOL_VERSION` the addresses are the config file's, as `torchserve` reads them.

Either way an inference and a management address on one port (TorchServe serves both APIs
on one port, as KServe's sample configs ask, 8085) is resolved or refused here with one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tsctl.cli.commands import serve

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tsctl.server.config import ServerConfig

app = typer.Typer()

#: KServe's ports for the model server it runs (its Python model server's defaults)
KSERVE_HTTP_PORT = 8080
KSERVE_GRPC_PORT = 8081
PROTOCOLS = ("v1", "v2", "grpc-v2")


def _address(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def kserve_adjust(
    config: ServerConfig,
    properties: Mapping[str, str],
    environ: Mapping[str, str],
    http_port: int = KSERVE_HTTP_PORT,
    grpc_port: int = KSERVE_GRPC_PORT,
) -> tuple[ServerConfig, list[str]]:
    """`config` with KServe's environment applied (the module's docstring has the rules), and
    the lines to tell the operator. Raises `InvalidInput` for a combination that cannot serve."""
    from tsctl.errors import InvalidInput
    from tsctl.server.config import ServerConfig, parse_address

    changes: dict[str, Any] = {}
    notes: list[str] = []
    envelope = environ.get("TS_SERVICE_ENVELOPE", "").strip()
    if envelope:
        changes["service_envelope"] = envelope
    protocol = environ.get("PROTOCOL_VERSION", "").strip()
    inference = config.inference_address
    management = parse_address(config.management_address)
    if protocol:
        if protocol not in PROTOCOLS:
            raise InvalidInput(
                f"PROTOCOL_VERSION={protocol!r}: tsctl serves {', '.join(PROTOCOLS)} under KServe"
            )
        host, _ = parse_address(inference)
        scheme = "https" if inference.startswith("https://") else "http"
        inference = changes["inference_address"] = _address(scheme, host, http_port)
        if "disable_token_authorization" not in properties:
            changes["disable_token_authorization"] = True
        if "grpc_oip_address" not in properties:
            changes["grpc_oip_address"] = host
        oip_port = config.grpc_oip_port
        if "grpc_oip_port" in properties:
            pass
        elif management[1] == grpc_port:
            where = f"the management API ({config.management_address}) holds port {grpc_port}"
            if protocol == "grpc-v2":
                raise InvalidInput(
                    f"PROTOCOL_VERSION=grpc-v2 needs KServe's gRPC port {grpc_port}, but {where}; "
                    "move management_address (KServe's samples use 8085)"
                )
            notes.append(f"tsctl: warning: {where}: the OIP gRPC service stays on port {oip_port}")
        else:
            oip_port = changes["grpc_oip_port"] = grpc_port
        notes.append(
            f"tsctl: KServe protocol {protocol}: inference API (TorchServe REST, KServe v1, "
            f"OIP REST) on {inference}, OIP gRPC on port {oip_port}"
        )
    for what, address in (
        ("management", config.management_address),
        ("metrics", config.metrics_address if config.enable_metrics_api else ""),
    ):
        if address and parse_address(address)[1] == parse_address(inference)[1]:
            raise InvalidInput(
                f"{what}_address {address} and the inference API ({inference}) share a port: "
                f"TorchServe serves several APIs on one port, tsctl one per port; give "
                f"{what}_address a port of its own"
                + ("" if protocol else " (under KServe, PROTOCOL_VERSION moves the inference API)")
            )
    if not changes:
        return config, notes
    return ServerConfig.model_validate({**config.model_dump(), **changes}), notes


@app.command("torchserve")
def torchserve(
    start: bool = typer.Option(
        False, "--start", help="Start the server, in the foreground (the default action)."
    ),
    stop: bool = typer.Option(
        False, "--stop", help="Stop the server `tsctl serve start` started (`--state-dir`)."
    ),
    version: bool = typer.Option(False, "-v", "--version", help="Show tsctl's version."),
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
        False, "--foreground", help="Accepted for `torchserve`: this command always is."
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
        None, "--plugins-path", "--ppath", help="A folder of Python plugins (plugins_path)."
    ),
    log_dir: Path | None = typer.Option(
        None, "--log-dir", help="Log folder (default: $LOG_LOCATION, else ./logs)."
    ),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=serve.STATE_DIR_HELP),
    http_port: int = typer.Option(
        KSERVE_HTTP_PORT,
        "--http-port",
        help="Under KServe (PROTOCOL_VERSION set): the inference API's port.",
    ),
    grpc_port: int = typer.Option(
        KSERVE_GRPC_PORT,
        "--grpc-port",
        help="Under KServe (PROTOCOL_VERSION set): the OIP gRPC service's port.",
    ),
) -> None:
    """TorchServe's `torchserve` command, serving in the foreground: a container's entrypoint
    (KServe's PyTorch runtime passes `torchserve --start --model-store=... --ts-config=...`)."""
    from tsctl import __version__
    from tsctl.errors import InvalidInput

    if version:
        typer.echo(f"tsctl {__version__}")
        return
    if start and stop:
        raise InvalidInput("--start and --stop: choose one")
    if stop:
        serve.stop(state_dir=state_dir, timeout=60, foreground=True)
        return
    del foreground  # always
    environ = dict(os.environ)

    def adjust(config: ServerConfig, properties: dict[str, str]) -> ServerConfig:
        adjusted, notes = kserve_adjust(config, properties, environ, http_port, grpc_port)
        for line in notes:
            sys.stderr.write(line + "\n")
        return adjusted

    config = serve.start_config(
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
        console_log=None,
        state_dir=state_dir,
        adjust=adjust,
    )
    raise typer.Exit(serve.run_foreground(config))
