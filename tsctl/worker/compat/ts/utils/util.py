"""`ts.utils.util`: the helpers TorchServe handlers import, with TorchServe 0.12's behaviour.

`load_label_mapping` reads `index_to_name.json`; `map_class_to_label` turns class ids and
probabilities into `{label: probability}` rows; `list_classes_from_module` finds the classes a
module defines; `PredictionException` lets a handler choose the status of its batch's answers.
"""

from __future__ import annotations

import enum
import functools
import inspect
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, TypeVar

# raised by a handler: every request of its batch is answered `error_code` with `message`;
# tsctl's worker catches this very class
from tsctl.worker.service import PredictionException

__all__ = [
    "PT2Backend",
    "PredictionException",
    "check_valid_pt2_backend",
    "deprecated",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class PT2Backend(str, enum.Enum):
    """The `torch.compile` backends TorchServe accepts in model-config.yaml's `pt2` section."""

    EAGER = "eager"
    AOT_EAGER = "aot_eager"
    INDUCTOR = "inductor"
    NVFUSER = "nvfuser"
    AOT_NVFUSER = "aot_nvfuser"
    AOT_CUDAGRAPHS = "aot_cudagraphs"
    OFI = "ofi"
    FX2TRT = "fx2trt"
    ONNXRT = "onnxrt"
    IPEX = "ipex"
    TORCHXLA_TRACE_ONCE = "torchxla_trace_once"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    HPU_BACKEND = "hpu_backend"


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """The classes defined in `module` itself (not imported into it), in name order;
    only subclasses of `parent_class` when it is given."""
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if parent_class is not None:
        classes = [c for c in classes if issubclass(c, parent_class)]
    return classes


def check_valid_pt2_backend(backend: str) -> bool:
    """Whether `backend` names a `torch.compile` backend TorchServe knows (warns if not)."""
    if backend in {member.value for member in PT2Backend}:
        return True
    logger.warning("%s is not a supported backend", backend)
    return False


def load_label_mapping(mapping_file_path: str) -> dict[str, str] | None:
    """Read `{class id: label}` from a JSON file; `None` (with a warning) when it is missing.

    A label given as a list (`["n01440764", "tench"]`) becomes its last item; the older
    `{"object_type_names": [...]}` form becomes `{"0": ..., "1": ...}`.
    """
    if not os.path.isfile(mapping_file_path):
        logger.warning(
            "%r is missing. Inference output will not include class name.", mapping_file_path
        )
        return None
    with open(mapping_file_path, encoding="utf-8") as fh:
        mapping = json.load(fh)
    if not isinstance(mapping, dict):
        raise Exception(  # TorchServe raises a plain Exception here; handlers may catch it
            f'{mapping_file_path}: index->name JSON mapping should be in "class": "label" format.'
        )
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return {str(i): name for i, name in enumerate(names)}
    for key, value in mapping.items():
        label = value[-1] if isinstance(value, list) and value else value
        if not isinstance(label, str):
            raise Exception(
                f"{mapping_file_path}: label of {key!r} must be a str or a list of str, "
                f"not {value!r}"
            )
        mapping[key] = label
    return mapping


def map_class_to_label(
    probs: list[Any],
    mapping: dict[str, str] | None = None,
    lbl_classes: Iterable[Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One `{label: probability}` dict per row of `probs`.

    `lbl_classes` gives each row's class ids (e.g. top-k indices); without it the ids are
    0..n-1. Ids are looked up in `mapping` as strings, or used as labels themselves.
    """
    if not isinstance(probs, list):
        raise Exception("Convert classes to list before doing mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise Exception("Mapping must be a dict")
    if lbl_classes is None:
        lbl_classes = itertools.repeat(range(len(probs[0])), len(probs))
    return [
        {
            (mapping[str(cls)] if mapping is not None else str(cls)): prob
            for cls, prob in zip(classes, row, strict=False)
        }
        for classes, row in zip(lbl_classes, probs, strict=False)
    ]


def get_yaml_config(yaml_file_path: str) -> dict[str, Any]:
    """Parse a YAML file (a model-config.yaml) with `yaml.safe_load`."""
    import yaml

    with open(yaml_file_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    return config if config is not None else {}


def deprecated(
    version: str, replacement: str = "", klass: type[Warning] = PendingDeprecationWarning
) -> Callable[[F], F]:
    """Mark a function deprecated: calling it warns with `klass`."""

    def deprecator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            warnings.warn(
                f"{func.__name__} is deprecated in {version} and moved to {replacement}",
                klass,
                stacklevel=2,
            )
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deprecator
