"""Q-networks for DQN: observation -> one Q-value per discrete action.

MLPQNetwork: for vector observations (CartPole's 4 numbers).
ConvQNetwork: for screen observations, the PyTorch DQN tutorial's network (three 5x5 stride-2
convolutions with batch norm, then a linear layer).
"""
from collections.abc import Sequence

import torch
from torch import nn


class MLPQNetwork(nn.Module):
    def __init__(self, observation_size: int, num_actions: int, hidden_sizes: Sequence[int] = (256, 256)):
        super().__init__()
        layers, width = [], observation_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_actions))
        self.layers = nn.Sequential(*layers)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.layers(observations)          # (B, obs) -> (B, actions)


def conv_output_size(size: int, kernel_size: int, stride: int, layers: int) -> int:
    for _ in range(layers):
        size = (size - kernel_size) // stride + 1
    return size


class ConvQNetwork(nn.Module):
    def __init__(self, input_channels: int, height: int, width: int, num_actions: int,
                 conv_filters: Sequence[int] = (16, 32, 32), kernel_size: int = 5, stride: int = 2):
        super().__init__()
        out_height = conv_output_size(height, kernel_size, stride, len(conv_filters))
        out_width = conv_output_size(width, kernel_size, stride, len(conv_filters))
        if out_height < 1 or out_width < 1:
            raise ValueError(f"a {height}x{width} screen is too small for {len(conv_filters)} convolutions "
                             f"of kernel {kernel_size}, stride {stride}")
        layers, channels = [], input_channels
        for filters in conv_filters:
            # No conv bias: batch norm's shift replaces it.
            layers += [nn.Conv2d(channels, filters, kernel_size, stride, bias=False), nn.BatchNorm2d(filters),
                       nn.ReLU()]
            channels = filters
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * out_height * out_width, num_actions)

    def forward(self, screens: torch.Tensor) -> torch.Tensor:
        features = self.features(screens)          # (B, C, H, W) -> (B, filters, H', W')
        return self.head(features.flatten(1))      # (B, actions)
