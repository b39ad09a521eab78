"""DCGAN generator (Radford, Metz, Chintala, ICLR 2016): z (B, latent, 1, 1) -> image (B, C, S, S) in
[-1, 1]. Fractionally strided convolutions double the size from 4x4 to S while halving the channels;
batch norm and ReLU everywhere but the output (tanh). latent 100, 64 filters, 64x64 RGB: 3,576,704
parameters."""
import math

import torch
from torch import nn


def dcgan_init(module: nn.Module):
    """The paper's initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def doublings(image_size: int) -> int:
    """Stride-2 layers between 4x4 and image_size, besides the output layer."""
    steps = math.log2(image_size) - 3
    if image_size < 16 or steps != int(steps):
        raise ValueError(f"image_size must be a power of two, at least 16 (got {image_size})")
    return int(steps)


class Generator(nn.Module):
    def __init__(self, latent_size: int = 100, num_filters: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        hidden = doublings(image_size)
        width = num_filters * 2 ** hidden
        layers = [nn.ConvTranspose2d(latent_size, width, 4, 1, 0, bias=False),   # (B, width, 4, 4)
                  nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(hidden):                                                  # (B, width/2, 2H, 2W)
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (B, C, S, S)
        self.main = nn.Sequential(*layers)
        self.latent_size = latent_size
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)
