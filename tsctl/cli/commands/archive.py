"""`tsctl archive`: torch-model-archiver's flags, and `tsctl archive inspect`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    help=(
        "Package a model into a .mar archive (torch-model-archiver's flags), or inspect an archive."
    ),
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

FORMATS = ("default", "zip-store", "tgz", "no-archive")
RUNTIMES = ("python", "python3", "LSP")


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        from tsctl.errors import InvalidInput

        raise InvalidInput(f"unknown {flag} {value!r}; choose one of: {', '.join(allowed)}")
    return value


def _complete_format(incomplete: str) -> list[str]:
    return [f for f in FORMATS if f.startswith(incomplete)]


def _complete_runtime(incomplete: str) -> list[str]:
    return [r for r in RUNTIMES if r.startswith(incomplete)]


@app.callback()
def archive(
    ctx: typer.Context,
    model_name: str | None = typer.Option(
        None, "--model-name", help="Model name; the archive is named <model-name>.mar."
    ),
    version: str | None = typer.Option(
        None, "--version", "-v", help="Model version (default 1.0)."
    ),
    serialized_file: Path | None = typer.Option(
        None,
        "--serialized-file",
        help="Weights: a TorchScript file, or a state_dict for --model-file.",
    ),
    model_file: Path | None = typer.Option(
        None, "--model-file", help="Python file defining the model class (eager mode)."
    ),
    handler: str | None = typer.Option(
        None,
        "--handler",
        help="A built-in handler name, a handler .py file, or file.py:function.",
    ),
    extra_files: str | None = typer.Option(
        None, "--extra-files", help="Comma-separated extra files and directories."
    ),
    requirements_file: Path | None = typer.Option(
        None, "--requirements-file", "-r", help="The model's requirements.txt."
    ),
    config_file: Path | None = typer.Option(
        None, "--config-file", "-c", help="The model's model-config.yaml."
    ),
    runtime: str = typer.Option(
        "python", "--runtime", help="python, python3 or LSP.", autocompletion=_complete_runtime
    ),
    archive_format: str = typer.Option(
        "default",
        "--archive-format",
        help="default (.mar, deflated), zip-store (.mar, stored), tgz (.tar.gz), "
        "no-archive (a directory).",
        autocompletion=_complete_format,
    ),
    export_path: Path = typer.Option(
        Path(), "--export-path", help="Where to write the archive (default: here)."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing archive."),
) -> None:
    """Package a model into a .mar archive, as torch-model-archiver does."""
    if ctx.invoked_subcommand is not None:
        return
    from tsctl.archive.manifest import Runtime
    from tsctl.archive.writer import ArchiveFormat, ArchiveSpec, plan_archive
    from tsctl.errors import InvalidInput

    if not model_name:
        raise InvalidInput("missing option --model-name")
    if not handler:
        raise InvalidInput("missing option --handler")
    spec = ArchiveSpec(
        model_name=model_name,
        handler=handler,
        version=version or "1.0",
        serialized_file=serialized_file,
        model_file=model_file,
        extra_files=tuple(extra_files.split(",")) if extra_files else (),
        requirements_file=requirements_file,
        config_file=config_file,
        runtime=Runtime(_choice(runtime, RUNTIMES, "--runtime")),
        archive_format=ArchiveFormat(_choice(archive_format, FORMATS, "--archive-format")),
        export_path=export_path,
        force=force,
    )
    plan = plan_archive(spec)
    destination = _write_with_progress(plan)
    size = sum(e.size for e in plan.entries)
    typer.echo(f"wrote {destination} ({len(plan.entries) + 1} files, {_human(size)} of content)")


def _write_with_progress(plan: Any) -> Path:
    from rich.console import Console

    from tsctl.archive.writer import write_archive

    console = Console(stderr=True)
    if not console.is_terminal:
        return write_archive(plan)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(plan.destination.name, total=plan.total_bytes)
        return write_archive(plan, lambda n: bar.advance(task, n))


@app.command("workflow")
def workflow(
    workflow_name: str = typer.Option(
        ..., "--workflow-name", help="Workflow name; the archive is named <workflow-name>.war."
    ),
    spec_file: Path = typer.Option(
        ..., "--spec-file", help="The workflow's YAML spec (its models and dag)."
    ),
    handler: Path | None = typer.Option(
        None, "--handler", help="Python file with the functions the dag names."
    ),
    extra_files: str | None = typer.Option(
        None, "--extra-files", help="Comma-separated extra files and directories."
    ),
    export_path: Path = typer.Option(
        Path(), "--export-path", help="Where to write the archive (default: here)."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing archive."),
) -> None:
    """Package a workflow into a .war archive, as torch-workflow-archiver does."""
    from tsctl.archive.workflow import WorkflowSpecArgs, write_workflow

    args = WorkflowSpecArgs(
        workflow_name=workflow_name,
        spec_file=spec_file,
        handler=handler,
        extra_files=tuple(extra_files.split(",")) if extra_files else (),
        export_path=export_path,
        force=force,
    )
    destination = write_workflow(args)
    typer.echo(f"wrote {destination}")


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(
        ..., help="A .mar, a .tar.gz, a no-archive directory, or a workflow's .war."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show an archive's manifest and files (a .war's too)."""
    from tsctl.archive.reader import open_archive
    from tsctl.archive.workflow import open_workflow

    if path.suffix == ".war" and path.is_file():
        with open_workflow(path) as war:
            manifest = war.workflow_manifest.to_dict()
            members = war.members()
            kind = "war"
    else:
        with open_archive(path) as archive:
            manifest = archive.manifest.to_dict()
            members = archive.members()
            kind = archive.kind.value
    if as_json:
        files = [{"name": m.name, "size": m.size, "kind": m.kind} for m in members]
        doc = {"path": str(path), "format": kind, "manifest": manifest, "files": files}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    about = Table(title=f"{path} ({kind})", show_header=False, title_justify="left")
    about.add_column(style="bold")
    about.add_column()
    for key, value in _flatten(manifest):
        about.add_row(key, str(value))
    console.print(about)
    listing = Table("file", "size", "kind", title_justify="left")
    for member in members:
        listing.add_row(member.name, _human(member.size), member.kind)
    console.print(listing)


def _flatten(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
