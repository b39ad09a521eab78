"""ERFNet (Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-time Semantic
Segmentation", IEEE T-ITS 2018, table I): an encoder of downsamplers and non-bottleneck-1D blocks,
dilated 2, 4, 8, 16 in its last stage, and a light decoder back to full resolution.

For 21 classes the network has 2,064,321 parameters. The authors' `Net(21)` also carries the 1x1
head their encoder-only training stage used (128 -> 21, 2,709 more); `encoder_head=True` adds it.
"""
from torch import nn

from graphs.models.custom_layers.erfnet_blocks import DownsamplerBlock, NonBottleneck1d, UpsamplerBlock

# Prefixes in front of the encoder's own keys in files that hold one: the authors' ImageNet
# checkpoint (DataParallel(ERFNet_imagenet) -> "module.features.encoder."), a DataParallel or
# DDP-wrapped ERFNet ("module.encoder."), a plain ERFNet ("encoder.").
ENCODER_PREFIXES = ("module.features.encoder.", "features.encoder.", "module.encoder.", "encoder.")


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 128, H/8, W/8); H and W must be multiples of 8."""

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.initial_block = DownsamplerBlock(3, 16)
        layers = [DownsamplerBlock(16, 64)]
        layers += [NonBottleneck1d(64, dropout=0.03, dilation=1) for _ in range(5)]
        layers.append(DownsamplerBlock(64, 128))
        for _ in range(2):
            layers += [NonBottleneck1d(128, dropout=0.3, dilation=d) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)
        # Only for predicting from the encoder alone, as the authors' first training stage does.
        self.output_conv = nn.Conv2d(128, num_classes, 1, bias=True) if num_classes else None

    def forward(self, x, predict: bool = False):
        x = self.initial_block(x)
        for layer in self.layers:
            x = layer(x)
        if predict:
            if self.output_conv is None:
                raise RuntimeError("this encoder has no output head: build ERFNet(..., encoder_head=True)")
            x = self.output_conv(x)                               # (B, classes, H/8, W/8)
        return x


class Decoder(nn.Module):
    """(B, 128, H/8, W/8) -> logits (B, num_classes, H, W)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList([
            UpsamplerBlock(128, 64), NonBottleneck1d(64), NonBottleneck1d(64),    # (B, 64, H/4, W/4)
            UpsamplerBlock(64, 16), NonBottleneck1d(16), NonBottleneck1d(16),     # (B, 16, H/2, W/2)
        ])
        self.output_conv = nn.ConvTranspose2d(16, num_classes, 2, stride=2, bias=True)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.output_conv(x)


class ERFNet(nn.Module):
    """(B, 3, H, W) images, H and W multiples of 8 -> (B, num_classes, H, W) logits."""

    def __init__(self, num_classes: int = 21, encoder_head: bool = False):
        super().__init__()
        self.encoder = Encoder(num_classes if encoder_head else None)
        self.decoder = Decoder(num_classes)

    def forward(self, x, only_encode: bool = False):
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"ERFNet downsamples 3 times: height and width must be multiples of 8, "
                             f"got {tuple(x.shape[-2:])}")
        if only_encode:
            return self.encoder(x, predict=True)
        return self.decoder(self.encoder(x))

    def load_encoder(self, state: dict) -> list[str]:
        """Copy an encoder's weights from `state` (see ENCODER_PREFIXES for the layouts read; a
        decoder, classifier or encoder head in it is left out). Raises ValueError naming missing
        or mismatched keys; returns the keys of `state` that were not used."""
        own = {name: value for name, value in self.encoder.state_dict().items()
               if not name.startswith("output_conv.")}
        found, unused = {}, []
        for key, value in state.items():
            prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), "")   # "": a bare encoder's
            name = key[len(prefix):]
            if name in own:
                found[name] = value
            else:
                unused.append(key)
        # Files from before PyTorch 0.4 (the authors' ImageNet encoder) have no BN step counters.
        missing = [name for name in own if name not in found and not name.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{len(missing)} of the encoder's {len(own)} tensors are missing (e.g. "
                             f"{', '.join(missing[:3])}); the file's keys start: "
                             f"{', '.join(list(state)[:3]) or 'none'}")
        wrong = [f"{name} {tuple(found[name].shape)} vs {tuple(own[name].shape)}"
                 for name in found if found[name].shape != own[name].shape]
        if wrong:
            raise ValueError(f"tensor shapes differ from ERFNet's encoder: {'; '.join(wrong[:3])}")
        self.encoder.load_state_dict(found, strict=False)
        return unused
