"""Streaming answers from a handler, TorchServe's way.

`send_intermediate_predict_response(ret, req_id_map, message, code, context)` has TorchServe's
signature: it sends `ret` (one answer per request of the batch) to the clients now, before
`handle` returns its final list. tsctl's own way is a `handle` that yields lists.
"""

from __future__ import annotations

from typing import Any


def send_intermediate_predict_response(
    ret: list[Any], req_id_map: Any, message: str, code: int, context: Any
) -> None:
    send = getattr(context, "send_intermediate", None)
    if send is None:
        raise RuntimeError("intermediate responses can only be sent while handling a batch")
    send(ret)
