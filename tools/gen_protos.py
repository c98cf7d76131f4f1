"""Generate tsctl's Python gRPC code from proto/ into tsctl/proto_gen/ (`make protos`).

`python tools/gen_protos.py [OUT_DIR]`. The files are compiled under the `proto/` path, so
their descriptors never clash with a TorchServe client's `inference.proto` in one process,
and the generated imports are rewritten to point into the package. A test regenerates into a
temporary folder and compares, so the committed code can never go stale.

The Open Inference Protocol's file (`PRIVATE_POOL`) defines protobuf package `inference`, as
tritonclient's and kserve's generated code do: the same full names in protobuf's default
descriptor pool would refuse to load side by side. Its module is rewritten to build its
descriptors in a pool of its own (`POOL`), so tsctl, tritonclient and kserve (each in the
default pool) share a process. Nothing else changes: message classes, the wire format and the
`_grpc` module (which names the service by its path only) are as protoc wrote them.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("inference.proto", "management.proto", "health.proto", "grpc_predict_v2.proto")
PACKAGE = "tsctl.proto_gen"
#: generated modules whose descriptors live in a private pool, not protobuf's default one
PRIVATE_POOL = ("grpc_predict_v2_pb2.py",)
DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_LINES = (
    "# tools/gen_protos.py: a pool of its own; other packages define `inference` too\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def private_pool(text: str) -> str:
    """`text` (a generated `_pb2` module) building its descriptors in its own pool."""
    if text.count(DEFAULT_POOL_LINE) != 1:
        raise SystemExit("protoc's output changed: no single default-pool line to rewrite")
    return text.replace(DEFAULT_POOL_LINE, PRIVATE_POOL_LINES)


def generate(out: Path) -> None:
    import google.rpc
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    # google/rpc/status.proto ships with googleapis-common-protos
    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"-I{googleapis}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            *(f"proto/{name}" for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(raw) / "proto").glob("*.py")):
            text = re.sub(
                r"^from proto import ", f"from {PACKAGE} import ", path.read_text(), flags=re.M
            )
            if path.name in PRIVATE_POOL:
                text = private_pool(text)
            (out / path.name).write_text(text)
    (out / "__init__.py").write_text(
        '"""Generated from proto/ by tools/gen_protos.py (`make protos`); do not edit."""\n'
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tsctl" / "proto_gen"
    if target.exists() and target == ROOT / "tsctl" / "proto_gen":
        shutil.rmtree(target)
    generate(target)
