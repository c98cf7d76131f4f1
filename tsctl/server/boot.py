"""The daemon's entry point: `python -m tsctl.server.boot CONFIG_JSON [NOTIFY_FD]`.

Kept to the standard library so that its first act, starting the workers that start-up will
likely need (`tsctl.server.spares`), happens within milliseconds of launch; only then does it
import the daemon (tornado, grpc, pydantic), while those workers import torch.
"""

from __future__ import annotations

import json
import sys

from tsctl.server import spares


def main() -> None:
    raw = sys.argv[1]
    notify_fd = int(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        guess = spares.expected(json.loads(raw), spares.cpu_count())
    except (ValueError, AttributeError):
        guess = 0  # the daemon reports the bad config itself
    prestarted = spares.prestart(guess)

    from tsctl.server import daemon

    sys.exit(daemon.main(raw, notify_fd, prestarted))


if __name__ == "__main__":
    main()
