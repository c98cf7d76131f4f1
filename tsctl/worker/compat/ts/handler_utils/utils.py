"""`ts.handler_utils.utils`: streaming intermediate answers, and importing a class by name."""

from __future__ import annotations

import importlib
from typing import Any

from tsctl.worker.streaming import send_intermediate_predict_response

__all__ = ["import_class", "send_intermediate_predict_response"]


def import_class(class_name: str, module_prefix: str | None = None) -> Any:
    """The class `module.Class` names (the module under `module_prefix` when given)."""
    if not class_name:
        raise ImportError("class name is not defined")
    module_name, _, name = class_name.rpartition(".")
    if module_prefix:
        target = f"{module_prefix}.{module_name}" if module_name else module_prefix
    elif module_name:
        target = module_name
    else:
        raise ImportError(f"module name of class {class_name!r} is not defined")
    found = getattr(importlib.import_module(target), name, None)
    if found is None:
        raise ImportError(f"class {name!r} not found in module {target!r}")
    return found
