"""tsctl's implementation of TorchServe's `ts` package, for handlers written against it.

Only the worker imports it (with `tsctl/worker/compat` first on `sys.path`).
"""

from ts.version import __version__

__all__ = ["__version__"]
