"""`GET /models/{name}/stats` on the management API: per version of a model, the predictions
answered (`ts_inference_requests_total`) and latency percentiles in milliseconds, estimated
from the `tsctl_request_duration_seconds` histogram as Prometheus' `histogram_quantile` does
(linear within the bucket the rank falls in).

Everything it reads is in the daemon's memory, so `handle` is a coroutine: it runs on the
event loop and never blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from tsctl.plugins import Endpoint, EndpointRequest, Reply, ServerView

REQUESTS = "ts_inference_requests_total"
DURATION = "tsctl_request_duration_seconds"
PERCENTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


class ModelStats(Endpoint):
    name = "model-stats"
    api = "management"
    path = "/models/{name}/stats"
    methods = ("GET",)

    def setup(self, server: ServerView) -> None:
        self.server = server

    async def handle(self, request: EndpointRequest) -> Reply:
        model = request.params["name"]
        versions = sorted(v for m, v in self.server.models() if m == model)
        if not versions:
            message = f"Model not found: {model}"
            doc = {"code": 404, "type": "ModelNotFoundException", "message": message}
            return Reply(doc, status=404)
        return Reply({"modelName": model, "versions": [self.stats(model, v) for v in versions]})

    def stats(self, model: str, version: str) -> dict[str, object]:
        def samples(metric: str) -> list[tuple[dict[str, str], float]]:
            found = self.server.metric_samples(metric)
            return [
                (labels, value)
                for labels, value in found
                if labels.get("model_name") == model and labels.get("model_version") == version
            ]

        counted = [value for _, value in samples(REQUESTS)]
        if not counted:  # the metrics configuration may leave the TorchServe counter out
            counted = [value for _, value in samples(f"{DURATION}_count")]
        buckets = sorted((_bound(labels["le"]), n) for labels, n in samples(f"{DURATION}_bucket"))
        latency = {key: _quantile(q, buckets) for key, q in PERCENTILES.items()}
        return {"modelVersion": version, "requests": int(sum(counted)), "latencyMs": latency}


def _bound(le: str) -> float:
    return float("inf") if le == "+Inf" else float(le)


def _quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The `q` quantile in ms from cumulative (upper bound in s, count) buckets; None with no
    observation. In the last (+Inf) bucket it is the highest finite bound, as Prometheus says."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulated in buckets:
        if cumulated >= rank:
            if bound == float("inf"):
                return round(lower * 1000, 3)
            share = (rank - below) / (cumulated - below) if cumulated > below else 1.0
            return round((lower + (bound - lower) * share) * 1000, 3)
        lower, below = bound, cumulated
    return round(lower * 1000, 3)


PLUGINS = [ModelStats]
