"""`tsctl infer MODEL a.jpg,b.jpg`: send files to a model and print its answer."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tsctl.cli.tls import CACERT_HELP, INSECURE_HELP, tls_options
from tsctl.errors import InvalidInput

if TYPE_CHECKING:
    from tsctl.client.base import Input, Prediction
    from tsctl.client.tls import TlsOptions

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
    cacert: Path | None = typer.Option(None, "--cacert", help=CACERT_HELP, dir_okay=False),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Send files to a model: together in ONE request, or --each in its own request."""
    from tsctl.client.base import file_inputs
    from tsctl.client.connect import connect_inference

    paths = [Path(p.strip()) for p in files.split(",") if p.strip()]
    if not paths:
        raise InvalidInput("no input files given")
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"input file not found: {path}")

    if stream and not use_grpc:
        raise InvalidInput("--stream needs --grpc")
    tls = tls_options(cacert, insecure)

    def send(group: list[Path]) -> Prediction:
        inputs = file_inputs(group, content_type)
        if stream:
            return _streamed(model, inputs, version, url, tls)
        with connect_inference(url, grpc=use_grpc, tls=tls) as client:
            return client.predict(model, inputs, version)

    if each and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(32, len(paths))) as pool:
            answers = list(pool.map(send, [[p] for p in paths]))
    else:
        answers = [send(paths)]
    if output is not None:
        output.write_bytes(b"\n".join(a.body for a in answers))
        return
    _print(answers)


def _streamed(
    model: str,
    inputs: list[Input],
    version: str | None,
    url: str | None,
    tls: TlsOptions | None,
) -> Prediction:
    """A streaming handler's answers over gRPC, one per line."""
    from tsctl.client.base import Prediction
    from tsctl.client.connect import connect_grpc_inference

    with connect_grpc_inference(url, tls=tls) as client:
        parts = list(client.stream(model, inputs, version))
    kind = parts[0].content_type if parts else ""
    return Prediction(b"\n".join(p.body for p in parts), kind)


def _print(answers: list[Prediction]) -> None:
    if not sys.stdout.isatty():
        out = sys.stdout.buffer
        for answer in answers:
            out.write(answer.body)
            if not answer.body.endswith(b"\n"):
                out.write(b"\n")
        out.flush()
        return
    from rich.console import Console

    console = Console()
    for answer in answers:
        text = answer.body.decode("utf-8", "replace")
        if "json" in answer.content_type:
            console.print_json(text)
        else:
            console.print(text, markup=False, highlight=False)
