"""DCGAN discriminator: image (B, C, S, S) -> one logit per image (B,). Strided convolutions halve the
size down to 4x4, batch norm on all but the first layer, leaky ReLU; the sigmoid is left to the
loss (BCE with logits, numerically stable). 64 filters, 64x64 RGB: 2,765,568 parameters."""
import torch
from torch import nn

from graphs.models.dcgan_generator import dcgan_init, doublings


class Discriminator(nn.Module):
    def __init__(self, num_filters: int = 64, channels: int = 3, image_size: int = 64, relu_slope: float = 0.2):
        super().__init__()
        width = num_filters
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False),               # (B, nf, S/2, S/2)
                  nn.LeakyReLU(relu_slope, inplace=True)]
        for _ in range(doublings(image_size)):                                   # (B, 2w, H/2, W/2)
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width * 2), nn.LeakyReLU(relu_slope, inplace=True)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))                  # (B, 1, 1, 1)
        self.main = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).flatten()
