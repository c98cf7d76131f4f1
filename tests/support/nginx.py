"""A real nginx in front of tsctl replicas, for tests: a config written into the test's folder,
nginx run in the foreground as this process's child on a free loopback port, stopped (and
waited for) by the test.

Everything nginx writes (pid file, logs, temp folders) stays in that folder: nginx is started
with `-p <folder> -e <folder>/error.log`, so it never opens `/var/log/nginx` or
`/run/nginx.pid`, and it leaves nothing behind. `binary()` is None where nginx is not installed
(the test then skips; `.ci/run` installs it with apt where it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: where Debian puts it: /usr/sbin is not on every user's PATH
_DEBIAN = Path("/usr/sbin/nginx")

#: the proxy's policy, what the replica test relies on:
#: - HTTP/1.1 with an empty `Connection` header: keep-alive connections to the replicas, as a
#:   production proxy has them (the case where a stopping replica's open connections matter);
#: - `proxy_next_upstream`: a request is tried on the next replica when the connection fails
#:   (`error`: refused by a closed listener, reset, closed before an answer), times out,
#:   or is answered 502/503 (a draining replica answers 503). `non_idempotent`: predictions are
#:   POSTs, which nginx otherwise never retries once any byte was sent. A prediction is
#:   stateless, so running it twice (on a replica killed mid-answer, then on another) is safe;
#: - `max_fails=1 fail_timeout=1s` per server: a replica that failed is skipped for 1 s, then
#:   tried again (a restarted replica is back within a second);
#: - the upstream `keepalive_timeout` (30 s) is below tsctl's `keep_alive_timeout` (60 s), so
#:   nginx never reuses a connection the replica is closing on its idle timer;
#: - `X-Upstream` / `X-Upstream-Status`: which replicas a request was sent to and what each
#:   answered (`127.0.0.1:1, 127.0.0.1:2` / `503, 200` for a retried one).
LOCATION = """
            proxy_pass http://tsctl;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 0;
            proxy_next_upstream_timeout 20s;
            proxy_connect_timeout 2s;
            proxy_send_timeout 10s;
            proxy_read_timeout 20s;
            add_header X-Upstream $upstream_addr always;
            add_header X-Upstream-Status $upstream_status always;
"""


def binary() -> str | None:
    """The nginx executable, or None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return str(_DEBIAN) if os.access(_DEBIAN, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(folder: Path, port: int, upstreams: Sequence[str], backups: Sequence[str] = ()) -> str:
    """nginx.conf: one worker, `port` on 127.0.0.1 proxying to `upstreams` (host:port), and to
    `backups` only while every one of `upstreams` is failing."""
    servers = "".join(
        f"        server {u} max_fails=1 fail_timeout=1s{' backup' if u in backups else ''};\n"
        for u in [*upstreams, *backups]
    )
    temp = "".join(
        f"    {kind}_temp_path {folder / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{
    worker_connections 512;
}}
http {{
    log_format upstreams '$status $request_time "$upstream_addr" "$upstream_status"';
    access_log {folder / "access.log"} upstreams;
{temp}
    upstream tsctl {{
{servers}
        keepalive 16;
        keepalive_timeout 30s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{{LOCATION}        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground, a child of this process (a context manager)."""

    def __init__(self, folder: Path, upstreams: Sequence[str], backups: Sequence[str] = ()) -> None:
        exe = binary()
        assert exe is not None, "nginx is not installed"
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "nginx.conf"
        self.conf.write_text(config(folder, self.port, upstreams, backups))
        self.args = [exe, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(self.conf)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        check = subprocess.run([*self.args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:  # ready once its port accepts
            assert self.process.poll() is None, self.error_log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen in time"
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGQUIT (nginx's graceful stop), then SIGKILL if it lingers; waits for it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text() if path.exists() else ""

    def access_lines(self) -> list[str]:
        path = self.folder / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
