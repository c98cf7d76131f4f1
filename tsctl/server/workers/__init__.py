"""Worker processes: starting them (spares), supervising them (the pool)."""
