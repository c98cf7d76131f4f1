"""`ts.protocol`: only what handlers call directly (`otf_message_handler`)."""
