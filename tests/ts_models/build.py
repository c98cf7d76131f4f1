"""Build the models tests/test_ts_handlers.py serves: `python build.py OUT_DIR` (imports torch).

Writes into OUT_DIR: `classifier.pt` (TorchScript, mean colour -> 6 colour classes),
`segmenter.pt` (TorchScript, per-pixel red/blue/background, answers `{"out": ...}`),
`detector_state.pt`, `text_state.pt` and `mnist_state.pt` (state_dicts of the eager models in
this folder; the digit net is trained here on generated glyphs), and per model a folder with
its `index_to_name.json` (and the text model's `source_vocab.pt`).
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tsctl" / "worker" / "compat"))
from colour_detector import ColourDetector  # noqa: E402
from glyphs import digit_set  # noqa: E402
from mnist_handler import DigitClassifier  # noqa: E402
from mnist_net import DigitNet  # noqa: E402
from text_model import SentimentNet  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "cyan", "dark"]
VOCAB = ["<unk>", "good", "great", "love", "bad", "awful", "boring", "not"]


class Segmenter(nn.Module):
    """Class 1 where the pixel is red, 2 where blue, 0 (background) elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def write_mapping(folder: Path, mapping: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index_to_name.json").write_text(json.dumps(mapping))


def colour_classifier(out: Path) -> None:
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(COLOURS)))
    with torch.no_grad():
        model[2].weight.copy_(
            torch.tensor(
                [[4, 0, 0], [0, 4, 0], [0, 0, 4], [2, 2, 0], [0, 2, 2], [-2, -2, -2]],
                dtype=torch.float32,
            )
        )
        model[2].bias.zero_()
    torch.jit.script(model.eval()).save(str(out / "classifier.pt"))
    write_mapping(out / "classifier", {str(i): [f"n{i:03d}", c] for i, c in enumerate(COLOURS)})


def segmenter(out: Path) -> None:
    model = Segmenter()
    with torch.no_grad():
        model.conv.weight.copy_(
            torch.tensor([[0, 0, 0], [2, 0, 0], [0, 0, 2]], dtype=torch.float32).view(3, 3, 1, 1)
        )
        model.conv.bias.zero_()
    torch.jit.script(model.eval()).save(str(out / "segmenter.pt"))


def detector(out: Path) -> None:
    model = ColourDetector()
    with torch.no_grad():
        model.confidence.copy_(torch.tensor([0.9, 0.5, 0.3]))  # red, green (= threshold), blue
    torch.save(model.state_dict(), out / "detector_state.pt")
    write_mapping(out / "detector", {"1": "red", "2": "green", "3": "blue"})


def sentiment(out: Path) -> None:
    model = SentimentNet()
    with torch.no_grad():
        weights = torch.zeros(len(VOCAB), 2)
        weights[1:4, 0] = 40.0  # good, great, love
        weights[4:7, 1] = 40.0  # bad, awful, boring
        model.embedding.weight.copy_(weights)
        model.fc.weight.copy_(torch.eye(2))
        model.fc.bias.zero_()
    torch.save(model.state_dict(), out / "text_state.pt")
    write_mapping(out / "text", {"0": "positive", "1": "negative"})
    torch.save({token: i for i, token in enumerate(VOCAB)}, out / "text" / "source_vocab.pt")


def digits(out: Path) -> None:
    """Train the digit net on generated glyphs, preprocessed as its handler does."""
    prepare = DigitClassifier.image_processing
    train = digit_set(seed=1, per_digit=80)
    x = torch.stack([prepare(image) for image, _ in train])
    y = torch.tensor([digit for _, digit in train])
    torch.manual_seed(0)
    model = DigitNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
    model.eval()
    held_out = digit_set(seed=2, per_digit=30)
    with torch.no_grad():
        guesses = model(torch.stack([prepare(image) for image, _ in held_out])).argmax(1)
    accuracy = sum(int(g) == d for g, (_, d) in zip(guesses, held_out, strict=True)) / len(held_out)
    if accuracy < 0.97:
        raise SystemExit(f"the digit net reached only {accuracy:.2%} on held-out glyphs")
    torch.save(model.state_dict(), out / "mnist_state.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    colour_classifier(out)
    segmenter(out)
    detector(out)
    sentiment(out)
    digits(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
