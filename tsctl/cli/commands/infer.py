"""`tsctl infer MODEL a.jpg,b.jpg`: send files to a model and print its answer."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tsctl.errors import InvalidInput

if TYPE_CHECKING:
    from tsctl.client.rest import Reply

app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})


@app.command("infer")
def infer(
    model: str = typer.Argument(..., help="Model name."),
    files: str = typer.Argument(..., help="Comma-separated input files."),
    url: str | None = typer.Option(
        None, "--url", help="Inference API (default: the local server)."
    ),
    version: str | None = typer.Option(None, "--version", help="Model version."),
    each: bool = typer.Option(False, "--each", help="One request per file, sent concurrently."),
    content_type: str | None = typer.Option(
        None, "--content-type", help="Override the content type."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the answer to a file."),
    use_grpc: bool = typer.Option(False, "--grpc", help="Use the gRPC API (default: REST)."),
    stream: bool = typer.Option(
        False, "--stream", help="With --grpc: StreamPredictions, one answer per message."
    ),
) -> None:
    """Send files to a model: together in ONE request, or --each in its own request."""
    from tsctl.client.connect import connect

    paths = [Path(p.strip()) for p in files.split(",") if p.strip()]
    if not paths:
        raise InvalidInput("no input files given")
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"input file not found: {path}")

    if stream and not use_grpc:
        raise InvalidInput("--stream needs --grpc")

    def send(group: list[Path]) -> Reply:
        if use_grpc:
            return _send_grpc(model, group, version, url, stream)
        client = connect("inference", url)
        try:
            reply: Reply = client.predict(model, group, version, content_type)
            return reply
        finally:
            client.close()

    if each and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(32, len(paths))) as pool:
            replies = list(pool.map(send, [[p] for p in paths]))
    else:
        replies = [send(paths)]
    if output is not None:
        output.write_bytes(b"\n".join(r.body for r in replies))
        return
    _print(replies)


def _send_grpc(
    model: str, files: list[Path], version: str | None, url: str | None, stream: bool
) -> Reply:
    from tsctl.client.connect import connect_grpc
    from tsctl.client.rest import Reply

    client = connect_grpc("inference", url)
    try:
        if stream:
            body = b"\n".join(client.stream(model, files, version))
        else:
            body = client.predict(model, files, version)
    finally:
        client.close()
    kind = "application/json" if body[:1] in (b"{", b"[") else ""
    return Reply(200, {"content-type": kind}, body)


def _print(bodies: list[Reply]) -> None:
    if not sys.stdout.isatty():
        out = sys.stdout.buffer
        for reply in bodies:
            out.write(reply.body)
            if not reply.body.endswith(b"\n"):
                out.write(b"\n")
        out.flush()
        return
    from rich.console import Console

    console = Console()
    for reply in bodies:
        text = reply.body.decode("utf-8", "replace")
        if "json" in reply.content_type:
            console.print_json(text)
        else:
            console.print(text, markup=False, highlight=False)
