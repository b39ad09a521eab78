"""ERFNet's three blocks (Romera et al., IEEE T-ITS 2018, section III and table I).

Attribute names follow the authors' PyTorch code (Eromera/erfnet_pytorch), so that their ImageNet
encoder and trained networks load by name. Batch norm uses their eps of 1e-3.
"""
import torch
import torch.nn.functional as F
from torch import nn


class DownsamplerBlock(nn.Module):
    """ENet's initial block: a 3x3 stride-2 convolution to out - in channels beside a 2x2 max pool
    of the input (in channels), concatenated, then BN and ReLU. Halves height and width, which must
    be even (the convolution rounds up, the pool down)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(f"DownsamplerBlock({in_channels}, {out_channels}): the pooled input keeps "
                             "its channels, so out_channels must exceed in_channels")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        # (B, in, H, W) -> (B, out, H/2, W/2)
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1d(nn.Module):
    """The "non-bottleneck-1D" residual block: a 3x3 convolution factorised into 3x1 then 1x3,
    twice (ReLU between, BN after each pair), the second pair dilated; dropout on the residual
    branch; ReLU after the sum. Keeps shape (B, C, H, W)."""

    def __init__(self, channels: int, dropout: float = 0.0, dilation: int = 1):
        super().__init__()
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), bias=True)
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1), bias=True)
        self.bn1 = nn.BatchNorm2d(channels, eps=1e-3)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(dilation, 0), dilation=(dilation, 1),
                                   bias=True)
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, dilation), dilation=(1, dilation),
                                   bias=True)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.dropout(self.bn2(self.conv1x3_2(out)))
        return F.relu(out + x)


class UpsamplerBlock(nn.Module):
    """A 3x3 stride-2 transposed convolution, BN, ReLU: (B, in, H, W) -> (B, out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1,
                                       bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))
