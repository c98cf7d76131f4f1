"""A test handler whose behaviour each request chooses with a JSON body {"action": ...}."""

import gc
import json
import os
import time


def handle(data, context):
    if data is None:  # TorchServe's load-time call
        return None
    out = []
    for i, row in enumerate(data):
        body = row.get("body")
        if isinstance(body, (bytes, bytearray)) and body.startswith(b"{"):
            body = json.loads(body)  # a gRPC input: raw bytes
        command = body if isinstance(body, dict) else {}
        action = command.get("action", "echo")
        if action == "raise":
            raise ValueError("boom from handler")
        if action == "short":
            return out
        if action == "die":
            os._exit(3)
        if action == "sleep":
            if "marker" in command:  # tells a test that the handler is now busy
                with open(command["marker"], "w") as fh:
                    fh.write("sleeping")
            time.sleep(command["seconds"])
        if action == "status":
            context.set_response_status(201, "Created", i)
            context.set_response_content_type(i, "text/csv")
            context.set_response_header(i, "X-Custom", "yes")
            out.append("a,b\n1,2")
            continue
        if action == "header":  # a header the request names, e.g. one with a line break
            context.set_response_header(i, command["name"], command["value"])
            out.append("ok")
            continue
        if action == "bytes":
            out.append(bytes(range(256)))
            continue
        if action == "unserializable":
            out.append({1, 2})
            continue
        out.append(
            {
                "batch": len(data),
                "pid": os.getpid(),
                "types": {k: type(v).__name__ for k, v in row.items()},
                "values": {
                    k: v if isinstance(v, (str, dict, list)) else len(v) for k, v in row.items()
                },
                "version": context.manifest["model"]["modelVersion"],
                "probe": context.get_request_header(i, "X-Probe"),
                "request_id": context.get_request_id(i),
                "threads": os.environ.get("OMP_NUM_THREADS"),
                "gc": {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()},
                "batch_keys": [sorted(r) for r in data],
            }
        )
    return out
