"""Build an (untrained) ResNetFaces model and save it as TorchScript.

The weights are randomly initialised from a fixed seed and are NOT trained:
outputs are meaningless as landmarks and only useful for exercising a server.
The result is deterministic for a given ``--seed``.

Usage: ``python build_model.py [--out PATH] [--seed N]``
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import cast

# torch warns at import when numpy is absent; nothing here needs numpy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import INPUT_SIZE, ResNetFaces  # noqa: E402

DEFAULT_OUT = HERE / "resnet_faces.pt"


def build(seed: int) -> torch.jit.ScriptModule:
    """Create the model with ``seed``, switch to eval and compile to TorchScript."""
    torch.manual_seed(seed)
    model = ResNetFaces().eval()
    try:
        return torch.jit.script(model)
    except Exception as exc:  # pragma: no cover - fallback path
        print(f"torch.jit.script failed ({exc!r}); falling back to trace", file=sys.stderr)
        example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
        with torch.no_grad():
            traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
        return cast(torch.jit.ScriptModule, traced)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the model and write it to disk."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .pt path")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    args = parser.parse_args(argv)

    torch.set_num_threads(min(4, torch.get_num_threads()))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted = build(args.seed)
    scripted.save(str(out))
    size_mb = out.stat().st_size / (1024 * 1024)
    print(f"saved {out} ({out.stat().st_size} bytes, {size_mb:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
