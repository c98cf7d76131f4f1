"""A module-level handle that imports the `ts` names TorchServe handlers use, reports what it
found, and emits metrics the TorchServe ways."""

import ts
import ts.torch_handler.base_handler as base_module
from ts.context import Context, RequestProcessor
from ts.handler_utils.micro_batching import MicroBatching
from ts.handler_utils.timer import timed
from ts.handler_utils.utils import send_intermediate_predict_response as send_a
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import send_intermediate_predict_response as send_b
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import (
    PredictionException,
    list_classes_from_module,
    load_label_mapping,
    map_class_to_label,
)

LOADED = {}


def handle(data, context):
    if data is None:  # called once at load, as TorchServe does
        LOADED["initialized_with"] = type(context).__name__
        return None
    context.metrics.add_counter("CompatSeen", len(data), None, [Dimension("Kind", "compat")])
    context.metrics.add_metric("CompatGauge", 7, "count", None, [], MetricTypes.GAUGE)
    context.metrics.get_metric("CompatSeen", MetricTypes.COUNTER).add_or_update(1, ["compat"])
    report = {
        "ts_version": ts.__version__,
        "from_tsctl": "tsctl" in ts.__file__,
        "is_context": isinstance(context, Context),
        "is_processor": isinstance(context.request_processor[0], RequestProcessor),
        "initialized_with": LOADED.get("initialized_with"),
        "labels": map_class_to_label([[0.25, 0.75]], {"0": "cat", "1": "dog"}),
        "mapping_missing": load_label_mapping("/nonexistent/index_to_name.json"),
        "classes": [c.__name__ for c in list_classes_from_module(base_module)],
        "callables": all(callable(x) for x in (timed, send_a, send_b, MicroBatching, BaseHandler)),
        "exception": str(PredictionException("m", 400)),
        "handler_config": context.model_yaml_config["handler"],
        "batch_size": context.system_properties["batch_size"],
        "limit_max_image_pixels": context.system_properties["limit_max_image_pixels"],
    }
    return [report for _ in data]
