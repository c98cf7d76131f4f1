"""Every setting is documented in docs/configuration.md."""

from __future__ import annotations

from tests.support.paths import ROOT
from tsctl.server.config import ServerConfig
from tsctl.server.settings import ModelSettings

DOC = (ROOT / "docs" / "configuration.md").read_text()


def test_every_server_setting_is_documented() -> None:
    missing = [key for key in ServerConfig.model_fields if f"| `{key}` |" not in DOC]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_every_model_setting_is_documented() -> None:
    keys = [field.alias or name for name, field in ModelSettings.model_fields.items()]
    missing = [key for key in keys if f"| `{key}` |" not in DOC]
    assert not missing, f"document these in docs/configuration.md: {missing}"
