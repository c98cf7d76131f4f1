"""Clients for a running tsctl (or TorchServe) server, usable as a library."""
