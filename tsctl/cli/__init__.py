"""The command line: the entry point, the typer app and one module per command group."""
