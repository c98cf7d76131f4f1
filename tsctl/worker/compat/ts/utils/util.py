"""`ts.utils.util`: the helpers TorchServe handlers import, with TorchServe 0.12's behaviour.

`load_label_mapping` reads `index_to_name.json`; `map_class_to_label` turns class ids and
probabilities into `{label: probability}` rows; `list_classes_from_module` finds the classes a
module defines; `PredictionException` lets a handler choose the status of its batch's answers.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, TypeVar, cast

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
    """`{class id: label}` from a JSON file such as an archive's `index_to_name.json`; None,
    with a warning, when there is no such file.

    Each label is a string, or a list whose last item is the label (ImageNet's
    `["n01440764", "tench"]`). The older `{"object_type_names": [...]}` layout numbers its
    labels from 0. Any other shape raises `Exception` (the class TorchServe raises, which
    handlers may catch) naming the file.
    """
    if not os.path.isfile(mapping_file_path):
        logger.warning(
            "no label file %r: answers will name classes by their ids", mapping_file_path
        )
        return None
    with open(mapping_file_path, encoding="utf-8") as fh:
        document = json.load(fh)
    if not isinstance(document, dict):
        raise Exception(  # TorchServe raises this class; handlers may catch it
            f"{mapping_file_path} must hold a JSON object of class id to label, not a "
            f"{type(document).__name__}"
        )
    ordered = document.get("object_type_names")
    if isinstance(ordered, list):
        return {str(position): label for position, label in enumerate(ordered)}
    return {key: _label_of(mapping_file_path, key, entry) for key, entry in document.items()}


def _label_of(path: str, key: str, entry: Any) -> str:
    label = entry[-1] if isinstance(entry, list) and entry else entry
    if isinstance(label, str):
        return label
    raise Exception(  # TorchServe raises this class; handlers may catch it
        f"{path}: class {key!r} needs a label string or a list ending in one, not {entry!r}"
    )


def map_class_to_label(
    probs: list[Any],
    mapping: dict[str, str] | None = None,
    lbl_classes: Iterable[Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per row of `probs`, a dict `{label: probability}`.

    `lbl_classes` holds each row's class ids (e.g. its top-k indices); without it, every row
    uses the ids 0..n-1, n being the first row's length. An id is looked up in `mapping` as a
    string, or is the label itself (as a string) when there is no mapping. Rows and ids pair
    up as far as both go.
    """
    if not isinstance(probs, list):
        raise Exception(  # TorchServe raises this class; handlers may catch it
            f"map_class_to_label takes probabilities as a list (use .tolist()), not "
            f"{type(probs).__name__}"
        )
    if mapping is not None and not isinstance(mapping, dict):
        raise Exception(  # TorchServe raises this class; handlers may catch it
            f"map_class_to_label takes a dict of class id to label, not {type(mapping).__name__}"
        )
    if lbl_classes is None:
        width = len(probs[0])  # an empty batch raises here, as in TorchServe
        lbl_classes = [range(width)] * len(probs)

    def label(class_id: Any) -> str:
        return str(class_id) if mapping is None else mapping[str(class_id)]

    labelled: list[dict[str, Any]] = []
    for row_ids, row in zip(lbl_classes, probs, strict=False):
        labelled.append({label(c): p for c, p in zip(row_ids, row, strict=False)})
    return labelled


def get_yaml_config(yaml_file_path: str) -> dict[str, Any]:
    """Parse a YAML file (a model-config.yaml) with `yaml.safe_load`."""
    import yaml

    with open(yaml_file_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    return config if config is not None else {}


def deprecated(
    version: str, replacement: str = "", klass: type[Warning] = PendingDeprecationWarning
) -> Callable[[F], F]:
    """A decorator: each call of the decorated function warns (category `klass`) that it is
    deprecated since `version`, pointing to `replacement`, then runs it."""

    def mark(func: F) -> F:
        notice = f"{func.__name__} is deprecated since {version}"
        if replacement:
            notice += f"; use {replacement} instead"

        @functools.wraps(func)
        def warn_then_call(*args: Any, **kwargs: Any) -> Any:
            warnings.warn(notice, klass, stacklevel=2)
            return func(*args, **kwargs)

        return cast(F, warn_then_call)

    return mark
