"""Build the tiny models the built-in handler tests serve (run in a subprocess: imports torch)."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_net import TinyNet  # noqa: E402


def main(out: Path) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    torch.jit.script(mlp).save(str(out / "mlp.pt"))
    eager = TinyNet().eval()
    torch.save(eager.state_dict(), out / "tiny_state.pt")
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 6),
    ).eval()
    torch.jit.script(classifier).save(str(out / "classifier.pt"))
    names = {str(i): ["id", f"class{i}"] for i in range(6)}
    (out / "index_to_name.json").write_text(json.dumps(names))
    # the same inputs, answered locally, so the test can compare with the server
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = {"mlp": mlp(x).tolist()[0], "tiny": eager(x).tolist()[0]}
    (out / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
