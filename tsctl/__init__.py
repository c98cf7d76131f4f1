"""tsctl: a CLI-first, Java-free model server for PyTorch, and a drop-in successor to TorchServe."""

__version__ = "0.1.0"
