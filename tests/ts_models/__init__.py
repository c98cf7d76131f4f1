"""Models, handlers and image makers for tests/test_ts_handlers.py (TorchServe's handlers)."""
