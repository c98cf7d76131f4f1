"""The committed gRPC code is what proto/ generates, and the protos are wire-identical to
TorchServe 0.12's (same packages, services, methods, messages, fields, numbers and types)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT

GENERATED = ROOT / "tsctl" / "proto_gen"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(tmp_path)], check=True
    )
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    committed = {p.name: p.read_text() for p in GENERATED.glob("*.py")}
    assert fresh == committed, "tsctl/proto_gen is stale: run `make protos`"


def _descriptors(tmp: Path, include: Path, files: list[str]) -> dict[str, object]:
    """Compile protos to a descriptor set; return {full name: comparable shape}."""
    import google.rpc
    import grpc_tools
    from google.protobuf import descriptor_pb2

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    out = tmp / f"{include.name}.pb"
    args = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{include}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}", f"-I{googleapis}",
        f"--descriptor_set_out={out}", *files,
    ]  # fmt: skip
    subprocess.run(args, check=True)
    found: dict[str, object] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        for message in file.message_type:
            fields = sorted(
                (f.name, f.number, f.type, f.label, f.type_name, f.proto3_optional)
                for f in message.field
            )
            nested = sorted(n.name for n in message.nested_type)
            found[f"{file.package}.{message.name}"] = (fields, nested)
        for service in file.service:
            methods = sorted(
                (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in service.method
            )
            found[f"{file.package}.{service.name}"] = methods
    return found


def test_wire_identical_to_torchserve(tmp_path: Path) -> None:
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("ts")  # torchserve==0.12.0, a test dependency; not imported
    assert spec is not None and spec.submodule_search_locations
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    theirs = tmp_path / "torchserve"
    with zipfile.ZipFile(jar) as zf:
        for name in ("inference.proto", "management.proto"):
            (theirs / "proto").mkdir(parents=True, exist_ok=True)
            (theirs / "proto" / name).write_bytes(zf.read(f"proto/{name}"))
    files = ["proto/inference.proto", "proto/management.proto"]
    reference = _descriptors(tmp_path, theirs, files)
    ours = _descriptors(tmp_path, ROOT, files)
    assert ours == reference
    assert "org.pytorch.serve.grpc.inference.InferenceAPIsService" in ours
