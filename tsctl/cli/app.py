"""The `tsctl` command: the root typer app, one sub-app per command group, and `main()`.

`main()` is the one place where errors become exit codes: a `TsctlError` or a usage error
prints one line, `tsctl: error: <message>`, on stderr and exits with the error's code (2 for
anything the user can fix). Any other exception is a bug in tsctl: it prints one generic line
(`INTERNAL_ERROR`), never the exception's class, text or traceback, and exits with
`EXIT_INTERNAL` (70, sysexits' EX_SOFTWARE). Nothing heavy is imported here: `tsctl --help`
and shell completion must answer without loading torch, grpc or tornado.
"""

from __future__ import annotations

import sys

import typer

from tsctl import __version__
from tsctl.cli.commands import archive, infer, models, plugins, serve, torchserve_compat
from tsctl.errors import TsctlError

app = typer.Typer(
    name="tsctl",
    help="Serve PyTorch models: archive them, run a server, manage models and send requests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(archive.app, name="archive")
app.add_typer(serve.app, name="serve")
app.add_typer(models.app, name="models")
app.add_typer(plugins.app, name="plugins")
app.registered_commands.extend(infer.app.registered_commands)
app.registered_commands.extend(torchserve_compat.app.registered_commands)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        help="Show tsctl's version and exit.",
        callback=_show_version,
        is_eager=True,
    ),
) -> None:
    """Serve PyTorch models: archive them, run a server, manage models and send requests."""


#: the one line a bug in tsctl prints (after `tsctl: error: `)
INTERNAL_ERROR = "internal error: this is a bug in tsctl, please report it with the command line"
EXIT_INTERNAL = 70


def fail(message: str, code: int) -> None:
    """Print the one-line error and exit."""
    sys.stderr.write(f"tsctl: error: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None, early: object = None) -> None:
    """Run the CLI; never lets a user error end in a traceback. `early` is a daemon
    `tsctl.cli.entry` launched ahead for `serve start`; the command finds it in its context."""
    try:
        code = app(args=argv, prog_name="tsctl", standalone_mode=False, obj=early)
    except TsctlError as exc:
        fail(exc.message, exc.exit_code)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message())
            sys.exit(0)
        fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception:
        fail(INTERNAL_ERROR, EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)
