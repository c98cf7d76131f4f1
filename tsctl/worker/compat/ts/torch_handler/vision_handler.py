"""`VisionHandler`: TorchServe's base class for image handlers, without torchvision or captum.

Each request holds one image, as TorchServe reads it: the row's `data` field (a multipart
field of that name), else its `body`. Bytes are opened with PIL and go through
`self.image_processing` (set by subclasses: our `_transforms`, a torchvision `Compose` or any
callable); a base64 string is decoded first; a list (a JSON body) is taken as the image tensor
itself. The images are stacked into one tensor on `self.device` (`stacked = False`, as the
object detector sets, passes the model a list of tensors instead, which may differ in size).

Each request is read on its own: one that cannot be (not an image, not base64, over PIL's
decompression-bomb limit, a tensor of another shape than the batch's others) is answered 400
alone, with a message saying why, and the rest of the batch runs through the model as usual
(see `ts.torch_handler._per_request`, which also keeps every per-batch value off the handler,
so that the handler is safe inside TorchServe's `MicroBatching`).

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
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ts.handler_utils.timer import timed
from ts.torch_handler._per_request import Carried, PerRequestSteps, gather, request_value
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException
from tsctl.worker.envelope import EnvelopeInputError

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


def request_inputs(row: Any) -> list[Any]:
    """The image(s) of one request: its `data` or `body`, else each of its binary parts; an
    `EnvelopeInputError` when it holds none."""
    value = request_value(row)
    if value is not None or not isinstance(row, dict):
        return [value]
    parts = [v for v in row.values() if isinstance(v, (bytes, bytearray))]
    if not parts:
        fields = ", ".join(map(repr, row)) or "none"
        raise EnvelopeInputError(
            "the request holds no image: send it as the body or as a multipart field named "
            f"'data' (fields: {fields})"
        )
    return parts


def too_large(exc: Image.DecompressionBombError) -> EnvelopeInputError:
    """The answer to an image over PIL's decompression-bomb limit: what the limit is, and
    which setting lifts it."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return EnvelopeInputError(
        f"the image is over PIL's decompression-bomb limit of {limit} pixels ({exc}); "
        "limit_max_image_pixels=false in the server's config.properties lifts the limit"
    )


def open_image(data: bytes | bytearray) -> Image.Image:
    """The image in `data`, decoded (so that a truncated file fails here); an
    `EnvelopeInputError` saying why it cannot be read."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        raise too_large(exc) from exc
    except UnidentifiedImageError as exc:  # its text only names an in-memory file
        raise EnvelopeInputError(f"{len(data)} bytes that PIL cannot read as an image") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # e.g. a truncated file
        raise EnvelopeInputError(
            f"{len(data)} bytes that PIL cannot read as an image ({exc})"
        ) from exc
    return image


def one_shape(
    per_request: list[list[torch.Tensor] | EnvelopeInputError],
) -> list[list[torch.Tensor] | EnvelopeInputError]:
    """`per_request` with each request whose tensors differ in shape from the batch's most
    common one (the first seen, on a tie) turned into an error: a stack takes one shape."""
    shapes = Counter(
        tuple(t.shape) for found in per_request if isinstance(found, list) for t in found
    )
    if len(shapes) < 2:
        return per_request
    shape = shapes.most_common(1)[0][0]
    checked: list[list[torch.Tensor] | EnvelopeInputError] = []
    for found in per_request:
        odd = [t for t in found if t.shape != shape] if isinstance(found, list) else []
        if odd:
            found = EnvelopeInputError(
                f"after image_processing the request's image has shape {tuple(odd[0].shape)}, "
                f"the others of its batch {shape}: the model takes one shape per batch"
            )
        checked.append(found)
    return checked


class VisionHandler(PerRequestSteps, BaseHandler, ABC):
    """Base class of the image handlers: images in, a stacked tensor to the model."""

    #: image -> tensor; subclasses set it (a torchvision Compose, `_transforms` or a callable)
    image_processing: Callable[[Any], Any] | None = None
    #: stack the images into one tensor (False: the model gets a list of image tensors)
    stacked = True
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
    def preprocess(self, data: list[Any]) -> Carried:
        """Every readable request's image(s) through `image_processing`, stacked on
        `self.device` (or a list, when not `stacked`); each unreadable one an error."""
        per_request = [self._request_tensors(row) for row in data]
        if self.stacked:
            per_request = one_shape(per_request)
        images, layout = gather(per_request)
        batch: Any = None
        if images and self.stacked:
            batch = torch.stack(images).to(self.device)
        elif images:
            batch = [image.to(self.device) for image in images]
        return Carried(batch, layout)

    def _request_tensors(self, row: Any) -> list[torch.Tensor] | EnvelopeInputError:
        """The tensors of one request's images, or the error that answers it."""
        try:
            values = request_inputs(row)
        except EnvelopeInputError as exc:
            return exc
        tensors = []
        for n, value in enumerate(values, 1):
            try:
                tensors.append(self._to_tensor(value))
            except EnvelopeInputError as exc:
                if len(values) == 1:
                    return exc
                return EnvelopeInputError(f"image {n} of the request: {exc.message}")
        return tensors

    def _to_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise EnvelopeInputError(f"a text image must be base64 ({exc})") from exc
        if isinstance(value, (bytes, bytearray)):
            image = open_image(value)
            if self.image_processing is None:
                raise TypeError(f"{type(self).__name__} sets no image_processing")
            try:  # PIL checks the limit again when a transform makes an image (crop)
                return torch.as_tensor(self.image_processing(image))
            except Image.DecompressionBombError as exc:
                raise too_large(exc) from exc
        try:
            return torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EnvelopeInputError(
                f"expected an image or a nested list of numbers, not {type(value).__name__}"
            ) from exc

    def get_insights(self, tensor_data: torch.Tensor, _: Any, target: Any = 0) -> Any:
        """Integrated-gradients attributions of each image for class `target`."""
        logger.debug("explaining a batch of shape %s", tuple(tensor_data.shape))
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()
