"""Fuzzing the archive reader (`tsctl.archive.reader`): whatever file it is given, opening,
checking and extracting it raise nothing but `ArchiveError` (`UnsafeArchive` is one), and an
extraction that fails leaves nothing behind.

Inputs: real archives of each format (a `.mar` deflated and stored, a `.tar.gz`) with bytes
flipped, set, cut or inserted, and random bytes behind a zip or gzip magic. Extraction is
bounded to 1 MiB, so a mutated size cannot fill the disk.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import fuzzing
from tests.support.paths import FIXTURES
from tsctl.archive.reader import open_archive
from tsctl.archive.writer import ArchiveFormat, ArchiveSpec, plan_archive, write_archive
from tsctl.errors import ArchiveError

pytest_generate_tests = fuzzing.pytest_generate_tests

LIMIT = 1 << 20
FORMATS = [ArchiveFormat.DEFAULT, ArchiveFormat.ZIP_STORE, ArchiveFormat.TGZ]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[ArchiveFormat, bytes]:
    """One small archive of each format: a handler and a model-config.yaml."""
    work = tmp_path_factory.mktemp("archives")
    config = work / "model-config.yaml"
    config.write_text("minWorkers: 1\nbatchSize: 2\n")
    out: dict[ArchiveFormat, bytes] = {}
    for fmt in FORMATS:
        (work / fmt.value).mkdir()
        spec = ArchiveSpec(
            model_name="fuzzed",
            handler=str(FIXTURES / "handlers" / "swiss.py"),
            version="1.0",
            config_file=config,
            archive_format=fmt,
            export_path=work / fmt.value,
            force=True,
        )
        out[fmt] = write_archive(plan_archive(spec)).read_bytes()
    return out


def read_archive(path: Path, target: Path) -> None:
    """Open, check and extract `path`; only `ArchiveError` may come out, and a failed
    extraction leaves `target` absent."""
    try:
        with open_archive(path) as archive:
            archive.check(LIMIT)
            archive.extract(target, LIMIT)
    except ArchiveError:
        assert not target.exists() or not any(target.iterdir())
    finally:
        shutil.rmtree(target, ignore_errors=True)


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("fmt", [pytest.param(f, id=f.value) for f in FORMATS])
def test_mutated_archives(
    fmt: ArchiveFormat, samples: dict[ArchiveFormat, bytes], examples: int, tmp_path: Path
) -> None:
    path = tmp_path / "model.mar"

    @fuzzing.explore(examples, report_multiple_bugs=False)
    @given(mutations(samples[fmt]))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        read_archive(path, tmp_path / "out")

    check()


def test_random_bytes_behind_a_magic(examples: int, tmp_path: Path) -> None:
    path = tmp_path / "model.mar"

    @fuzzing.explore(examples)
    @given(st.sampled_from([b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b\x08\x00", b""]), st.binary())
    def check(magic: bytes, rest: bytes) -> None:
        path.write_bytes(magic + rest)
        read_archive(path, tmp_path / "out")

    check()


def _central(data: bytearray, name: bytes) -> int:
    """The offset of `name`'s central directory header in a zip."""
    at = data.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == name:
            return at
        at = data.index(b"PK\x01\x02", at + 46)


def _set_u16(data: bytearray, at: int, value: int) -> None:
    struct.pack_into("<H", data, at, value)


MANIFEST = b"MAR-INF/MANIFEST.json"
HANDLER = b"swiss.py"


def compression_99(data: bytearray) -> None:
    _set_u16(data, _central(data, MANIFEST) + 10, 99)


def encrypted(data: bytearray) -> None:
    at = _central(data, MANIFEST) + 8
    _set_u16(data, at, struct.unpack_from("<H", data, at)[0] | 0x1)


def bad_utf8_name(data: bytearray) -> None:
    at = _central(data, HANDLER)
    _set_u16(data, at + 8, struct.unpack_from("<H", data, at + 8)[0] | 0x800)
    data[at + 46] = 0xFF


def bad_local_header(data: bytearray) -> None:
    at = _central(data, HANDLER)
    local = struct.unpack_from("<I", data, at + 42)[0]
    data[local : local + 4] = b"PK\x09\x09"


@pytest.mark.parametrize(
    "corrupt",
    [compression_99, encrypted, bad_utf8_name, bad_local_header],
    ids=lambda f: f.__name__.replace("_", "-"),
)
def test_corrupt_zip_headers(
    corrupt: Callable[[bytearray], None], samples: dict[ArchiveFormat, bytes], tmp_path: Path
) -> None:
    """One field of a real .mar's zip headers set to a value zipfile refuses."""
    data = bytearray(samples[ArchiveFormat.DEFAULT])
    corrupt(data)
    path = tmp_path / "model.mar"
    path.write_bytes(bytes(data))
    read_archive(path, tmp_path / "out")
