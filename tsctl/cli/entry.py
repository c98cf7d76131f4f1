"""The `tsctl` executable's entry point: the CLI, after one head start.

`tsctl serve start --models ...` spends a few tenths of a second importing typer and the
command modules before its command runs; the server's first worker then needs over a second
to import torch. So when the arguments plainly ask for that (`serve start` with `--models`, in
the background), the daemon is launched here first, before any of those imports (see
`tsctl.local.launch`), and handed to the command. A launch the command does not take (the
arguments turn out to be wrong) ends when this process exits: the daemon reads no
configuration and stops at once.
"""

from __future__ import annotations

import sys


def wants_early_daemon(args: list[str]) -> bool:
    """`serve start` with start-up models, not in the foreground, not asking for help."""
    if args[:2] != ["serve", "start"]:
        return False
    rest = args[2:]
    if any(a in ("--foreground", "--help", "-h") for a in rest):
        return False
    return any(a == "--models" or a.startswith("--models=") for a in rest)


def main() -> None:
    early = None
    if wants_early_daemon(sys.argv[1:]):
        from tsctl.errors import TsctlError
        from tsctl.local.launch import launch_daemon
        from tsctl.server import boot

        try:
            early = launch_daemon(boot.main, early_spares=1)
        except TsctlError:
            early = None  # the command launches it again and reports the error on one line
    from tsctl.cli.app import main as cli_main

    cli_main(early=early)
