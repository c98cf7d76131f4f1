"""Which properties a start uses (`snapshot.startup_properties`) and which a snapshot records
(`snapshot.recorded`): TorchServe's rule, --ts-config > the newest snapshot > nothing."""

from __future__ import annotations

from pathlib import Path

from tsctl.server import snapshot
from tsctl.server.config import ServerConfig, build_config, read_properties


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_the_newest_snapshot_that_parses_is_the_configuration(tmp_path: Path) -> None:
    folder = tmp_path / "logs" / "config"
    write(folder, "20260101000000000-shutdown.cfg", "inference_address=http\\://0.0.0.0\\:1\n"
          'model_snapshot={"name": "a", "models": {}}\n')  # fmt: skip
    write(folder, "20260102000000000-startup.cfg", "inference_address=http\\://0.0.0.0\\:2\n"
          'model_snapshot={"name": "b", "models": {}}\n')  # fmt: skip
    corrupt = write(folder, "20260103000000000-snapshot.cfg", "model_snapshot={not json\n")
    chosen = snapshot.startup_properties(None, tmp_path / "logs", no_snapshots=False)
    assert chosen.source == str(folder / "20260102000000000-startup.cfg")
    # the models stay for the daemon, which restores them from the same file
    assert chosen.properties == {"inference_address": "http://0.0.0.0:2"}
    assert len(chosen.skipped) == 1 and chosen.skipped[0].startswith(f"{corrupt}: ")


def test_ts_config_or_ncs_read_no_snapshot(tmp_path: Path) -> None:
    write(tmp_path / "logs" / "config", "20260102000000000-startup.cfg",
          'inference_address=http\\://0.0.0.0\\:2\nmodel_snapshot={"models": {}}\n')  # fmt: skip
    given = write(tmp_path, "config.properties", "job_queue_size=3\n")
    chosen = snapshot.startup_properties(given, tmp_path / "logs", no_snapshots=False)
    assert (chosen.properties, chosen.source) == ({"job_queue_size": "3"}, str(given))
    none = snapshot.startup_properties(None, tmp_path / "logs", no_snapshots=True)
    assert (none.properties, none.source) == ({}, "")
    empty = snapshot.startup_properties(None, tmp_path / "nowhere", no_snapshots=False)
    assert (empty.properties, empty.skipped) == ({}, ())


def test_a_snapshot_records_every_setting_given_and_reads_back(tmp_path: Path) -> None:
    config = build_config(
        {
            "inference_address": "http://127.0.0.1:18080",
            "metrics_address": "http://127.0.0.1:18082",
            "grpc_inference_port": "17070",
            "enable_metrics_api": "false",
            "allowed_urls": "https://a/.*,https://b/.*",
            "max_batch_delay": "50",
            "keystore_pass": "secret",
        },
        {"log_dir": tmp_path / "logs", "model_store": tmp_path},
    )
    path = snapshot.write(config, [], "startup")
    assert path is not None
    text = path.read_text()
    assert "secret" not in text and "number_of_gpu" not in text
    back = read_properties(path)
    restored = build_config(back, {"log_dir": tmp_path / "logs"})
    keys = "inference_address metrics_address grpc_inference_port enable_metrics_api"
    for key in [*keys.split(), "allowed_urls", "max_batch_delay", "model_store"]:
        assert getattr(restored, key) == getattr(config, key), key
    defaults = ServerConfig()
    assert restored.keystore_pass == defaults.keystore_pass
