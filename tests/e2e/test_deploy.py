"""deploy/ checked offline: every manifest parsed and validated against the Kubernetes schemas
(kubernetes-validate) and KServe's CRD schemas (vendored in deploy/schemas), the Dockerfile
read statically (no docker here), and the container's entrypoint run as a process with
KServe's exact arguments and environment on a model store laid out like /mnt/models."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.daemon import make_archive
from tests.support.daemon_logs import WATCHED
from tests.support.paths import ROOT
from tsctl.local import pidfile
from tsctl.server.config import build_config, parse_address, parse_properties, unknown_keys
from tsctl.server.telemetry.prometheus import Metrics

DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas" / "kserve"
#: the Kubernetes releases the manifests must be valid for: an old supported one, the newest
KUBERNETES = ("1.30.0", kubernetes_validate.latest_version())
#: what KServe's kserve-torchserve ClusterServingRuntime passes (config/runtimes in kserve)
KSERVE_ARGS = [
    "torchserve",
    "--start",
    "--model-store=/mnt/models/model-store",
    "--ts-config=/mnt/models/config/config.properties",
]
KSERVE_KINDS = {"ClusterServingRuntime", "InferenceService"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.relative_to(DEPLOY)}:{doc['kind']}", doc))
    return found


MANIFESTS = manifests()


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for _, d in MANIFESTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it with strict field validation: an object
    with `properties` takes no other keys (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def kserve_schema(kind: str) -> Any:
    [path] = SCHEMAS.glob(f"{kind}-*.json")
    return strict(json.loads(path.read_text()))


def validate_kubernetes(doc: dict[str, Any]) -> None:
    for version in KUBERNETES:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_manifest_is_found() -> None:
    kinds = sorted(k for _, d in MANIFESTS for k in [d["kind"]])
    assert kinds == sorted(
        [
            "ClusterServingRuntime",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "InferenceService",
            "InferenceService",
            "PersistentVolumeClaim",
            "Service",
        ]
    )


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid_against_its_schema(where: str, doc: dict[str, Any]) -> None:
    assert doc["metadata"]["name"]
    if doc["kind"] in KSERVE_KINDS:
        assert doc["apiVersion"].startswith("serving.kserve.io/")
        jsonschema.validate(doc, kserve_schema(doc["kind"]))
    else:
        validate_kubernetes(doc)


def test_the_strict_schemas_catch_a_misspelt_field() -> None:
    """The checks above can fail: a typo in each kind of manifest is refused."""
    runtime = copy.deepcopy(one("ClusterServingRuntime"))
    runtime["spec"]["protocolVersion"] = ["v1"]  # protocolVersions
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(runtime, kserve_schema("ClusterServingRuntime"))
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(deployment)


def test_runtime_container_is_a_valid_kubernetes_container() -> None:
    """KServe's CRD leaves probes and security contexts loosely typed: the runtime's
    container is checked as a Pod's container too."""
    runtime = one("ClusterServingRuntime")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-tsctl"},
        "spec": {"containers": runtime["spec"]["containers"]},
    }
    validate_kubernetes(pod)


