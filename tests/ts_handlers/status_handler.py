"""Reads a request header and chooses each answer's status and headers; raises TorchServe's
PredictionException when asked to (with a status, or with a code that is none)."""

from ts.utils.util import PredictionException


def handle(data, context):
    if data is None:
        return None
    answers = []
    for idx, _ in enumerate(data):
        wanted = context.get_request_header(idx, "x-wanted-status")
        if wanted == "raise":
            raise PredictionException("bad thing", 418)
        if wanted == "no-code":
            raise PredictionException("no usable code", None)
        context.set_response_status(int(wanted or 200), "Chosen", idx)
        context.set_response_header(idx, "X-Seen-Header", str(wanted))
        answers.append({"wanted": wanted, "request_id": context.get_request_id(idx)})
    return answers
