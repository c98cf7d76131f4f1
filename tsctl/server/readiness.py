"""Liveness and readiness, as every API answers them (OIP REST and gRPC, KServe v1).
Event-loop only; reads the daemon's state and never blocks or awaits.

- **Live**: the daemon can serve: it is not draining or stopping. A model that fails, or
  workers that are restarting, do not make it not live (restarting the daemon would not help).
- **Ready**: live, the start-up models are all registered (`ServerState.loading_startup_models`
  is over) and every start-up model version (`--models`, the `models` setting, a snapshot:
  `ModelVersion.loaded_at_startup`) has a worker that serves batches. A start-up version
  registered with no workers on purpose (`minWorkers` 0) is not waited for. A start-up model
  that failed to load from a snapshot is left out (it is logged at start-up), and one an
  operator unregistered since is no longer counted.
- **Model ready**: the model's default version (or the version named) has a serving worker.

None of these needs a token: probes carry none.
"""

from __future__ import annotations

from tsctl.errors import TsctlError
from tsctl.server.registry import ModelVersion
from tsctl.server.state import ServerState


def server_live(state: ServerState) -> bool:
    """False only while the daemon drains or stops."""
    return not state.draining


def serving(mv: ModelVersion) -> bool:
    """Whether one of `mv`'s workers serves batches now."""
    return any(worker.state.serving for worker in mv.pool.workers)


def server_ready(state: ServerState) -> bool:
    """Live, start-up over, and every start-up model version with workers planned serves."""
    if not server_live(state) or state.loading_startup_models:
        return False
    for versions in state.registry.models.values():
        for mv in versions.values():
            if mv.loaded_at_startup and mv.pool.target > 0 and not serving(mv):
                return False
    return True


def model_ready(state: ServerState, name: str, version: str | None = None) -> bool:
    """Whether `name` (its default version, or `version`) is registered and has a serving
    worker; False (never an error) for a model or version that does not exist."""
    if not server_live(state):
        return False
    try:
        mv = state.registry.get(name, version or None)
    except TsctlError:
        return False
    return serving(mv)
