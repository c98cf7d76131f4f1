"""Streaming handlers: tsctl's way (yield lists) and TorchServe's (send_intermediate...)."""

from tsctl.worker.streaming import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    style = context.model_yaml_config.get("handler", {}).get("style", "yield")
    if style == "yield":
        return _yielding(data)
    for step in range(2):
        send_intermediate_predict_response(
            [f"early{step} " for _ in data], context.request_ids, "Intermediate", 200, context
        )
    return ["done" for _ in data]


def _yielding(data):
    for step in range(3):
        yield [f"part{step} " for _ in data]
