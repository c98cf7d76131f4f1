"""kserve's own REST client, run in a child process: `import kserve` registers its gRPC
modules' protobuf package `inference` (as tritonclient's gRPC module and tsctl's OIP stubs do),
so it never enters the test process. `run(script, base)` runs an async `main(base)` defined
in `script` with kserve imported and returns what it printed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PRELUDE = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest
from kserve.inference_client import RESTConfig
from kserve.protocol.infer_type import RequestedOutput
"""


def run(script: str, base: str, timeout: float = 120) -> str:
    code = PRELUDE + textwrap.dedent(script) + "\nasyncio.run(main(sys.argv[1]))\n"
    done = subprocess.run(
        [sys.executable, "-c", code, base],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