def test_runtime_runs_tsctl_as_kserve_runs_torchserve() -> None:
    runtime = one("ClusterServingRuntime", "kserve-tsctl")
    # KServe applies its TorchServe defaults (PROTOCOL_VERSION, serviceEnvelope) by this
    assert runtime["metadata"]["annotations"]["serving.kserve.io/server-type"] == "torchserve"
    spec = runtime["spec"]
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["pytorch"]
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": "8082",
        "prometheus.kserve.io/path": "/metrics",
    }
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["args"] == KSERVE_ARGS
    assert container["env"] == [
        {"name": "TS_SERVICE_ENVELOPE", "value": "{{.Labels.serviceEnvelope}}"}
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["runAsNonRoot"] is True


def test_inference_services_use_the_runtime() -> None:
    runtime = one("ClusterServingRuntime")
    services = [d for _, d in MANIFESTS if d["kind"] == "InferenceService"]
    assert services
    for isvc in services:
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] == "pytorch"
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["storageUri"]
        if model["protocolVersion"] == "grpc-v2":  # KServe routes gRPC to the h2c port
            assert model["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]


def config_properties() -> dict[str, str]:
    return parse_properties(one("ConfigMap", "tsctl-config")["data"]["config.properties"])


def test_plain_config_is_read_by_tsctl_without_warnings() -> None:
    properties = config_properties()
    assert unknown_keys(properties) == []
    config = build_config(properties, {})
    assert config.disable_token_authorization
    assert parse_address(config.management_address)[0] == "127.0.0.1"


def test_deployment_is_consistent_with_config_service_and_image() -> None:
    config = build_config(config_properties(), {})
    deployment = one("Deployment", "tsctl")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    # SIGTERM drains: the grace period covers the preStop pause and the whole drain
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + config.drain_timeout
    # non-root, read-only root: what tsctl writes goes to /tmp (the image's LOG_LOCATION,
    # METRICS_LOCATION, TSCTL_STATE_DIR), an emptyDir
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for variable in ("LOG_LOCATION", "METRICS_LOCATION", "TSCTL_STATE_DIR"):
        assert dockerfile_env()[variable].startswith("/tmp/"), variable
    assert "persistentVolumeClaim" in volumes[mounts["/mnt/models"]]
    assert (
        one("PersistentVolumeClaim")["metadata"]["name"]
        == (volumes[mounts["/mnt/models"]]["persistentVolumeClaim"]["claimName"])
    )
    assert volumes[mounts["/etc/tsctl"]]["configMap"]["name"] == "tsctl-config"
    assert "--ts-config=/etc/tsctl/config.properties" in container["args"]
    # ports: the container's are the config's, the probes and the Service use them
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == parse_address(config.inference_address)[1]
    assert ports["metrics"] == parse_address(config.metrics_address)[1]
    assert ports["grpc"] == config.grpc_inference_port
    assert ports["grpc-oip"] == config.grpc_oip_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    service = one("Service", "tsctl")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_autoscaler_scales_on_a_metric_tsctl_exposes() -> None:
    hpa = one("HorizontalPodAutoscaler", "tsctl")
    deployment = one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in Metrics().families  # the metrics API's family
    assert Metrics().families[name].labels == ("model_name", "model_version")
    adapter = yaml.safe_load(one("ConfigMap", "tsctl-prometheus-adapter")["data"]["config.yaml"])
    [rule] = adapter["rules"]
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
    assert rule["seriesQuery"].startswith(f"{name}{{")
    assert rule["name"]["as"] == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.Series>>" in rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]


# --- the Dockerfile, read statically ------------------------------------------------------

DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|gfortran|rustc|cargo)\b")


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (instruction, arguments); continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            found.append([])
        found[-1].append((instruction.upper(), rest.strip()))
    return found


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, rest in stages()[-1]:
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_dockerfile_is_multi_stage_and_final_stage_has_no_compilers() -> None:
    _, *built = stages()
    assert len(built) == 2
    assert built[0][0][1].endswith(" AS builder")
    final = built[-1]
    assert ("COPY", "--from=builder /wheels /tmp/wheels") in final
    for instruction, rest in final:
        if instruction == "RUN":
            assert "apt-get install" not in rest and "apk add" not in rest, rest
            assert not COMPILERS.search(rest.replace("pip install", "")), rest
            if "pip install" in rest:  # wheels only: nothing can be compiled
                assert rest.count("--only-binary=:all:") == rest.count("pip install"), rest


