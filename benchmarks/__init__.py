"""tsctl's benchmarks: scripts run from the repository root (`python benchmarks/NAME.py`), and
`benchmarks.lib`, what they share.

A regular package rather than a namespace one, so that no other `benchmarks` on the path can
stand in for it when the tests import `benchmarks.lib`.
"""
