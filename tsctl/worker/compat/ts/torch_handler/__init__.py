"""TorchServe handler classes: `BaseHandler` and the built-in handlers that extend it."""
