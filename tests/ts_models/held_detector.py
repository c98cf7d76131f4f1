"""The built-in ObjectDetector with one hook for tests that need a real batch.

A request whose JSON body is `{"hold": folder}` keeps the worker busy: it creates
`folder/holding`, then waits until the test creates `folder/release`. Meanwhile the test
queues the requests that are to run as one batch (the model's `batchSize` of them).
"""

import time
from pathlib import Path
from typing import Any

from ts.torch_handler.object_detector import ObjectDetector


def hold(folder: Path) -> None:
    (folder / "holding").touch()
    while not (folder / "release").exists():
        time.sleep(0.01)


class HeldDetector(ObjectDetector):
    def handle(self, data: list[Any], context: Any) -> Any:
        body = data[0].get("body") if len(data) == 1 else None
        if isinstance(body, dict) and "hold" in body:
            hold(Path(body["hold"]))
            return [{"held": len(data)}]
        return super().handle(data, context)
