"""The real TorchServe 0.12, run from its own virtual environment, for parity tests.

`TorchServe` starts `torchserve --start` on free ports through the launcher the benchmarks use
(benchmarks/lib/torchserve.py, which says why the tests import it and not the other way
round): the launcher's pid file, the Java frontend's temp dir (worker sockets and extracted
models) and its `logs/` all live under `root`, so it never touches another TorchServe, another
test run, or tsctl. It waits for models through the management API (a READY worker) and
recognises a model whose worker dies while loading from TorchServe's logs (`ts_log.log`,
`model_log.log`). `stop()` runs `torchserve --stop` and then makes sure the Java frontend and
its Python workers are gone (they share the launcher's process group, which is killed when
they linger).

`unavailable(venv)` says why TorchServe cannot run here (no venv, no `java`); tests skip then.
`call()` sends one HTTP request to either server, so both get byte-identical requests.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lib.procs import free_ports, group_members
from benchmarks.lib.rest import Reply, call, ready_workers
from benchmarks.lib.torchserve import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TorchServeLauncher,
    write_properties,
)

#: where the TorchServe venv is unless the environment variable names another
DEFAULT_VENV = Path("/work/ts-venv")
VENV_VARIABLE = "TSCTL_TS_VENV"
#: the last line of a Python traceback, as TorchServe's model_log.log carries it
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def venv_from_environment() -> Path:
    """The TorchServe venv: `$TSCTL_TS_VENV`, else `/work/ts-venv` (read when called)."""
    value = os.environ.get(VENV_VARIABLE, "").strip()
    return Path(value) if value else DEFAULT_VENV


def unavailable(venv: Path) -> str | None:
    """Why TorchServe 0.12 cannot run from `venv` on this machine, or None when it can."""
    if not (venv / "bin" / "torchserve").is_file():
        return (
            f"no TorchServe at {venv}/bin/torchserve (set {VENV_VARIABLE} to a venv with "
            "torchserve==0.12.0, torch-model-archiver==0.12.0 and captum)"
        )
    if shutil.which("java") is None:
        return "no `java` on PATH: TorchServe's frontend needs Java 17"
    return None


class ModelLoadFailed(RuntimeError):
    """TorchServe's worker for a model died while loading it; `reason`: its error lines."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"TorchServe could not load {model!r}: {reason}")
        self.model = model
        self.reason = reason


@dataclass
class TorchServe:
    """One TorchServe 0.12 with its own folder and free ports (see the module docstring)."""

    venv: Path
    root: Path
    store: Path
    properties: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    pgid: int | None = None

    @property
    def launcher(self) -> TorchServeLauncher:
        return TorchServeLauncher(
            self.venv,
            self.root,
            {"OMP_NUM_THREADS": "1"},  # small models, a shared machine
            unset=("VIRTUAL_ENV", "PYTHONPATH"),
        )

    @property
    def model_log(self) -> Path:
        return self.root / "logs" / "model_log.log"

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def grpc_inference(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    def start(self, *models: str) -> None:
        """`torchserve --start --ncs` with `models` (archive names in the store); returns once
        the management API answers. Wait for each model with `wait_loaded`."""
        names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        config = write_properties(
            self.root / "config.properties",
            {
                "inference_address": self.inference,
                "management_address": self.management,
                "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
                "grpc_inference_port": self.ports["grpc_inference"],
                "grpc_management_port": self.ports["grpc_management"],
                "default_workers_per_model": 1,
                "install_py_dep_per_model": "false",
                "disable_system_metrics": "true",
                "enable_model_api": "true",  # lets `unregister` stop a model that cannot load
                **self.properties,
            },
        )
        launcher = self.launcher.launch(self.store, config, ",".join(models))
        self.pgid = launcher.pid
        code = launcher.wait(START_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"torchserve --start failed ({code}): {self.output()}")
        self._wait(lambda: self._answers("/models"), "answer from its management API")

    def wait_loaded(self, model: str, timeout: float = START_TIMEOUT_S) -> None:
        """Return once `model` has a READY worker; raise ModelLoadFailed when its worker died
        while loading (TorchServe would keep restarting it: `unregister` it)."""
        deadline = time.monotonic() + timeout
        while not self._ready(model):
            reason = self.load_failure(model)
            if reason is not None:
                raise ModelLoadFailed(model, reason)
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe: {model!r} not ready in {timeout:.0f} s")
            time.sleep(0.1)

    def load_failure(self, model: str) -> str | None:
        """The errors that killed `model`'s worker while it loaded, from TorchServe's logs:
        None until a worker of the model died and its output was read to the end."""
        logs = self.root / "logs"
        frontend = self._read(logs / "ts_log.log")
        name = re.escape(model)
        if not re.search(rf"Stopped Scanner - W-\d+-{name}_[^_\s]*-stdout", frontend):
            return None  # no worker of the model has exited yet (or its output is unread)
        prefix = re.compile(rf"\bW-\d+-{name}_[^_\s]*-stdout MODEL_LOG - (.*)$")
        found = (prefix.search(line) for line in self._read(self.model_log).splitlines())
        lines = [match.group(1) for match in found if match]
        if not any(line.startswith("Backend worker process died") for line in lines):
            return None
        # TorchServe imports a handler twice (as a module, then from ts.torch_handler): each
        # attempt's error counts, e.g. a missing torchvision first, then "No module named ..."
        errors = dict.fromkeys(line for line in lines if EXCEPTION_LINE.match(line))
        return "; ".join(errors) or "its worker died while loading (see model_log.log)"

    def unregister(self, model: str) -> Reply:
        return call(self.management, "DELETE", f"/models/{model}")

    def stop(self) -> None:
        """`torchserve --stop`, then wait for the whole process group (kill what lingers)."""
        if self.pgid is None:
            return
        self.launcher.stop()
        pgid, self.pgid = self.pgid, None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def output(self) -> str:
        """The tail of what the launcher and the frontend printed (for error messages)."""
        return self.launcher.output()

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def _ready(self, model: str) -> bool:
        return ready_workers(self.management, model) > 0

    def _answers(self, path: str) -> bool:
        try:
            return call(self.management, "GET", path, timeout=5).status == 200
        except (OSError, http.client.HTTPException):
            return False

    def _check_alive(self) -> None:
        if self.pgid is not None and not group_members(self.pgid):
            raise RuntimeError(f"TorchServe exited: {self.output()}")

    def _wait(self, predicate: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not predicate():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe: no {what} in time: {self.output()}")
            time.sleep(0.1)
