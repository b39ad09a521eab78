"""The convolutional net of pytorch/examples' MNIST example (1,199,882 parameters)."""
import torch
from torch import nn


class MnistNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout1: float = 0.25, dropout2: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True),    # (B, 32, 26, 26)
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),   # (B, 64, 24, 24)
            nn.MaxPool2d(2),                               # (B, 64, 12, 12)
            nn.Dropout(dropout1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                  # (B, 9216)
            nn.Linear(9216, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> logits (B, num_classes)."""
        return self.classifier(self.features(x))
