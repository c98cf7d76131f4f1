"""`ts.handler_utils`: helpers for handlers (timing, streaming, micro-batching)."""
