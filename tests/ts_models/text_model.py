"""A sentiment model of TorchServe's text classifier's shape: `model(token_ids, offsets)`."""

import torch
from torch import nn

VOCAB_SIZE = 8


class SentimentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(VOCAB_SIZE, 2, mode="mean")
        self.fc = nn.Linear(2, 2)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.embedding(text, offsets))
        return out
