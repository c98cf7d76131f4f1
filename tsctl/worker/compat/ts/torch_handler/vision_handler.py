"""`VisionHandler`: TorchServe's base class for image handlers, without torchvision or captum.

Each request holds one image, as TorchServe reads it: the row's `data` field (a multipart
field of that name), else its `body`. Bytes are opened with PIL and go through
`self.image_processing` (set by subclasses: our `_transforms`, a torchvision `Compose` or any
callable); a base64 string is decoded first; a list (a JSON body) is taken as the image tensor
itself. The batch is stacked and moved to `self.device`.

tsctl's one extension: a request with neither `data` nor `body` (as `tsctl infer` sends
several files, one multipart part per file) has each of its binary parts taken as one image,
and is answered with the list of their results, in order.

Explanations (`get_insights`, through `explain_handle`) use captum's IntegratedGradients when
captum is installed; it is imported on first use, and its absence is reported as a clear error.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import logging
from abc import ABC
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ts.handler_utils.timer import timed
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

logger = logging.getLogger(__name__)

CAPTUM_MISSING = (
    "explanations need captum, which is not installed in the worker's Python environment "
    "(pip install captum)"
)


def captum_attr() -> Any:
    """`captum.attr`, or a `PredictionException` (501) saying captum is missing."""
    try:
        return importlib.import_module("captum.attr")
    except ImportError as exc:
        raise PredictionException(CAPTUM_MISSING, 501) from exc


def request_inputs(row: Any, idx: int) -> list[Any]:
    """The image(s) of one request: its `data` or `body`, else each of its binary parts."""
    if not isinstance(row, dict):
        return [row]
    value = row.get("data") or row.get("body")
    if value is not None:
        return [value]
    parts = [v for v in row.values() if isinstance(v, (bytes, bytearray))]
    if not parts:
        fields = ", ".join(map(repr, row)) or "none"
        raise PredictionException(
            f"request {idx} holds no image: send it as the body or as a multipart field "
            f"named 'data' (fields: {fields})",
            400,
        )
    return parts


class VisionHandler(BaseHandler, ABC):
    """Base class of the image handlers: images in, a stacked tensor to the model."""

    #: image -> tensor; subclasses set it (a torchvision Compose, `_transforms` or a callable)
    image_processing: Callable[[Any], Any] | None = None
    #: images per request of the last batch (more than 1 only with tsctl's extension)
    images_per_request: Sequence[int] = ()
    _ig: Any = None  # class-level defaults: subclasses need not call our __init__

    def initialize(self, context: Any) -> None:
        """BaseHandler's loading; `limit_max_image_pixels=false` lifts PIL's size limit."""
        super().initialize(context)
        if not context.system_properties.get("limit_max_image_pixels", True):
            Image.MAX_IMAGE_PIXELS = None
        self.initialized = True

    @property
    def ig(self) -> Any:
        """captum's IntegratedGradients over `self.model`, made on first use."""
        if self._ig is None:
            self._ig = captum_attr().IntegratedGradients(self.model)
        return self._ig

    @ig.setter
    def ig(self, value: Any) -> None:
        self._ig = value

    @timed
    def preprocess(self, data: list[Any]) -> torch.Tensor:
        """Every request's image through `image_processing`, stacked on `self.device`."""
        per_request = [request_inputs(row, idx) for idx, row in enumerate(data)]
        self.images_per_request = [len(inputs) for inputs in per_request]
        images = [
            self._to_tensor(value, idx)
            for idx, inputs in enumerate(per_request)
            for value in inputs
        ]
        try:
            batch = torch.stack(images)
        except RuntimeError as exc:
            shapes = sorted({tuple(image.shape) for image in images})
            raise PredictionException(
                f"the images of a batch must have one shape after image_processing, got {shapes}",
                400,
            ) from exc
        return batch.to(self.device)

    def _to_tensor(self, value: Any, idx: int) -> torch.Tensor:
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise PredictionException(
                    f"request {idx}: a text image must be base64 ({exc})", 400
                ) from exc
        if isinstance(value, (bytes, bytearray)):
            try:
                image = Image.open(io.BytesIO(value))
            except UnidentifiedImageError as exc:
                raise PredictionException(
                    f"request {idx}: {len(value)} bytes that PIL cannot read as an image", 400
                ) from exc
            except Image.DecompressionBombError as exc:
                raise PredictionException(
                    f"request {idx}: {exc} (limit_max_image_pixels=false lifts the limit)", 413
                ) from exc
            if self.image_processing is None:
                raise TypeError(f"{type(self).__name__} sets no image_processing")
            return torch.as_tensor(self.image_processing(image))
        try:
            return torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PredictionException(
                f"request {idx}: expected an image or a nested list of numbers, "
                f"not {type(value).__name__}",
                400,
            ) from exc

    def handle(self, data: list[Any], context: Any) -> Any:
        """BaseHandler's `handle`; a request that held several images gets a list of results."""
        self.images_per_request = []
        output = super().handle(data, context)
        counts = self.images_per_request
        if not counts or all(n == 1 for n in counts) or not isinstance(output, list):
            return output
        if len(output) != sum(counts):
            return output
        grouped: list[Any] = []
        start = 0
        for n in counts:
            grouped.append(output[start] if n == 1 else output[start : start + n])
            start += n
        return grouped

    def get_insights(self, tensor_data: torch.Tensor, _: Any, target: Any = 0) -> Any:
        """Integrated-gradients attributions of each image for class `target`."""
        logger.debug("explaining a batch of shape %s", tuple(tensor_data.shape))
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()
