"""The eager model of the `eager` archive (`--model-file`): its one class, a tiny Linear net."""

import torch


class TinyLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)
