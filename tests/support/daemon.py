"""Real daemons for tests: archive handlers, start `tsctl serve` on free ports, talk HTTP."""

from __future__ import annotations

import http.client
import json
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cli import run_tsctl
from tests.support.daemon_logs import WATCHED
from tests.support.paths import FIXTURES
from tsctl.archive.writer import ArchiveFormat, ArchiveSpec, plan_archive, write_archive
from tsctl.local import pidfile

HANDLERS = FIXTURES / "handlers"


def make_archive(
    store: Path,
    name: str,
    handler: str,
    version: str = "1.0",
    config: dict[str, Any] | None = None,
    fmt: ArchiveFormat = ArchiveFormat.DEFAULT,
    extra: tuple[str, ...] = (),
) -> Path:
    """Archive `tests/fixtures/handlers/<handler>.py` (plus a model-config.yaml from `config`)."""
    store.mkdir(parents=True, exist_ok=True)
    work = store.parent / f"src-{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    source = HANDLERS / f"{handler}.py"
    config_file = None
    if config:
        config_file = work / "model-config.yaml"
        config_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    spec = ArchiveSpec(
        model_name=name,
        handler=str(source),
        version=version,
        config_file=config_file,
        extra_files=extra,
        archive_format=fmt,
        export_path=store,
        force=True,
    )
    return write_archive(plan_archive(spec))


@dataclass
class Server:
    """One daemon with its own state dir, log dir and free ports.

    Its `ts_log.log` and `model_log.log` are checked after each test for errors the test did
    not declare (tests/support/daemon_logs.py), from when the harness is made on."""

    root: Path
    properties: dict[str, Any] = field(default_factory=dict)
    info: pidfile.PidInfo | None = None

    def __post_init__(self) -> None:
        self.watch_logs()

    def watch_logs(self) -> None:
        """Have the tests' log check read this daemon's logs (tests/conftest.py)."""
        WATCHED.watch(self.log_dir, pidfile.pid_path(self.state_dir))

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def start(
        self,
        *models: str,
        expect_ok: bool = True,
        ncs: bool = True,
        auth: bool = False,
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Any:
        self.store.mkdir(parents=True, exist_ok=True)
        self.watch_logs()  # again: the check forgets a daemon once it is gone
        props = {
            "inference_address": "http://127.0.0.1:0",
            "management_address": "http://127.0.0.1:0",
            "metrics_address": "http://127.0.0.1:0",
            "grpc_inference_port": 0,
            "grpc_management_port": 0,
            "grpc_oip_port": 0,
            "default_workers_per_model": 1,
            **self.properties,
        }
        config = self.root / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        args = ["serve", "start", "--model-store", self.store, "--ts-config", config]
        if ncs:
            args.append("--ncs")
        if not auth:
            args.append("--disable-token-auth")
        args += flags
        args += ["--state-dir", self.state_dir, "--log-dir", self.log_dir]
        if models:
            args += ["--models", ",".join(models)]
        result = run_tsctl(*args, cwd=self.root, env=env)
        if expect_ok:
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Model server started" in result.stdout
            self.info = pidfile.read(pidfile.pid_path(self.state_dir))
            assert self.info is not None
        return result

    def stop(self) -> Any:
        return run_tsctl("serve", "stop", "--state-dir", self.state_dir)

    def tsctl(self, *args: Any) -> Any:
        """Run the CLI where this server's pid file is the local one (its state dir is the
        default one: TSCTL_STATE_DIR)."""
        return run_tsctl(*args, cwd=self.root, env={"TSCTL_STATE_DIR": str(self.state_dir)})

    @property
    def inference(self) -> str:
        assert self.info is not None
        return self.info.inference_address

    @property
    def management(self) -> str:
        assert self.info is not None
        return self.info.management_address

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        api: str = "inference",
        timeout: float = 60,
    ) -> Response:
        base = self.inference if api == "inference" else self.management
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data, headers=headers or {})
            reply = conn.getresponse()
            return Response(
                reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
            )
        finally:
            conn.close()

    def predict(self, model: str, body: bytes | str | dict[str, Any] = b"", **kw: Any) -> Response:
        headers = kw.pop("headers", {})
        if isinstance(body, dict):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **headers}
        return self.request("POST", f"/predictions/{model}", body, headers, **kw)

    def manage(self, method: str, path: str, body: bytes | str = b"", **kw: Any) -> Response:
        return self.request(method, path, body, api="management", **kw)

    def metrics_text(self) -> str:
        """The metrics API's Prometheus text."""
        assert self.info is not None
        host, port = self.info.metrics_address.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def queued(self, model: str, version: str = "1.0") -> float:
        """How many requests of a model version wait in its queue (`tsctl_queue_depth`, from
        the metrics API)."""
        return self._model_sample("tsctl_queue_depth", model, version)

    def batches_sent(self, model: str, version: str = "1.0") -> float:
        """How many batches of a model version were written to its workers
        (`tsctl_batch_size_count`, from the metrics API; a request waiting behind the one a
        worker runs is in one of them, not in the queue)."""
        return self._model_sample("tsctl_batch_size_count", model, version)

    def _model_sample(self, name: str, model: str, version: str) -> float:
        """A metric's sample for one model version from the metrics API (0 when absent)."""
        text = self.metrics_text()
        # TorchServe's label form ends each pair with a comma: {a="x",b="y",}
        labels = re.escape(f'model_name="{model}",model_version="{version}"')
        found = re.search(rf"^{name}{{{labels},?}} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def model_log(self) -> str:
        return (self.log_dir / "model_log.log").read_text()

    def access_line(self, needle: str) -> str:
        """The last access-log line containing `needle`, waiting for it to be written."""
        path = self.log_dir / "access_log.log"

        def lines() -> list[str]:
            text = path.read_text() if path.exists() else ""  # written within 100 ms
            return [line for line in text.splitlines() if needle in line]

        self.wait_for(lambda: bool(lines()))
        return lines()[-1]

    def wait_for(self, predicate: Any, timeout: float = 30) -> None:
        """Poll until `predicate()` is true (a readiness wait, not a sleep)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.02)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()
