"""What the CLI and the clients share about a server on this machine: its pid file, key
file, and launching and stopping it."""