def test_dockerfile_runs_tsctl_as_uid_1000() -> None:
    final = stages()[-1]
    users = [rest for instruction, rest in final if instruction == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    [entrypoint] = [rest for instruction, rest in final if instruction == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tsctl"]
    [command] = [rest for instruction, rest in final if instruction == "CMD"]
    assert json.loads(command) == KSERVE_ARGS
    exposed = {int(p) for i, rest in final if i == "EXPOSE" for p in rest.split()}
    assert exposed == {8080, 8081, 8082, 7070, 7071, 7072}


def test_dockerfile_pins_torch_for_cpu_as_the_makefile_does() -> None:
    args = dict(rest.split("=", 1) for instruction, rest in stages()[-1] if instruction == "ARG")
    makefile = (ROOT / "Makefile").read_text()
    [pinned] = re.findall(r"^TORCH \?= (\S+)$", makefile, re.MULTILINE)
    assert args["TORCH"] == pinned == "torch==2.13.0"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_copies_only_what_exists_and_the_ignore_file_keeps_it() -> None:
    builder = stages()[1]
    copied = [p for i, rest in builder if i == "COPY" for p in rest.split()[:-1]]
    assert copied == ["pyproject.toml", "README.md", "tsctl"]
    for path in copied:
        assert (ROOT / path).exists(), path
    ignore = (DEPLOY / "container" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!tsctl/"} <= set(rules)


# --- the entrypoint, as KServe runs it ----------------------------------------------------


def wait_until(predicate: Any, timeout: float = 60) -> None:
    """Poll until `predicate()` is true (a readiness wait, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Entrypoint:
    """`tsctl torchserve --start ...` in the foreground, its stdout read line by line."""

    def __init__(self, root: Path, env: dict[str, str], *extra: str) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.log_dir = root / "logs"
        state = root / "state"
        WATCHED.watch(self.log_dir, pidfile.pid_path(state))
        args = [*KSERVE_ARGS]
        args[2] = f"--model-store={root}/mnt/models/model-store"
        args[3] = f"--ts-config={root}/mnt/models/config/config.properties"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tsctl", *args, *extra],
            cwd=root,
            env={
                **os.environ,
                **env,
                "TSCTL_STATE_DIR": str(state),
                "LOG_LOCATION": str(self.log_dir),
                "METRICS_LOCATION": str(self.log_dir),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.errors: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Model server started" in line:
                self.ready.set()
        self.ready.set()  # it exited: whoever waits stops waiting

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(self.proc.stderr)

    def wait_ready(self) -> None:
        assert self.ready.wait(120), "no ready line"
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        """stdout (the log), then stderr."""
        return "".join(self.lines) + "".join(self.errors)

    def wait(self) -> int:
        code = self.proc.wait(120)
        for reader in self.readers:
            reader.join(30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)  # only the main process, as the kubelet does
        return self.wait()


def kserve_model_store(root: Path, ports: dict[str, int]) -> None:
    """/mnt/models as KServe's storage initializer leaves it: model-store/mnist.mar and
    config/config.properties as KServe's TorchServe samples write it, ports made free."""
    models = root / "mnt" / "models"
    make_archive(models / "model-store", "mnist", "swiss")
    (models / "config").mkdir(parents=True)
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            "mnist": {
                "1.0": {
                    "defaultVersion": True,
                    "marName": "mnist.mar",
                    "minWorkers": 1,
                    "maxWorkers": 5,
                    "batchSize": 1,
                    "maxBatchDelay": 5000,
                    "responseTimeout": 120,
                }
            }
        },
    }
    (models / "config" / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports['ts']}\n"
        f"management_address=http://127.0.0.1:{ports['ts']}\n"
        f"metrics_address=http://127.0.0.1:{ports['metrics']}\n"
        f"grpc_inference_port={ports['grpc']}\n"
        f"grpc_management_port={ports['grpc_management']}\n"
        "enable_metrics_api=true\n"
        "number_of_netty_threads=4\n"
        "job_queue_size=10\n"
        "enable_envvars_config=true\n"
        "install_py_dep_per_model=false\n"
        "model_store=/mnt/models/model-store\n"
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}\n"
    )


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        reply = conn.getresponse()
        raw = reply.read()
        try:
            return reply.status, json.loads(raw)
        except ValueError:
            return reply.status, raw.decode()
    finally:
        conn.close()


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int]]]:
    names = ("ts", "metrics", "grpc", "grpc_management", "http", "oip")
    ports = {name: free_port() for name in names}
    kserve_model_store(tmp_path, ports)
    yield tmp_path, ports


def kserve_ports(ports: dict[str, int]) -> tuple[str, ...]:
    return ("--http-port", str(ports["http"]), "--grpc-port", str(ports["oip"]))


