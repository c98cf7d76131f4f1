"""The daemon: one process, one asyncio loop (see docs/architecture.md)."""
