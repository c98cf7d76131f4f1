"""A custom handler as TorchServe users write them: a subclass of the built-in ImageClassifier.

Like TorchServe's MNIST example: grayscale 28x28 preprocessing with MNIST's statistics, and a
`postprocess` that answers each image's digit. torchvision's transforms are used when present,
tsctl's stand-ins otherwise.
"""

from typing import Any

from ts.torch_handler.image_classifier import ImageClassifier

try:
    from torchvision import transforms
except ImportError:
    from ts.torch_handler import _transforms as transforms


class DigitClassifier(ImageClassifier):
    image_processing = transforms.Compose(
        [
            transforms.Grayscale(),
            transforms.Resize((28, 28)),
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,)),
        ]
    )

    def postprocess(self, data: Any) -> list[int]:
        return [int(i) for i in data.argmax(1).tolist()]
