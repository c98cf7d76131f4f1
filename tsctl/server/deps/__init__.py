"""Per-model Python dependencies: requirements files, the install cache, pip."""
