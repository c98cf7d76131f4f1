"""`tsctl models`: register, scale, list, describe, unregister and set-default over REST."""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import quote, urlencode

import typer

app = typer.Typer(
    help="Manage the models of a running server (TorchServe's management API).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

URL_HELP = "Management API (default: the local server's)."
GRPC_HELP = "Use the gRPC management API (default: REST)."
JSON_HELP = "Print the server's JSON, for scripts."


def _client(url: str | None) -> Any:
    from tsctl.client.connect import connect

    return connect("management", url)


def _path(name: str, version: str | None = None) -> str:
    path = f"/models/{quote(name, safe='')}"
    return f"{path}/{quote(version, safe='')}" if version else path


def _query(**values: Any) -> str:
    given = {k: str(v).lower() if isinstance(v, bool) else v for k, v in values.items()}
    present = {k: v for k, v in given.items() if v is not None}
    return f"?{urlencode(present)}" if present else ""


def _grpc(url: str | None) -> Any:
    from tsctl.client.connect import connect_grpc

    return connect_grpc("management", url)


def _status(reply: Any, as_json: bool) -> None:
    doc = reply if isinstance(reply, (dict, list)) else reply.json()
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        typer.echo(doc.get("status", doc) if isinstance(doc, dict) else doc)


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
) -> None:
    """Register a model archive (POST /models)."""
    if use_grpc:
        doc = _grpc(url_).manage(
            "RegisterModel",
            url=url,
            model_name=model_name,
            batch_size=batch_size,
            max_batch_delay=max_batch_delay,
            initial_workers=initial_workers,
            handler=handler,
            synchronous=sync,
            response_timeout=response_timeout,
        )
        _status(doc, as_json)
        return
    query = _query(
        url=url,
        model_name=model_name,
        batch_size=batch_size,
        max_batch_delay=max_batch_delay,
        initial_workers=initial_workers,
        handler=handler,
        synchronous=sync,
        response_timeout=response_timeout,
    )
    _status(_client(url_).request("POST", f"/models{query}"), as_json)


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
) -> None:
    """Change a model's number of workers (PUT /models/NAME)."""
    if use_grpc:
        doc = _grpc(url_).manage(
            "ScaleWorker",
            model_name=name,
            model_version=version,
            min_worker=min_workers,
            max_worker=max_workers,
            synchronous=sync,
        )
        _status(doc, as_json)
        return
    query = _query(min_worker=min_workers, max_worker=max_workers, synchronous=sync)
    _status(_client(url_).request("PUT", _path(name, version) + query), as_json)


@app.command("list")
def list_models(
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
) -> None:
    """List the registered models (GET /models, every page)."""
    client = _grpc(url_) if use_grpc else _client(url_)
    models: list[dict[str, Any]] = []
    token: str | None = "0"
    while token is not None:
        if use_grpc:
            doc = client.manage("ListModels", limit=100, next_page_token=int(token))
        else:
            doc = client.request("GET", f"/models{_query(limit=100, next_page_token=token)}").json()
        models.extend(doc.get("models", []))
        token = doc.get("nextPageToken")
    if as_json:
        sys.stdout.write(json.dumps({"models": models}, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "url", title_justify="left")
    for model in models:
        table.add_row(model["modelName"], model["modelUrl"])
    Console().print(table)


@app.command("describe")
def describe(
    name: str = typer.Argument(..., help="Model name."),
    version: str | None = typer.Option(None, "--version", help="Model version."),
    all_versions: bool = typer.Option(False, "--all", help="Every version."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
) -> None:
    """Describe a model: settings and workers (GET /models/NAME)."""
    wanted = "all" if all_versions else version
    if use_grpc:
        described = _grpc(url_).manage("DescribeModel", model_name=name, model_version=wanted)
    else:
        described = _client(url_).request("GET", _path(name, wanted)).json()
    if as_json:
        sys.stdout.write(json.dumps(described, indent=2) + "\n")
        return
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
) -> None:
    """Unregister a model or one version, after its requests finish (DELETE /models/NAME)."""
    if use_grpc:
        doc = _grpc(url_).manage("UnregisterModel", model_name=name, model_version=version)
        _status(doc, as_json)
        return
    _status(_client(url_).request("DELETE", _path(name, version)), as_json)


@app.command("set-default")
def set_default(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="The version /predictions/NAME should use."),
    url_: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    use_grpc: bool = typer.Option(False, "--grpc", help=GRPC_HELP),
) -> None:
    """Make a version the default (PUT /models/NAME/VERSION/set-default)."""
    if use_grpc:
        doc = _grpc(url_).manage("SetDefault", model_name=name, model_version=version)
        _status(doc, as_json)
        return
    _status(_client(url_).request("PUT", _path(name, version) + "/set-default"), as_json)
