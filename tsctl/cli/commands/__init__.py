"""One module per CLI command group. Commands parse, call the library, and render."""