@pytest.mark.slow
def test_entrypoint_serves_kserve_v1_in_the_foreground_and_drains_on_sigterm(
    layout: tuple[Path, dict[str, int]],
) -> None:
    root, ports = layout
    env = {"TS_SERVICE_ENVELOPE": "kserve", "PROTOCOL_VERSION": "v1"}
    served = Entrypoint(root, env, *kserve_ports(ports))
    try:
        served.wait_ready()
        # model_snapshot's model, on KServe's HTTP port, in KServe's v1 envelope
        status, answer = call(
            ports["http"], "POST", "/predictions/mnist", {"instances": [{"body": {"n": 1}}]}
        )
        assert status == 200, answer
        [prediction] = answer["predictions"]
        assert prediction["values"] == {"body": {"n": 1}}
        assert call(ports["http"], "GET", "/ping")[0] == 200
        # KServe's own v1 path, and the probes the runtime declares, on the same port
        status, answer = call(
            ports["http"], "POST", "/v1/models/mnist:predict", {"instances": [{"body": {"n": 2}}]}
        )
        assert status == 200, answer
        assert [p["values"] for p in answer["predictions"]] == [{"body": {"n": 2}}]
        assert call(ports["http"], "GET", "/v2/health/live")[0] == 200
        assert call(ports["http"], "GET", "/v2/health/ready")[0] == 200
        # the OIP gRPC service on KServe's gRPC port
        assert oip_ready(ports["oip"], "mnist")
        # the management API where config.properties put it (it shared the inference port)
        status, listed = call(ports["ts"], "GET", "/models")
        assert status == 200
        assert [m["modelName"] for m in listed["models"]] == ["mnist"]
        status, metrics = call(ports["metrics"], "GET", "/metrics")
        assert 'tsctl_queue_depth{model_name="mnist",model_version="1.0",}' in metrics
        # a request in progress when SIGTERM comes is answered before the exit
        marker = root / "busy"
        held: list[tuple[int, Any]] = []
        command = {"action": "sleep", "seconds": 2, "marker": str(marker)}
        sender = threading.Thread(
            target=lambda: held.append(
                call(
                    ports["http"], "POST", "/predictions/mnist", {"instances": [{"body": command}]}
                )
            )
        )
        sender.start()
        wait_until(lambda: marker.exists() or not sender.is_alive())
        assert marker.exists(), held
        code = served.stop()
        sender.join(60)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.wait()
    log = served.output()
    assert code == 0, log
    assert held and held[0][0] == 200, held
    assert "Model server started" in log
    assert "stopping: draining in-flight requests" in log
    assert re.search(r" - stopped$", log, re.MULTILINE), log[-2000:]


@pytest.mark.slow
def test_entrypoint_serves_kserve_v2_envelope(layout: tuple[Path, dict[str, int]]) -> None:
    root, ports = layout
    env = {"TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "v2"}
    served = Entrypoint(root, env, *kserve_ports(ports))
    try:
        served.wait_ready()
        tensor = {"name": "x", "shape": [2], "datatype": "INT64", "data": [3, 4]}
        status, answer = call(
            ports["http"], "POST", "/predictions/mnist", {"id": "r1", "inputs": [tensor]}
        )
        assert status == 200, answer
        assert answer["id"] == "r1"
        assert answer["model_name"] == "mnist"
        assert [o["name"] for o in answer["outputs"]] == ["x"]
    finally:
        code = served.stop()
    assert code == 0, served.output()


@pytest.mark.slow
def test_entrypoint_serves_grpc_v2_on_kserves_grpc_port(
    layout: tuple[Path, dict[str, int]],
) -> None:
    root, ports = layout
    env = {"TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "grpc-v2"}
    served = Entrypoint(root, env, *kserve_ports(ports))
    try:
        served.wait_ready()
        assert oip_ready(ports["oip"], "mnist")
    finally:
        code = served.stop()
    assert code == 0, served.output()


def oip_ready(port: int, model: str) -> bool:
    """ServerLive, ServerReady and ModelReady over the OIP gRPC service at `port`."""
    import grpc

    from tsctl.proto_gen import grpc_predict_v2_pb2 as pb
    from tsctl.proto_gen import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        live = stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        model_ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=30).ready
    return bool(live and ready and model_ready)


def test_entrypoint_refuses_an_unknown_protocol(layout: tuple[Path, dict[str, int]]) -> None:
    root, ports = layout
    served = Entrypoint(root, {"PROTOCOL_VERSION": "grpc-v1"}, *kserve_ports(ports))
    code = served.wait()
    out = served.output()
    assert code == 2, out
    assert "tsctl: error: PROTOCOL_VERSION='grpc-v1'" in out
    assert "Traceback" not in out


def test_grpc_v2_refuses_a_management_api_on_kserves_grpc_port(
    layout: tuple[Path, dict[str, int]],
) -> None:
    root, ports = layout
    env = {"PROTOCOL_VERSION": "grpc-v2", "TS_SERVICE_ENVELOPE": "kservev2"}
    # KServe's gRPC port is where config.properties put the management API
    extra = ("--http-port", str(ports["http"]), "--grpc-port", str(ports["ts"]))
    served = Entrypoint(root, env, *extra)
    code = served.wait()
    out = served.output()
    assert code == 2, out
    assert "needs KServe's gRPC port" in out
    assert "move management_address" in out


def test_without_kserve_one_port_for_two_apis_is_refused_with_its_reason(
    layout: tuple[Path, dict[str, int]],
) -> None:
    root, _ = layout
    served = Entrypoint(root, {"PROTOCOL_VERSION": "", "TS_SERVICE_ENVELOPE": ""})
    code = served.wait()
    out = served.output()
    assert code == 2, out
    assert "share a port" in out and "PROTOCOL_VERSION moves the inference API" in out
