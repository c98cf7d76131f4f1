"""The readers of what an operator (or TorchServe) left on disk: `config.properties` in Java's
syntax, the settings built from it (`build_config`: defaults < config.properties <
`TS_*` variables when enabled < CLI flags), and config snapshots (`tsctl.server.snapshot`).
tests/e2e/test_config.py covers the common lines; these are the corners."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tsctl.errors import InvalidInput
from tsctl.server import snapshot
from tsctl.server.config import (
    ServerConfig,
    build_config,
    parse_properties,
    property_line,
    read_properties,
    unknown_keys,
    visible_gpus,
)
from tsctl.server.snapshot import SnapshotModel

# --- Java's .properties syntax


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1\nb = 2\nc:3\nd : 4\ne 5\nf\t\t6\n", {k: str(n) for n, k in enumerate("abcdef", 1)}),
        ("  indented = yes\n", {"indented": "yes"}),
        ("a=b=c\nx:y:z\np q=r\n", {"a": "b=c", "x": "y:z", "p": "q=r"}),  # the first one counts
        ("flag\nempty=\nspaces =   \n", {"flag": "", "empty": "", "spaces": ""}),
        ("a=1\na=2\n", {"a": "2"}),  # the last one wins, as in Java
        ("a=1\r\nb=2\r\n", {"a": "1", "b": "2"}),
        ("", {}),
    ],
    ids=["separators", "indent", "first-separator", "no-value", "repeated", "crlf", "empty"],
)
def test_keys_and_values(text: str, expected: dict[str, str]) -> None:
    assert parse_properties(text) == expected


def test_comments_and_blank_lines() -> None:
    text = "# comment=1\n! bang=2\n   # indented comment\n\n   \na=1 # not a comment\n"
    assert parse_properties(text) == {"a": "1 # not a comment"}


def test_continuation_lines() -> None:
    text = "list = a,\\\n       b,\\\n\t c\nafter=1\n"
    assert parse_properties(text) == {"list": "a,b,c", "after": "1"}


def test_a_continued_line_may_look_like_a_comment_or_be_blank() -> None:
    text = "a = x\\\n# still a\\\n\\\nb\nc=1\n"
    assert parse_properties(text) == {"a": "x# still ab", "c": "1"}


def test_an_even_number_of_backslashes_does_not_continue() -> None:
    assert parse_properties("path=C:\\\\dir\\\\\nnext=1\n") == {"path": "C:\\dir\\", "next": "1"}
    assert parse_properties("a=x\\\\\\\nb\n") == {"a": "x\\b"}  # three: an escaped one, then more


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("key\\ with\\ spaces = v", "key with spaces", "v"),
        ("a\\=b = c", "a=b", "c"),
        ("a\\:b : c", "a:b", "c"),
        ("url = http\\://127.0.0.1\\:8080", "url", "http://127.0.0.1:8080"),
        ("k = tab\\there", "k", "tab\there"),
        ("k = a\\nb\\rc\\fd", "k", "a\nb\rc\fd"),
        ("k = caf\\u00e9 \\u00E9", "k", "café é"),
        ("k = \\u2603", "k", "\u2603"),
        ("k = \\q\\z", "k", "qz"),  # an unknown escape is the character itself
        ("k = back\\\\slash", "k", "back\\slash"),
        ("k = not\\u12", "k", "notu12"),  # too short for \\uXXXX
        ("\\#notcomment = 1", "#notcomment", "1"),
    ],
)
def test_escapes(line: str, key: str, value: str) -> None:
    assert parse_properties(line + "\n") == {key: value}


def test_a_json_value_as_torchserve_writes_it() -> None:
    models = {"m": {"1.0": {"marName": "m.mar", "minWorkers": 2, "note": "a:b=c\\d"}}}
    line = property_line("models", json.dumps(models, indent=2))
    assert "\n" not in line
    assert json.loads(parse_properties(line)["models"]) == models


@pytest.mark.parametrize("value", ["", "a\r\nb", "\\", "\\u0041", "#x", "x=y:z", "café \u2603"])
def test_property_lines_read_back_unchanged(value: str) -> None:
    assert parse_properties(property_line("k", value)) == {"k": value}


def test_read_properties_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    missing = tmp_path / "nope.properties"
    with pytest.raises(InvalidInput, match=f"cannot read config file {missing}: No such file"):
        read_properties(missing)
    with pytest.raises(InvalidInput, match="cannot read config file"):
        read_properties(tmp_path)  # a folder


def test_a_continuation_at_the_end_of_the_file() -> None:
    assert parse_properties("a=1\nlast=value\\") == {"a": "1", "last": "value"}


def test_a_latin_1_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.properties"
    path.write_bytes("cors_allowed_origin=http://café.example\n".encode("latin-1"))
    # Java reads .properties as ISO-8859-1: so does tsctl when the file is not UTF-8
    assert read_properties(path) == {"cors_allowed_origin": "http://café.example"}


# --- unknown keys


def test_unknown_keys_are_sorted_and_torchserve_keys_are_known() -> None:
    properties = {
        "zeta": "1",
        "alpha": "1",
        "job_queue_size": "1",
        "model_snapshot": "{}",
        "tsConfigFile": "x",
        "version": "0.12.0",
        "number_of_netty_threads": "4",
        "JOB_QUEUE_SIZE": "1",  # keys are case-sensitive, as in TorchServe
    }
    assert unknown_keys(properties) == ["JOB_QUEUE_SIZE", "alpha", "zeta"]


# --- build_config: defaults < config.properties < TS_* (when enabled) < CLI flags

NO_GPUS = {"CUDA_VISIBLE_DEVICES": ""}  # whatever this machine has


def test_defaults_are_torchserve_s() -> None:
    config = build_config({}, {}, NO_GPUS)
    assert config.inference_address == "http://127.0.0.1:8080"
    assert (config.job_queue_size, config.max_request_size, config.batch_size) == (100, 6553500, 1)
    assert config.max_batch_delay == 100 and config.enable_model_api is False
    assert config.number_of_gpu == 0 and config.models == {} and config.load_models == ()


def test_each_source_overrides_the_one_below() -> None:
    properties = {
        "enable_envvars_config": "true",
        "job_queue_size": "10",
        "batch_size": "2",
        "max_batch_delay": "7",
    }
    environ = {**NO_GPUS, "TS_BATCH_SIZE": "3", "TS_MAX_BATCH_DELAY": "8"}
    config = build_config(properties, {"max_batch_delay": 9.0}, environ)
    assert config.job_queue_size == 10  # config.properties over the default
    assert config.batch_size == 3  # the environment over config.properties
    assert config.max_batch_delay == 9.0  # the CLI over everything


@pytest.mark.parametrize("flag", ["false", "", "yes", "1"])
def test_environment_variables_need_enable_envvars_config_true(flag: str) -> None:
    properties = {"enable_envvars_config": flag} if flag else {}
    config = build_config(properties, {}, {**NO_GPUS, "TS_JOB_QUEUE_SIZE": "7"})
    assert config.job_queue_size == 100


def test_enable_envvars_config_is_case_insensitive_and_only_reads_known_keys() -> None:
    environ = {**NO_GPUS, "TS_JOB_QUEUE_SIZE": "7", "TS_LOG_DIR": "/x", "TS_NONSENSE": "1"}
    config = build_config({"enable_envvars_config": "TRUE"}, {}, environ)
    assert config.job_queue_size == 7 and config.log_dir == Path("logs")


def test_cli_overrides_that_are_none_are_not_given() -> None:
    config = build_config({"job_queue_size": "5"}, {"job_queue_size": None}, NO_GPUS)
    assert config.job_queue_size == 5


def test_unknown_and_accepted_keys_are_ignored() -> None:
    config = build_config({"vmargs": "-Xmx1g", "no_such_key": "1"}, {}, NO_GPUS)
    assert config == build_config({}, {}, NO_GPUS)


def test_lists_are_comma_separated() -> None:
    properties = {"load_models": " a.mar, ,b=b.mar ,", "allowed_urls": "https://x/.*, file://.*"}
    config = build_config(properties, {}, NO_GPUS)
    assert config.load_models == ("a.mar", "b=b.mar")
    assert config.allowed_urls == ("https://x/.*", "file://.*")


def test_models_and_a_model_snapshot() -> None:
    models = {"m": {"1.0": {"marName": "m.mar"}}}
    older = {"old": {"2.0": {"marName": "old.mar"}}}
    snapshot_value = json.dumps({"name": "x.cfg", "models": older})
    assert build_config({"models": json.dumps(models)}, {}, NO_GPUS).models == models
    assert build_config({"model_snapshot": snapshot_value}, {}, NO_GPUS).models == older
    both = {"models": json.dumps(models), "model_snapshot": snapshot_value}
    assert build_config(both, {}, NO_GPUS).models == models  # `models` wins


@pytest.mark.parametrize(
    ("properties", "needle"),
    [
        ({"models": "[not json"}, "invalid setting models: not valid JSON"),
        ({"model_snapshot": "{oops"}, "invalid model_snapshot"),
        ({"model_snapshot": '{"name": "no models"}'}, "invalid model_snapshot: KeyError('models')"),
        ({"model_snapshot": "[1]"}, "invalid model_snapshot: TypeError"),
        ({"batch_size": "0"}, "invalid setting batch_size='0'"),
        ({"enable_model_api": "maybe"}, "invalid setting enable_model_api='maybe'"),
        ({"inference_address": "ftp://0.0.0.0:8443"}, "must look like http://127.0.0.1:8080"),
        ({"service_envelope": "soap"}, "unknown service_envelope 'soap'"),
        ({"number_of_gpu": "two"}, "invalid setting number_of_gpu='two'"),
    ],
)
def test_bad_values_are_invalid_input_naming_them(properties: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        build_config(properties, {}, NO_GPUS)
    assert needle in caught.value.message


def test_number_of_gpu_is_at_most_what_the_machine_shows() -> None:
    assert build_config({"number_of_gpu": "4"}, {}, NO_GPUS).number_of_gpu == 0
    assert build_config({"number_of_gpu": " 0 "}, {}, NO_GPUS).number_of_gpu == 0


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, 4),
        ("", 0),
        ("0,1", 2),
        ("2", 1),
        ("0, 1 ,2", 3),
        ("0,-1,2", 1),  # CUDA stops at the first invalid entry
        ("-1", 0),
        ("0,,1", 1),
        ("0,1,2,3,4,5,6", 4),  # at most what the driver lists
        ("GPU-8c5e1e21,GPU-0a9f", 2),
    ],
)
def test_visible_gpus(tmp_path: Path, visible: str | None, expected: int) -> None:
    for n in range(4):
        (tmp_path / f"0000:0{n}:00.0").mkdir()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert visible_gpus(environ, tmp_path) == expected


def test_no_driver_means_no_gpus(tmp_path: Path) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, tmp_path / "absent") == 0


# --- snapshots

# TorchServe 0.12's shutdown snapshot, as Java writes it: colons escaped, the JSON's newlines
# as \n, the server's bookkeeping keys around it
TORCHSERVE_SNAPSHOT = (
    "#Saving snapshot\n#Wed Dec 02 05:58:25 UTC 2026\n"
    "inference_address=http\\://127.0.0.1\\:8080\n"
    "load_models=mlp\\=mlp.mar\n"
    'model_snapshot={\\n  "name"\\: "20261202055825505-shutdown.cfg",\\n  "modelCount"\\: 2,\\n'
    '  "models"\\: {\\n    "mlp"\\: {\\n'
    '      "1.0"\\: {"defaultVersion"\\: true, "marName"\\: "mlp.mar", "minWorkers"\\: 2,'
    ' "maxWorkers"\\: 3, "batchSize"\\: 4, "maxBatchDelay"\\: 50, "responseTimeout"\\: 90,'
    ' "startupTimeout"\\: 60, "runtimeType"\\: "python"},\\n'
    '      "2.0"\\: {"defaultVersion"\\: false, "marName"\\: "mlp-v2.mar", "minWorkers"\\: 1}'
    "\\n    }\\n  }\\n}\n"
    "tsConfigFile=config.properties\nversion=0.12.0\nnumber_of_netty_threads=32\n"
)


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    return build_config({}, {"log_dir": tmp_path / "logs"}, NO_GPUS)


def put(config: ServerConfig, name: str, text: str) -> Path:
    folder = snapshot.directory(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_torchserve_s_escaped_snapshot(config: ServerConfig) -> None:
    path = put(config, "20261202055825505-shutdown.cfg", TORCHSERVE_SNAPSHOT)
    assert unknown_keys(read_properties(path)) == []
    v1, v2 = sorted(snapshot.parse(path), key=lambda m: m.version)
    assert v1 == SnapshotModel(
        "mlp",
        "1.0",
        "mlp.mar",
        True,
        {
            "minWorkers": 2,
            "maxWorkers": 3,
            "batchSize": 4,
            "maxBatchDelay": 50,
            "responseTimeout": 90,
            "startupTimeout": 60,
        },  # runtimeType is bookkeeping (tsctl runs Python), not a setting
    )
    assert v2 == SnapshotModel("mlp", "2.0", "mlp-v2.mar", False, {"minWorkers": 1})
    options = snapshot.load_options(v1)
    assert (options.name, options.min_workers, options.max_workers) == ("mlp", 2, 3)
    assert (options.batch_size, options.max_batch_delay) == (4, 50)
    assert (options.response_timeout, options.startup_timeout) == (90, 60)
    assert options.startup and options.trusted  # the operator's own models, as at start-up
    unset = snapshot.load_options(v2)
    assert unset.batch_size is None and unset.max_workers is None  # the defaults apply


def test_a_snapshot_is_a_valid_ts_config(config: ServerConfig) -> None:
    path = put(config, "20261202055825505-shutdown.cfg", TORCHSERVE_SNAPSHOT)
    built = build_config(read_properties(path), {}, NO_GPUS)
    assert set(built.models) == {"mlp"} and built.load_models == ("mlp=mlp.mar",)


def test_a_model_without_a_mar_name_is_name_dot_mar() -> None:
    [entry] = snapshot.from_models_setting({"m": {"1.0": {"minWorkers": 1}}})
    assert entry == SnapshotModel("m", "1.0", "m.mar", False, {"minWorkers": 1})


def test_written_snapshots_read_back(config: ServerConfig) -> None:
    models = [
        SnapshotModel("a", "1.0", "a.mar", True, {"minWorkers": 2, "batchSize": 8}),
        SnapshotModel("a", "2.0", "https://host/a2.mar", False, {"minWorkers": 0}),
        SnapshotModel("b:c", "1", "dir with space/b.mar", True, {}),
    ]
    path = snapshot.write(config, models, "snapshot")
    assert path is not None and path.name.endswith("-snapshot.cfg") and len(path.name) == 30
    assert snapshot.parse(path) == models
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    properties = read_properties(path)
    assert properties["enable_model_api"] == "false"  # Java's booleans
    assert properties["inference_address"] == config.inference_address
    doc = json.loads(properties["model_snapshot"])
    assert doc["name"] == path.name and doc["modelCount"] == 3
    assert doc["models"]["a"]["1.0"]["runtimeType"] == "python"  # as TorchServe writes it


def test_a_snapshot_that_cannot_be_written_is_none(config: ServerConfig) -> None:
    snapshot.directory(config).parent.mkdir(parents=True)
    snapshot.directory(config).write_text("a file where the folder should be")
    assert snapshot.write(config, [], "startup") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("inference_address=http\\://x\\:1\n", "it has no model_snapshot"),
        ("model_snapshot={not json\n", "model_snapshot is malformed"),
        ('model_snapshot={"name": "x"}\n', "model_snapshot is malformed (KeyError('models'))"),
        ('model_snapshot={"models": []}\n', "model_snapshot is malformed (AttributeError"),
        ('model_snapshot={"models": {"m": ["1.0"]}}\n', "model_snapshot is malformed"),
        ('model_snapshot={"models": {"m": {"1.0": 5}}}\n', "model_snapshot is malformed"),
    ],
)
def test_a_corrupt_snapshot_says_why(config: ServerConfig, text: str, reason: str) -> None:
    path = put(config, "20260101000000000-snapshot.cfg", text)
    with pytest.raises(ValueError) as caught:
        snapshot.parse(path)
    assert reason in str(caught.value)


def test_candidates_are_cfg_files_newest_first(config: ServerConfig) -> None:
    assert snapshot.candidates(config) == []  # no folder yet
    for name in (
        "20260101000000000-startup.cfg",
        "20260301000000000-shutdown.cfg",
        "20260201000000000-snapshot.cfg",
        ".20260401000000000-snapshot.cfg.tmp",
        ".20260501000000000-snapshot.cfg",
        "notes.txt",
    ):
        put(config, name, "")
    assert [p.name for p in snapshot.candidates(config)] == [
        "20260301000000000-shutdown.cfg",
        "20260201000000000-snapshot.cfg",
        "20260101000000000-startup.cfg",
    ]


def test_the_newest_snapshot_that_parses_is_restored(
    config: ServerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    assert snapshot.newest(config) is None
    good = put(config, "20260101000000000-shutdown.cfg", TORCHSERVE_SNAPSHOT)
    corrupt = put(config, "20260102000000000-snapshot.cfg", "model_snapshot={not json\n")
    empty = put(config, "20260103000000000-snapshot.cfg", "")
    caplog.set_level(logging.ERROR, logger="tsctl.server")
    found = snapshot.newest(config)
    assert (
        found is not None and found[0] == good and {m.version for m in found[1]} == {"1.0", "2.0"}
    )
    skipped = [r.getMessage() for r in caplog.records]
    assert skipped == [
        f"skipping config snapshot {empty}: it has no model_snapshot",
        f"skipping config snapshot {corrupt}: model_snapshot is malformed "
        "(JSONDecodeError('Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)'))",
    ]
    caplog.clear()  # the errors were expected


def test_no_snapshot_parses(config: ServerConfig, caplog: pytest.LogCaptureFixture) -> None:
    put(config, "20260102000000000-snapshot.cfg", "model_snapshot=[]\n")
    assert snapshot.newest(config) is None
    assert len(caplog.records) == 1 and "skipping config snapshot" in caplog.text
    caplog.clear()
