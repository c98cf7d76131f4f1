"""The frontend <-> worker protocol: typed messages and their frame codec, used by both sides."""
