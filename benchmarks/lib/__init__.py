"""What the benchmarks share; the scripts in benchmarks/ are thin command lines on top of it.

- `script`: logging, checked commands, the temporary work folder, SIGTERM cleanup.
- `procs`: /proc: process trees, their CPU time and RSS, process groups, free ports.
- `quiet`: measuring on a shared machine (CPU used by others, waiting for quiet, retries).
- `load`: the load generators (wrk, h2load), one run each, parsed into a `Load`.
- `rest`: one HTTP request to a TorchServe-style REST API; its READY workers.
- `torchserve`: start and stop the real TorchServe 0.12 from its own venv, in one folder.
- `servers`: tsctl's daemon and TorchServe as the benchmarks run them (tracked, cleanly stopped).
- `archives`: the models served (the MLP, resnet_faces), archived with `tsctl archive`.
- `table`: printing result tables.
- `serve_*`: serve_bench's plan, sections (a, d: `serve_mlp`; b: `serve_resnet`; c:
  `serve_startup`) and report; `grpc_*`: grpc_bench's runs and report.

The scripts put the repository on `sys.path` and import `benchmarks.lib...`; the tests, run by
pytest from the repository root, import it under the same name.

Why tests/support/torchserve.py imports its launcher from here, and not the other way round:
this package is plain standard-library code that starts processes and reads /proc (tsctl is
imported only inside the gRPC calls), so it can serve anyone; the test harness adds on top
only what tests need (the venv from the environment, skipping without Java, recognising a
model that fails to load from TorchServe's logs). The other direction would make tools that
are run by hand depend on the test suite's package and on what it imports, and would pull
benchmark concerns (torch threads per worker, process tracking, timing the launcher) into the
test harness.
"""
