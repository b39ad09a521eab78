"""Learned group convolution (CondenseNet, Huang et al. 2018, section 3) and its condensed form.

During training a 1x1 convolution keeps all its weights but multiplies them by a 0/1 mask. Its
output channels are split into `groups` groups (output channel o belongs to group o % groups), and
at each of `condense_factor - 1` condensing stages every group drops the in_channels /
condense_factor input channels whose weights matter least to it (smallest L1 norm). After the last
stage each group reads in_channels / condense_factor inputs, and the layer is equivalent to
index_select -> group convolution -> channel shuffle, which CondensedConv computes.
"""
import torch
import torch.nn.functional as F
from torch import nn


def stage_at(progress: float, condense_factor: int) -> int:
    """Condensing stage reached at a fraction `progress` of training: the condense_factor - 1
    pruning stages are spread evenly over the first half, the optimisation stage is the second."""
    stages = condense_factor - 1
    for stage in range(stages):
        if progress * 2 < (stage + 1) / stages:
            return stage
    return stages


class LearnedGroupConv(nn.Module):
    """BN -> ReLU -> (dropout) -> 1x1 conv with a learned sparsity mask."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, condense_factor: int,
                 dropout_rate: float = 0.0):
        super().__init__()
        if in_channels % groups or out_channels % groups or in_channels % condense_factor:
            raise ValueError(f"LearnedGroupConv({in_channels}, {out_channels}): channels must divide by "
                             f"groups ({groups}) and in_channels by condense_factor ({condense_factor})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor = groups, condense_factor
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        # Part of the state_dict, so a checkpoint resumes with the same pruning.
        self.register_buffer("mask", torch.ones_like(self.conv.weight))   # (out, in, 1, 1)
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long))  # inputs dropped per group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.norm(x)))
        return F.conv2d(x, self.conv.weight * self.mask)

    def _group_weights(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in, 1, 1) -> (groups, out / groups, in): row k of group g is output g + k * groups."""
        return weight.view(self.out_channels // self.groups, self.groups, self.in_channels).transpose(0, 1)

    @torch.no_grad()
    def condense_to(self, progress: float):
        """Prune up to the stage that `progress` (0..1 through training) has reached."""
        target = stage_at(progress, self.condense_factor)
        while int(self.stage) < target:
            self._drop_inputs(self.in_channels // self.condense_factor)
            self.stage += 1

    def _drop_inputs(self, count: int):
        importance = self._group_weights((self.conv.weight * self.mask).abs()).sum(1)  # (groups, in)
        mask = self._group_weights(self.mask)   # a view: writing to it writes self.mask
        for group in range(self.groups):
            # Inputs already dropped have importance 0 and sort first: skip past them.
            order = importance[group].argsort(stable=True)
            drop = order[int(self.dropped):int(self.dropped) + count]
            mask[group][:, drop] = 0
        self.dropped += count

    def lasso_loss(self) -> torch.Tensor:
        """Group lasso: for each group and input, the L2 norm of the weights that connect them."""
        weight = self._group_weights((self.conv.weight * self.mask).pow(2))   # (groups, out/g, in)
        return weight.sum(1).clamp(min=1e-6).sqrt().sum()

    def pruned_fraction(self) -> float:
        return 1.0 - float(self.mask.mean())


class CondensedConv(nn.Module):
    """The efficient form of a fully condensed LearnedGroupConv: select each group's inputs,
    BN -> ReLU, group convolution, shuffle the outputs back into the trained layer's order."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, condense_factor: int):
        super().__init__()
        self.groups = groups
        selected = in_channels // condense_factor * groups
        self.register_buffer("index", torch.zeros(selected, dtype=torch.long))
        self.norm = nn.BatchNorm2d(selected)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(selected, out_channels, kernel_size=1, groups=groups, bias=False)

    @classmethod
    @torch.no_grad()
    def from_learned(cls, layer: LearnedGroupConv) -> "CondensedConv":
        if int(layer.stage) < layer.condense_factor - 1:
            raise ValueError("the layer is not fully condensed yet (train through the first half)")
        condensed = cls(layer.in_channels, layer.out_channels, layer.groups, layer.condense_factor)
        weight = layer._group_weights(layer.conv.weight)          # (groups, out/g, in)
        kept = layer._group_weights(layer.mask)[:, 0, :].bool()   # (groups, in): same for a group's rows
        index = torch.cat([kept[g].nonzero().flatten() for g in range(layer.groups)])
        condensed.index.copy_(index)
        per_group = len(index) // layer.groups
        condensed.conv.weight.copy_(torch.cat(
            [weight[g][:, index[g * per_group:(g + 1) * per_group]] for g in range(layer.groups)]
        ).unsqueeze(-1).unsqueeze(-1))                               # (out, in/condense, 1, 1)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(condensed.norm, name).copy_(getattr(layer.norm, name)[index])
        condensed.norm.num_batches_tracked.copy_(layer.norm.num_batches_tracked)
        condensed.norm.eps, condensed.norm.momentum = layer.norm.eps, layer.norm.momentum
        return condensed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.relu(self.norm(x.index_select(1, self.index))))   # (B, out, H, W), by group
        batch, channels, height, width = x.shape
        # Group-major (g * out/g + k) -> the trained layer's order (k * groups + g).
        return x.view(batch, self.groups, channels // self.groups, height, width).transpose(1, 2).reshape(
            batch, channels, height, width)
