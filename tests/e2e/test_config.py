"""config.properties parsing and the settings model (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsctl.errors import InvalidInput
from tsctl.server.config import (
    build_config,
    is_loopback,
    parse_properties,
    property_line,
    read_properties,
    unknown_keys,
)


def test_properties_format(tmp_path: Path) -> None:
    path = tmp_path / "config.properties"
    path.write_text(
        "# a comment\n! another\ninference_address=http://127.0.0.1:9000\n"
        "job_queue_size : 12\n"
        'models={\\\n  "m": {"1.0": {"marName": "m.mar", "minWorkers": 2}}\\\n}\n'
        "default_workers_per_model 3\n"
    )
    props = read_properties(path)
    assert props["inference_address"] == "http://127.0.0.1:9000"
    assert props["job_queue_size"] == "12"
    assert props["default_workers_per_model"] == "3"
    config = build_config(props, {})
    assert config.job_queue_size == 12
    assert config.models == {"m": {"1.0": {"marName": "m.mar", "minWorkers": 2}}}


def test_environment_variables_only_when_enabled() -> None:
    environ = {"TS_JOB_QUEUE_SIZE": "7", "TS_ENABLE_MODEL_API": "true"}
    assert build_config({}, {}, environ).job_queue_size == 100
    enabled = build_config({"enable_envvars_config": "true"}, {}, environ)
    assert enabled.job_queue_size == 7 and enabled.enable_model_api is True


def test_cli_overrides_win() -> None:
    config = build_config({"job_queue_size": "5", "log_dir": "x"}, {"log_dir": Path("y")})
    assert config.log_dir == Path("y") and config.job_queue_size == 5


@pytest.mark.parametrize(
    ("props", "needle"),
    [
        ({"job_queue_size": "lots"}, "job_queue_size='lots'"),
        ({"inference_address": "nowhere"}, "inference_address"),
        ({"models": "{oops"}, "models: not valid JSON"),
        ({"max_request_size": "-1"}, "max_request_size"),
    ],
)
def test_bad_values_name_the_key(props: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInput, match="invalid") as caught:
        build_config(props, {})
    assert needle in caught.value.message


def test_unknown_keys_and_loopback() -> None:
    assert unknown_keys({"job_queue_size": "1", "vmargs": "-Xmx1g", "typo_key": "1"}) == [
        "typo_key"
    ]
    assert is_loopback("http://127.0.0.1:8081") and is_loopback("http://localhost:1")
    assert not is_loopback("http://0.0.0.0:8081")


# the shape of a snapshot TorchServe 0.12 wrote on `torchserve --stop` (Java's escapes): its
# model_snapshot is JSON on one line, newlines written as \n and colons as \:
_SNAPSHOT_JSON = [
    "{",
    '  "name"\\: "20261202055825505-shutdown.cfg",',
    '  "modelCount"\\: 1,',
    '  "models"\\: {"mlp"\\: {"1.0"\\: {"defaultVersion"\\: true, "marName"\\: "mlp.mar",',
    '    "minWorkers"\\: 2, "batchSize"\\: 8}}}',
    "}",
]
TORCHSERVE_SNAPSHOT = (
    "#Saving snapshot\n#Wed Dec 02 05:58:25 UTC 2026\n"
    "inference_address=http\\://127.0.0.1\\:18300\n"
    "load_models=mlp\\=mlp.mar\n"
    "model_snapshot=" + "\\n".join(_SNAPSHOT_JSON) + "\n"
    "key\\ with\\ spaces = caf\\u00e9\\t!\n"
)


def test_java_escapes_as_torchserve_writes_them() -> None:
    props = parse_properties(TORCHSERVE_SNAPSHOT)
    assert props["inference_address"] == "http://127.0.0.1:18300"
    assert props["load_models"] == "mlp=mlp.mar"
    assert props["key with spaces"] == "café\t!"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["models"]["mlp"]["1.0"]["batchSize"] == 8


@pytest.mark.parametrize("value", ["https://x\\.example\\.com/.*", "a\nb", "C:\\models\\", "plain"])
def test_property_lines_read_back_unchanged(value: str) -> None:
    assert parse_properties(property_line("k", value) + "\n") == {"k": value}
