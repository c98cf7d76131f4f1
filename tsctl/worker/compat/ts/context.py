"""`ts.context`: the handler's context, tsctl's own classes under TorchServe's module name.

Re-exported (not copied) so that `isinstance(context, ts.context.Context)` holds for the
context a tsctl worker passes to handlers.
"""

from tsctl.worker.context import Context, RequestProcessor

__all__ = ["Context", "RequestProcessor"]
