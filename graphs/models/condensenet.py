"""CondenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2018).

A DenseNet whose 1x1 bottleneck convolutions are learned group convolutions, with exponentially
growing growth rates per dense block and no transition convolutions (transitions are average
pooling). CondenseNet-86 on CIFAR-10 (stages 14-14-14, growth 8-16-32): 1,451,594 parameters while
training; condensed, 520,202 (the classifier is kept whole so logits stay identical).
"""
import copy
import math

import torch
from torch import nn

from graphs.models.custom_layers.learned_group_conv import CondensedConv, LearnedGroupConv


class DenseLayer(nn.Module):
    """x -> [x, 3x3 group conv(learned group 1x1 conv(x))]: adds growth_rate channels."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: int, group_1x1: int,
                 group_3x3: int, condense_factor: int, dropout_rate: float):
        super().__init__()
        self.conv_1 = LearnedGroupConv(in_channels, bottleneck * growth_rate, group_1x1, condense_factor,
                                       dropout_rate)
        self.conv_2 = nn.Sequential(
            nn.BatchNorm2d(bottleneck * growth_rate), nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck * growth_rate, growth_rate, 3, padding=1, groups=group_3x3, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_2(self.conv_1(x))], 1)


class CondenseNet(nn.Module):
    def __init__(self, stages=(14, 14, 14), growth=(8, 16, 32), bottleneck: int = 4, group_1x1: int = 4,
                 group_3x3: int = 4, condense_factor: int = 4, init_stride: int = 1, pool_size: int = 8,
                 dropout_rate: float = 0.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if len(stages) != len(growth):
            raise ValueError(f"stages {list(stages)} and growth {list(growth)} differ in length")
        channels = 2 * growth[0]
        layers = [nn.Conv2d(in_channels, channels, 3, stride=init_stride, padding=1, bias=False)]
        for block, (depth, rate) in enumerate(zip(stages, growth)):
            for _ in range(depth):
                layers.append(DenseLayer(channels, rate, bottleneck, group_1x1, group_3x3, condense_factor,
                                         dropout_rate))
                channels += rate
            if block < len(stages) - 1:
                layers.append(nn.AvgPool2d(2))                      # transition: halve H and W
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AvgPool2d(pool_size), nn.Flatten()]
        self.features = nn.Sequential(*layers)                      # (B, channels)
        self.classifier = nn.Linear(channels, num_classes)
        self.blocks = list(stages)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> logits (B, num_classes)."""
        return self.classifier(self.features(x))

    def learned_group_convs(self) -> list:
        return [m for m in self.modules() if isinstance(m, LearnedGroupConv)]

    def condense_to(self, progress: float):
        for layer in self.learned_group_convs():
            layer.condense_to(progress)

    def lasso_loss(self) -> torch.Tensor:
        return sum(layer.lasso_loss() for layer in self.learned_group_convs())

    def pruned_fraction_per_block(self) -> list:
        layers = self.learned_group_convs()
        fractions, start = [], 0
        for depth in self.blocks:
            block = layers[start:start + depth]
            fractions.append(sum(layer.pruned_fraction() for layer in block) / len(block))
            start += depth
        return fractions


def _replace_learned_group_convs(model: CondenseNet, make) -> nn.Module:
    """A copy of `model` whose LearnedGroupConvs are replaced by make(layer)."""
    condensed = copy.deepcopy(model)
    for module in condensed.modules():
        if isinstance(module, DenseLayer):
            module.conv_1 = make(module.conv_1)
    return condensed


def condense(model: CondenseNet) -> nn.Module:
    """The trained network as standard group convolutions; same logits, fewer weights and MACs."""
    return _replace_learned_group_convs(model, CondensedConv.from_learned)


def condensed_skeleton(model: CondenseNet) -> nn.Module:
    """The condensed network's structure, to load condensed weights into."""
    return _replace_learned_group_convs(
        model, lambda layer: CondensedConv(layer.in_channels, layer.out_channels, layer.groups,
                                           layer.condense_factor))


def count_macs(model: nn.Module, input_shape=(1, 3, 32, 32)) -> int:
    """Multiply-adds of one forward pass over convolutions and linear layers (as the paper counts)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() // output.shape[0] * kernel

    def linear_hook(module, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    def learned_hook(module, inputs, output):   # its dense, masked 1x1 convolution
        nonlocal total
        total += output.numel() // output.shape[0] * module.in_channels

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(learned_hook) for m in model.modules()
                if isinstance(m, LearnedGroupConv)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_shape, device=next(model.parameters()).device))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
