"""The TorchServe release whose handler API this package implements."""

__version__ = "0.12.0"
