"""`ts.protocol.otf_message_handler`: only `send_intermediate_predict_response`, which streaming
handlers import from here. tsctl's worker protocol is `tsctl.ipc`; TorchServe's socket
codec has no counterpart here."""

from tsctl.worker.streaming import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
