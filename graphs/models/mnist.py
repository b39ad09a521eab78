"""MNIST classifiers: pytorch/examples' network ("examples", 1,199,882 parameters) and a small
batch-normalised one ("fast", 29,178 parameters) that pools after every convolution."""
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


def _conv_pool_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 convolution (same padding), 2x2 max pooling, batch norm, ReLU: pooled first, the norm
    and the ReLU work on a quarter of the values."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class MnistFastNet(nn.Module):
    """Three convolutions, each followed by pooling: only the first (one input channel) runs at
    28 x 28, the others at 14 x 14 and 7 x 7. MnistNet's 32 -> 64 convolution at 24 x 24 alone has
    ~5x the multiply-adds of this whole net (10.6M against 1.9M an image)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_pool_bn(1, c1),    # (B, c1, 14, 14)
            *_conv_pool_bn(c1, c2),   # (B, c2, 7, 7)
            *_conv_pool_bn(c2, c3),   # (B, c3, 3, 3)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),             # (B, c3 * 9)
            nn.Linear(c3 * 9, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> logits (B, num_classes)."""
        return self.classifier(self.features(x))


# The `network` choices of MnistAgent.
NETWORKS = {"examples": MnistNet, "fast": MnistFastNet}
