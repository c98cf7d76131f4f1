"""Fuzzing the readers of operator files: `config.properties` (`tsctl.server.config`) and an
archive's `model-config.yaml` (`tsctl.server.settings.read_yaml`, then `ModelSettings` as the
registry validates it).

- `parse_properties` takes any text and never raises; `read_properties` takes any bytes and
  raises nothing but `InvalidInput`; what `property_line` writes, `parse_properties` reads
  back unchanged.
- `read_yaml` raises nothing but `ArchiveError` whatever the file holds; what it returns,
  `ModelSettings.model_validate` accepts or refuses with a `ValidationError` (which the
  registry turns into an `ArchiveError`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.support import fuzzing
from tsctl.errors import ArchiveError, InvalidInput
from tsctl.server.config import parse_properties, property_line, read_properties
from tsctl.server.settings import ModelSettings, read_yaml

pytest_generate_tests = fuzzing.pytest_generate_tests

# --- config.properties

PROPERTY_PIECES = st.sampled_from(
    ["\\", "\\\\", "=", ":", " ", "\t", "\n", "\r\n", "\r", "#", "!", "\\u00e9", "\\u12", "\\n",
     "key", "value", "\x00", "\x85", "\u2028", "\x0c", "é", "\\\n"]
)  # fmt: skip
PROPERTY_TEXT = st.text() | st.lists(PROPERTY_PIECES | st.text(max_size=4), max_size=40).map(
    "".join
)
#: keys as tsctl and TorchServe write them
KEYS = st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True)


def test_parse_properties_takes_any_text(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(PROPERTY_TEXT)
    def check(text: str) -> None:
        parsed = parse_properties(text)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())

    check()


def test_read_properties_takes_any_bytes(examples: int, tmp_path: Path) -> None:
    path = tmp_path / "config.properties"

    @fuzzing.explore(examples)
    @given(
        st.binary(max_size=512) | PROPERTY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
    def check(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(InvalidInput):
            read_properties(path)

    check()


#: values that hold no line terminator other than LF and CR (which `property_line` escapes)
PLAIN_VALUES = st.text(
    st.characters(exclude_characters="\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", codec="utf-8")
)


def test_property_line_round_trips(examples: int) -> None:
    @fuzzing.explore(examples)
    @given(KEYS, PLAIN_VALUES)
    def check(key: str, value: str) -> None:
        assert parse_properties(property_line(key, value)) == {key: value.strip()}

    check()


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_property_line_round_trips_other_line_breaks(char: str) -> None:
    value = f"a{char}b"
    assert parse_properties(property_line("k", value)) == {"k": value}


# --- model-config.yaml

SETTING_KEYS = [
    "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout",
    "startupTimeout", "recycleAfterRequests", "recycleAboveRssMb", "deviceType", "deviceIds",
    "handler", "other",
]  # fmt: skip
SCALARS = st.sampled_from(
    ["1", "0", "-1", "1e999", ".inf", "-.nan", "~", "null", "yes", "0x1F", "0o17", "1_000",
     "2001-02-03", "2001-12-14t21:59:43.10-05:00", "'quoted'", '"\\x00\\u2028"', "|\n  block",
     "!!str 5", "!!float 1", "!!binary aGk=", "!!set {a, b}", "!!omap [a: 1]", "[1, 2]", "{}",
     "&a 1", "*a", "[]", "99999999999999999999999", "é", "\t"]
) | st.text(max_size=10)  # fmt: skip


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    """A mapping of settings with odd scalars, or random text, either with one character
    changed. Always UTF-8 (other bytes and values the loader cannot convert are the
    hand-picked cases below)."""
    if draw(st.integers(0, 4)) == 0:
        text = draw(st.text(max_size=200))
    else:
        lines = [
            f"{draw(st.sampled_from(SETTING_KEYS))}: {draw(SCALARS)}"
            for _ in range(draw(st.integers(0, 6)))
        ]
        text = "\n".join(lines) + "\n"
    if text and draw(st.booleans()):
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.characters(codec="utf-8")) + text[at + 1 :]
    return text.encode()


def load_settings(model_dir: Path, data: bytes) -> None:
    (model_dir / "model-config.yaml").write_bytes(data)
    try:
        loaded = read_yaml(model_dir, "model-config.yaml")
    except ArchiveError:
        return
    assert isinstance(loaded, dict)
    with contextlib.suppress(ValidationError):
        ModelSettings.model_validate(loaded)


def test_read_yaml_takes_any_file(examples: int, tmp_path: Path) -> None:
    @fuzzing.explore(examples)
    @given(yaml_documents())
    def check(data: bytes) -> None:
        load_settings(tmp_path, data)

    check()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"minWorkers: 2001-02-30\n", id="bad-date"),
        pytest.param(b"batchSize: !!int x\n", id="bad-int-tag"),
        pytest.param(b"deviceType: \xff\xfe\n", id="not-utf8"),
        pytest.param(b"deviceIds: " + b"[" * 5000 + b"\n", id="deep-nesting"),
    ],
)
def test_read_yaml_refuses_values_the_loader_converts(data: bytes, tmp_path: Path) -> None:
    (tmp_path / "model-config.yaml").write_bytes(data)
    with pytest.raises(ArchiveError, match=r"model-config\.yaml in the archive"):
        read_yaml(tmp_path, "model-config.yaml")


def test_read_yaml_self_referencing_alias(tmp_path: Path) -> None:
    """An anchor that contains itself loads as a cyclic list; validation refuses it."""
    load_settings(tmp_path, b"deviceIds: &a [*a]\nminWorkers: &b [*b]\n")
