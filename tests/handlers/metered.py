"""A handler that emits its own metrics through context.metrics, as TorchServe handlers do."""


def handle(data, context):
    if data is None:
        return None
    context.metrics.add_counter("ImagesSeen", len(data), None, {"Source": "test"})
    context.metrics.add_time("DecodeTime", 12.5)
    return [{"ok": True} for _ in data]
