"""Streams two intermediate answers per request, through both of TorchServe's import paths."""

from ts.handler_utils.utils import send_intermediate_predict_response as send_a
from ts.protocol.otf_message_handler import send_intermediate_predict_response as send_b


def handle(data, context):
    if data is None:
        return None
    for step, send in enumerate((send_a, send_b)):
        send([f"step{step};" for _ in data], context.request_ids, "Intermediate", 200, context)
    return ["done" for _ in data]
