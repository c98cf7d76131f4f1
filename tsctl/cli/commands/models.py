"""`tsctl models`: register, scale, list, describe, unregister and set-default.

Each command parses its flags, makes one call on a `tsctl.client.ManagementClient` and
renders the answer; `--grpc` only picks the gRPC implementation instead of REST.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tsctl.cli.tls import CACERT_HELP, INSECURE_HELP, tls_options

if TYPE_CHECKING:
    from tsctl.client.base import ManagementClient

app = typer.Typer(
    help="Manage the models of a running server (TorchServe's management API).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

URL_HELP = "Management API (default: the local server's)."
GRPC_HELP = "Use the gRPC management API (default: REST)."
JSON_HELP = "Print the server's JSON, for scripts."


def _client(
    url: str | None, use_grpc: bool, cacert: Path | None, insecure: bool
) -> ManagementClient:
    from tsctl.client.connect import connect_management

    return connect_management(url, grpc=use_grpc, tls=tls_options(cacert, insecure))


def _status(message: str, as_json: bool) -> None:
    """TorchServe's status answer: its message, or its JSON (`{"status": ...}`)."""
    if as_json:
        sys.stdout.write(json.dumps({"status": message}, indent=2) + "\n")
    else:
        typer.echo(message)


@app.command("register")
def register(
    url: str = typer.Argument(..., help="An archive in the model store (FILE.mar) or a URL."),
    model_name: str | None = typer.Option(None, "--model-name", help="Register under this name."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Requests per batch."),
    max_batch_delay: int | None = typer.Option(None, "--max-batch-delay", help="Milliseconds."),
    initial_workers: int | None = typer.Option(None, "--initial-workers", help="Workers."),
    handler: str | None = typer.Option(None, "--handler", help="Override the handler."),
    sync: bool = typer.Option(True, "--sync/--no-sync", help="Wait for the workers."),
    response_timeout: int | None = typer.Option(None, "--response-timeout", help="Seconds."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Register a model archive (POST /models)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        message = client.register(
            url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            handler=handler,
            synchronous=sync,
            response_timeout=response_timeout,
        )
    _status(message, as_json)


@app.command("scale")
def scale(
    name: str = typer.Argument(..., help="Model name."),
    min_workers: int = typer.Option(..., "--min-workers", help="Workers to keep."),
    max_workers: int | None = typer.Option(None, "--max-workers", help="Upper bound."),
    version: str | None = typer.Option(None, "--version", help="Model version."),
    sync: bool = typer.Option(True, "--sync/--no-sync", help="Wait until done."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Change a model's number of workers (PUT /models/NAME)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        message = client.scale(
            name, min_workers, max_workers=max_workers, version=version, synchronous=sync
        )
    _status(message, as_json)


@app.command("list")
def list_models(
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """List the registered models (GET /models, every page)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        models = client.all_models()
    if as_json:
        listed = [{"modelName": m.name, "modelUrl": m.url} for m in models]
        sys.stdout.write(json.dumps({"models": listed}, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "url", title_justify="left")
    for model in models:
        table.add_row(model.name, model.url)
    Console().print(table)


@app.command("describe")
def describe(
    name: str = typer.Argument(..., help="Model name."),
    version: str | None = typer.Option(None, "--version", help="Model version."),
    all_versions: bool = typer.Option(False, "--all", help="Every version."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Describe a model: settings and workers (GET /models/NAME)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        described = client.describe(name, version, all_versions=all_versions)
    if as_json:
        sys.stdout.write(json.dumps(described, indent=2) + "\n")
        return
    _describe_tables(described)


def _describe_tables(described: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for model in described:
        about = Table(show_header=False, title=f"{model['modelName']} {model['modelVersion']}")
        for key in ("modelUrl", "runtime", "minWorkers", "maxWorkers", "batchSize",
                    "maxBatchDelay", "responseTimeout", "loadedAtStartup"):  # fmt: skip
            about.add_row(key, str(model.get(key)))
        console.print(about)
        workers = Table("worker", "pid", "status", "memory MiB", "started", title_justify="left")
        for worker in model.get("workers", []):
            memory = f"{worker.get('memoryUsage', 0) / 2**20:.0f}"
            workers.add_row(
                str(worker["id"]), str(worker["pid"]), worker["status"], memory,
                worker["startTime"],
            )  # fmt: skip
        console.print(workers)


@app.command("unregister")
def unregister(
    name: str = typer.Argument(..., help="Model name."),
    version: str | None = typer.Option(None, "--version", help="Model version."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Unregister a model or one version, after its requests finish (DELETE /models/NAME)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        message = client.unregister(name, version)
    _status(message, as_json)


@app.command("set-default")
def set_default(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="The version /predictions/NAME should use."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Make a version the default (PUT /models/NAME/VERSION/set-default)."""
    with _client(url_, use_grpc, cacert, insecure) as client:
        message = client.set_default(name, version)
    _status(message, as_json)
