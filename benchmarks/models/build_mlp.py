"""Build the tiny MLP that `serve_bench.py` serves and save it as TorchScript.

Linear 16→64 → ReLU → Linear 64→64 → ReLU → Linear 64→4, plain torch, weights from a fixed
seed (untrained: the outputs only exercise the servers). Deterministic for a given `--seed`.

Usage: `python build_mlp.py --out DIR/mlp.pt [--seed N]`
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

# torch warns at import when numpy is absent; nothing here needs numpy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

IN_FEATURES = 16
HIDDEN = 64
OUT_FEATURES = 4


def build(seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES),
    ).eval()
    scripted: torch.jit.ScriptModule = torch.jit.script(model)
    return scripted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output .pt path")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    build(args.seed).save(str(out))
    print(f"saved {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
