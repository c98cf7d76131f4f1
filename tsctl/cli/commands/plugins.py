"""`tsctl plugins list`: the plugins a server started here would load, and any that cannot.

It imports them as the daemon would (installed entry points in the group `tsctl.plugins`, and
the folder of `--plugins-path`), so a plugin that fails here stops `serve start` too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Plugins: custom endpoints, authorizers and batching strategies (docs/plugins.md).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("list")
def list_plugins(
    plugins_path: Path | None = typer.Option(
        None, "--plugins-path", "--ppath", help="Also look in this folder (setting plugins_path)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON, for scripts."),
) -> None:
    """List installed plugins and those in a folder: name, kind, where from, and whether
    it loaded."""
    from tsctl.errors import InvalidInput
    from tsctl.plugins.loader import discover

    if plugins_path is not None and not plugins_path.is_dir():
        raise InvalidInput(f"plugins path {str(plugins_path)!r} is not a directory")
    result = discover(plugins_path)
    for warning in result.warnings:
        sys.stderr.write(f"tsctl: warning: {warning}\n")
    rows = [
        {
            "name": f.name,
            "kind": f.kind or "?",
            "source": f.source,
            "loaded": f.plugin is not None,
            "error": f.error,
        }
        for f in result.found
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("No plugins found.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "KIND", "SOURCE", "STATUS"):
        table.add_column(column, overflow="fold")
    for row in rows:
        status = "loaded" if row["loaded"] else f"error: {row['error']}"
        table.add_row(str(row["name"]), str(row["kind"]), str(row["source"]), status)
    Console(soft_wrap=True).print(table)
