"""The server's configuration: one frozen pydantic model, loaded once at the CLI boundary.

Sources, lowest priority first: defaults, TorchServe's `config.properties` (`--ts-config`),
then the `tsctl serve start` flags. Keys keep TorchServe's names. Nothing here reads the
environment or the disk at import time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tsctl.errors import InvalidInput
from tsctl.ipc.messages import check_envelope_name
from tsctl.server.workers.spares import cpu_count
from tsctl.validation import describe

# TorchServe's defaults
DEFAULT_MAX_REQUEST_SIZE = 6553500


class ServerConfig(BaseModel):
    """Every server setting, with TorchServe's key names and defaults where it has them."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    inference_address: str = "http://127.0.0.1:8080"
    management_address: str = "http://127.0.0.1:8081"
    metrics_address: str = "http://127.0.0.1:8082"
    #: the gRPC APIs (TorchServe's keys; tsctl's `enable_grpc` turns them off)
    enable_grpc: bool = True
    grpc_inference_address: str = "127.0.0.1"
    grpc_inference_port: int = Field(default=7070, ge=0, le=65535)
    grpc_management_address: str = "127.0.0.1"
    grpc_management_port: int = Field(default=7071, ge=0, le=65535)
    #: the Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`); KServe's
    #: own convention is 8081, TorchServe's management port: see docs/kubernetes.md
    grpc_oip_address: str = "127.0.0.1"
    grpc_oip_port: int = Field(default=7072, ge=0, le=65535)
    enable_metrics_api: bool = True
    model_store: Path | None = None
    #: where `POST /workflows?url=` finds `.war` files (TorchServe's default: the model store)
    workflow_store: Path | None = None
    #: a folder of Python plugins (`.py` files or packages listing theirs in `PLUGINS`), beside
    #: the installed ones (entry points `tsctl.plugins`): docs/plugins.md
    plugins_path: Path | None = None
    #: models to load at start: `all`, `NAME=PATH`, or `PATH` (relative to the model store)
    load_models: tuple[str, ...] = ()
    default_workers_per_model: int = Field(default_factory=cpu_count, ge=0)
    job_queue_size: int = Field(default=100, ge=1)
    max_request_size: int = Field(default=DEFAULT_MAX_REQUEST_SIZE, ge=1)
    max_response_size: int = Field(default=DEFAULT_MAX_REQUEST_SIZE, ge=1)
    default_response_timeout: float = Field(default=120, gt=0)
    default_startup_timeout: float = Field(default=120, gt=0)
    batch_size: int = Field(default=1, ge=1)
    max_batch_delay: float = Field(default=100, ge=0)
    #: GPUs the workers are spread over, round robin (worker i gets `gpu_id` i mod n); the
    #: CLI resolves it to the GPUs this machine shows (`CUDA_VISIBLE_DEVICES` respected), at
    #: most the configured number
    number_of_gpu: int = Field(default=0, ge=0)
    #: handlers see it in `context.system_properties`; TorchServe's vision handlers lift PIL's
    #: image size limit when it is false
    limit_max_image_pixels: bool = True
    #: torch intra-op threads per worker; 0 = share the machine's cores among all workers
    worker_threads: int = Field(default=0, ge=0)
    #: bound on a model archive's extracted size
    max_archive_expanded_size: int = Field(default=16 << 30, ge=1)
    #: how long `stop` waits for in-flight requests before stopping workers anyway (seconds)
    drain_timeout: float = Field(default=30, ge=0)
    #: seconds a connection may stay open with no request in progress (every HTTP port)
    keep_alive_timeout: float = Field(default=60, gt=0)
    #: seconds a client has to send a request's whole head, from its first byte
    request_header_timeout: float = Field(default=30, gt=0)
    #: seconds a client has to send a request's whole body, from the end of its head
    request_body_timeout: float = Field(default=60, gt=0)
    #: open connections per HTTP port; beyond it new connections are closed at once
    max_connections: int = Field(default=1000, ge=1)
    #: most workers one model may have (minWorkers, maxWorkers and scaling are capped)
    max_workers_per_model: int = Field(default_factory=lambda: 4 * cpu_count(), ge=1)
    #: where ts_log.log, access_log.log, model_log.log and the snapshots go (`--log-dir`,
    #: else `$LOG_LOCATION`)
    log_dir: Path = Path("logs")
    #: where ts_metrics.log and model_metrics.log go (`$METRICS_LOCATION`); none: `log_dir`
    metrics_dir: Path | None = None
    #: the server's and the workers' log lines also on the console of the process that
    #: started the server (`--no-console-log` or false: only in the files)
    console_log: bool = True
    #: write the metric logs in batches, shortly after (TorchServe's asynchronous appenders)
    async_logging: bool = False
    #: `log`: metric lines in ts_metrics.log/model_metrics.log (and the metrics API);
    #: `prometheus`: only the metrics API; `legacy`: the `ts_*` counters on the API, the rest
    #: in the logs
    metrics_mode: Literal["log", "prometheus", "legacy"] = "log"
    #: the metrics configuration YAML: which metrics exist and their dimensions
    metrics_config: Path | None = None
    #: keep handler metrics the metrics configuration does not declare
    model_metrics_auto_detect: bool = False
    disable_system_metrics: bool = False
    #: seconds between two samples of the system metrics (the first is at start-up)
    metric_time_interval: float = Field(default=60, gt=0)
    state_dir: Path = Path(".")
    #: register and unregister through the API (TorchServe's default: off)
    enable_model_api: bool = False
    #: regular expressions an http(s) model URL must match to be registered (none by default)
    allowed_urls: tuple[str, ...] = ()
    unregister_model_timeout: float = Field(default=120, ge=0)
    #: seconds a model download from an allowed URL may take
    download_timeout: float = Field(default=300, gt=0)
    #: CORS: the `Access-Control-Allow-*` values added to every answer when set
    cors_allowed_origin: str = ""
    cors_allowed_methods: str = ""
    cors_allowed_headers: str = ""
    #: `--disable-token-auth`: no `Authorization: Bearer` keys needed
    disable_token_authorization: bool = False
    #: minutes a management or inference key stays valid (rotate with `/token`)
    token_expiration_min: float = Field(default=60, ge=0)
    #: `--ncs`: neither restore nor write config snapshots
    no_config_snapshots: bool = False
    #: per-model settings at start-up, TorchServe's `models` JSON (as in a snapshot)
    models: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    #: the request envelope every model's handler gets: json, kserve, kservev2, body (or none)
    service_envelope: str = ""
    #: install an archive's requirements file for its model (TorchServe's default: off)
    install_py_dep_per_model: bool = False
    #: seconds one model's `pip install` of its requirements may take
    install_py_dep_timeout: float = Field(default=600, gt=0)
    #: where installed model dependencies are cached; none: `.tsctl-deps` in the model store
    model_deps_dir: Path | None = None
    #: TLS (tsctl.server.tls): an https:// address serves that API with TLS, with this PEM
    #: key (others may not read it) and certificate chain, or a PKCS12 keystore instead
    private_key_file: Path | None = None
    certificate_file: Path | None = None
    keystore: Path | None = None
    keystore_pass: str = ""
    keystore_type: str = "PKCS12"
    #: both gRPC APIs with TLS, on the same key and certificate
    enable_grpc_ssl: bool = False

    @field_validator("inference_address", "management_address", "metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("async_logging", mode="before")
    @classmethod
    def _java_boolean(cls, value: Any) -> Any:
        """TorchServe reads it as Java does: `true` (any case) is true, anything else false."""
        return value.strip().lower() == "true" if isinstance(value, str) else value

    @field_validator("metrics_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        return "".join(value.split()).lower() if isinstance(value, str) else value

    @field_validator("service_envelope")
    @classmethod
    def _envelope(cls, value: str) -> str:
        return check_envelope_name(value.strip())


def parse_address(address: str) -> tuple[str, int]:
    """`http://host:port` (TorchServe's form) → (host, port)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"address {address!r} must look like http://127.0.0.1:8080")
    return parts.hostname, parts.port


def is_loopback(address: str) -> bool:
    host, _ = parse_address(address)
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def read_properties(path: Path) -> dict[str, str]:
    """Read a Java `.properties` file, such as TorchServe's config and the snapshots it writes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # Java's own encoding for .properties; every byte decodes
    return parse_properties(text)


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        follower = text[i + 1]
        if follower == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
            continue
        out.append(_ESCAPES.get(follower, follower))
        i += 2
    return "".join(out)


def property_line(key: str, value: str) -> str:
    """`key=value` as a `.properties` line that Java (TorchServe) and `parse_properties` read
    back unchanged: backslashes and line breaks escaped."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f"{key}={escaped}"


def parse_properties(text: str) -> dict[str, str]:
    """Java's `.properties` syntax: `#`/`!` comments, `key=value`, `key: value` or
    `key value`, a line ending in an odd number of backslashes continues on the next, and
    escapes (`\\:`, `\\=`, `\\n`, `\\uXXXX`, ...) in keys and values. TorchServe writes
    its snapshots this way (`http\\://...`, JSON with `\\n`)."""
    result: dict[str, str] = {}
    logical = ""
    # Java ends lines at \n, \r and \r\n only (str.splitlines also breaks at \x0b, \x85, ...)
    for raw in re.split(r"\r\n|\r|\n", text):
        line = raw.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            logical += line[:-1]
            continue
        _add_property(result, logical + line)
        logical = ""
    if logical:  # the last line continued into the end of the file: Java keeps it
        _add_property(result, logical)
    return result


def _add_property(result: dict[str, str], logical: str) -> None:
    match = re.match(r"((?:\\.|[^=:\s\\])*)\s*[=:]?\s*(.*)$", logical, re.DOTALL)
    assert match is not None  # every string matches
    result[_unescape(match.group(1))] = _unescape(match.group(2)).strip()


#: config.properties keys tsctl reads now; others are accepted and ignored (see docs)
_PROPERTY_KEYS = {
    "limit_max_image_pixels",
    "number_of_gpu",
    "enable_grpc",
    "grpc_inference_address",
    "grpc_inference_port",
    "grpc_management_address",
    "grpc_management_port",
    "grpc_oip_address",
    "grpc_oip_port",
    "inference_address",
    "management_address",
    "metrics_address",
    "enable_metrics_api",
    "model_store",
    "workflow_store",
    "plugins_path",
    "load_models",
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "default_response_timeout",
    "default_startup_timeout",
    "batch_size",
    "max_batch_delay",
    "worker_threads",
    "max_archive_expanded_size",
    "drain_timeout",
    "keep_alive_timeout",
    "request_header_timeout",
    "request_body_timeout",
    "max_connections",
    "max_workers_per_model",
    "async_logging",
    "console_log",
    "metrics_mode",
    "metrics_config",
    "model_metrics_auto_detect",
    "disable_system_metrics",
    "metric_time_interval",
    "enable_model_api",
    "allowed_urls",
    "unregister_model_timeout",
    "download_timeout",
    "models",
    "disable_token_authorization",
    "token_expiration_min",
    "cors_allowed_origin",
    "cors_allowed_methods",
    "cors_allowed_headers",
    "service_envelope",
    "install_py_dep_per_model",
    "install_py_dep_timeout",
    "model_deps_dir",
    "private_key_file",
    "certificate_file",
    "keystore",
    "keystore_pass",
    "keystore_type",
    "enable_grpc_ssl",
}
#: TorchServe keys tsctl accepts but does not act on yet (no warning for these)
_ACCEPTED = {
    "enable_envvars_config",
    "number_of_netty_threads",
    "netty_client_threads",
    "vmargs",
    # KServe's sample configs set it; tsctl's metrics API always speaks Prometheus
    "metrics_format",
    "model_snapshot",
    "tsConfigFile",
    # bookkeeping TorchServe writes into its snapshots
    "python",
    "version",
}


def unknown_keys(properties: dict[str, str]) -> list[str]:
    """Keys of a config.properties that tsctl does not know (worth a warning)."""
    return sorted(k for k in properties if k not in _PROPERTY_KEYS and k not in _ACCEPTED)


def visible_gpus(environ: dict[str, str], driver: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """NVIDIA GPUs this process may use: those the driver lists, cut down to
    `CUDA_VISIBLE_DEVICES` when it is set (as CUDA itself reads it). No CUDA call, no torch."""
    try:
        present = len(list(driver.iterdir()))
    except OSError:
        present = 0
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return present
    ids = []
    for item in listed.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break  # CUDA stops at the first invalid entry
        ids.append(item)
    return min(len(ids), present)


#: the switches whose flag (`--disable-token-auth`, `--enable-model-api`) can only turn them on:
#: as in TorchServe, an environment variable read with `enable_envvars_config=true` wins over
#: the flag too (its tests state the order: environment, flag, file)
_ENV_OVER_FLAGS = {"disable_token_authorization", "enable_model_api"}


def build_config(
    properties: dict[str, str],
    overrides: dict[str, Any],
    environ: dict[str, str] | None = None,
) -> ServerConfig:
    """Combine config.properties values, `TS_<KEY>` environment variables (only with
    `enable_envvars_config=true`, as in TorchServe) and CLI overrides into a config: each
    source over the one before, but for `_ENV_OVER_FLAGS`, where the environment wins."""
    properties = dict(properties)
    from_env: set[str] = set()
    if environ and properties.get("enable_envvars_config", "").lower() == "true":
        for key in _PROPERTY_KEYS:
            value = environ.get(f"TS_{key.upper()}")
            if value is not None:
                properties[key] = value
                from_env.add(key)
    overrides = {k: v for k, v in overrides.items() if k not in from_env & _ENV_OVER_FLAGS}
    values: dict[str, Any] = {k: v for k, v in properties.items() if k in _PROPERTY_KEYS}
    if "load_models" in values:
        raw = values["load_models"]
        values["load_models"] = tuple(m.strip() for m in raw.split(",") if m.strip())
    if "allowed_urls" in values:
        values["allowed_urls"] = tuple(
            u.strip() for u in values["allowed_urls"].split(",") if u.strip()
        )
    if "models" in values:
        try:
            values["models"] = json.loads(values["models"])
        except ValueError as exc:
            raise InvalidInput(f"invalid setting models: not valid JSON ({exc})") from None
    elif "model_snapshot" in properties:  # --ts-config names a snapshot
        try:
            values["models"] = json.loads(properties["model_snapshot"])["models"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"invalid model_snapshot: {exc!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    found = visible_gpus(environ or {})
    configured = values.get("number_of_gpu")
    if configured is None:
        values["number_of_gpu"] = found
    elif str(configured).strip().isdigit():  # at most what there is, as in TorchServe
        values["number_of_gpu"] = min(found, int(configured))
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        raise InvalidInput(describe(exc)) from None
