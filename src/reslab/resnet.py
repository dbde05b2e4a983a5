"""One ResNet class for both of the paper's families, built from a small frozen config.

  cifar     (paper §4.2)  3x3 conv, 16 -> 3 stages of n blocks at 16/32/64 filters -> GAP -> fc
  imagenet  (paper Table 1) 7x7/2 conv, 64 -> 3x3/2 max pool -> 4 stages at 64/128/256/512 -> GAP -> fc

Initialisation: convolutions use He (Kaiming) normal with mode='fan_out' and the ReLU gain,
std = sqrt(2 / (k*k*c_out)) — the fan that torchvision and the paper's Torch code use; BN gamma=1, beta=0;
the fc layer keeps PyTorch's default uniform init. Gated shortcuts then reset their gates (weight 0,
bias GATE_BIAS_INIT) so that every block starts near its shortcut.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .blocks import BLOCKS, SHORTCUTS, Block, GatedShortcut, check_options

STEMS = {
    "cifar": dict(widths=(16, 32, 64), stem_width=16),
    "imagenet": dict(widths=(64, 128, 256, 512), stem_width=64),
}


@dataclass(frozen=True)
class ResNetConfig:
    family: str                      # "cifar" | "imagenet": stem and stage widths
    block: str                       # "basic" | "bottleneck"
    layers: tuple[int, ...]          # blocks per stage
    shortcut: str = "A"              # "A" | "B" | "C" (paper §3.3) | "gated" (highway-style, not the paper's)
    residual: bool = True            # False: the plain twin (same layers, no shortcuts)
    stride_in_1x1: bool = True       # bottleneck stride on the first 1x1 (v1, paper) or the 3x3 (v1.5)
    preact: bool = False             # BN-ReLU-conv blocks (He et al. 2016b)
    relu_after_add: bool = True      # False: no ReLU after the addition (Gross & Wilber 2016)
    bn_after_add: bool = False       # True: BN on the sum, before the final ReLU (Gross & Wilber 2016)
    block_layers: int = 2            # 3x3 layers per basic block: 1, 2 (the paper) or 3
    zero_init_last: bool = False     # zero each branch's last BN gamma (Goyal et al. 2017)
    width: float = 1.0               # multiplier on every stage's width (wide ResNets)
    zero_pad: str = "end"            # option A: zero channels after the identity ("end") or split ("both")
    num_classes: int = 10
    in_channels: int = 3
    name: str = ""

    def __post_init__(self):
        if self.family not in STEMS:
            raise ValueError(f"unknown family {self.family!r}; valid choices: {', '.join(STEMS)}")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; valid choices: {', '.join(BLOCKS)}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {self.shortcut!r}; valid choices: {', '.join(SHORTCUTS)}")
        if len(self.layers) != len(STEMS[self.family]["widths"]):
            raise ValueError(f"{self.family} nets have {len(STEMS[self.family]['widths'])} stages, "
                             f"got layers={self.layers}")
        if self.zero_pad not in ("end", "both"):
            raise ValueError(f"unknown zero_pad {self.zero_pad!r}; valid choices: end, both")
        # types first: residual="False" (a string) is truthy and built a residual net that its config called
        # 'False'; block_layers=True counted as 1; a negative stage length built a net its depth misdescribed
        for f in ("residual", "stride_in_1x1", "preact", "relu_after_add", "bn_after_add", "zero_init_last"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be True or False, got {getattr(self, f)!r}")
        counts = (self.block_layers, self.num_classes, self.in_channels, *self.layers)
        if any(isinstance(n, bool) or not isinstance(n, int) for n in counts) or min(self.layers) < 1:
            raise ValueError(f"block_layers, num_classes, in_channels and layers must be whole numbers (layers at "
                             f"least 1 per stage), got block_layers={self.block_layers!r}, layers={self.layers!r}")
        if self.width <= 0 or self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be positive")
        check_options(self.block, self.shortcut, self.residual, self.preact, self.block_layers, self.bn_after_add)

    @property
    def depth(self) -> int:
        """The paper's depth: weighted layers on the main path (stem conv + every branch conv + fc)."""
        per_block = 3 if self.block == "bottleneck" else self.block_layers
        return per_block * sum(self.layers) + 2

    @property
    def stride_variant(self) -> str:
        return ("v1" if self.stride_in_1x1 else "v1.5") if self.block == "bottleneck" else "-"

    def metadata(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d.update(depth=self.depth, stride_variant=self.stride_variant)
        return d


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        stem = STEMS[cfg.family]
        block = BLOCKS[cfg.block]
        c = stem["stem_width"]
        # children registered in forward order (conv1, bn1, relu, maxpool, stages), so that tools which walk
        # named_children (torchvision's IntermediateLayerGetter, say) run the stem as forward() does
        cifar = cfg.family == "cifar"
        self.conv1 = (nn.Conv2d(cfg.in_channels, c, 3, padding=1, bias=False) if cifar
                      else nn.Conv2d(cfg.in_channels, c, 7, stride=2, padding=3, bias=False))
        # A pre-activation net normalises inside its blocks; its stem is a bare conv.
        self.bn1 = nn.Identity() if cfg.preact and cifar else nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, stride=2, padding=1)

        cin = c
        self.stage_names = []
        for i, (w, n) in enumerate(zip(stem["widths"], cfg.layers)):
            planes = max(1, round(w * cfg.width))
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, shortcut=cfg.shortcut, residual=cfg.residual,
                                    relu_after_add=cfg.relu_after_add, preact=cfg.preact,
                                    stride_in_1x1=cfg.stride_in_1x1, zero_pad=cfg.zero_pad,
                                    block_layers=cfg.block_layers, bn_after_add=cfg.bn_after_add))
                cin = planes * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.final_bn = nn.BatchNorm2d(cin) if cfg.preact else None  # pre-act nets end with BN-ReLU
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)
        self.num_features = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, GatedShortcut):  # the loop above He-initialised the gate conv too
                m.reset_gate()
        if self.cfg.zero_init_last and self.cfg.residual:
            for m in self.modules():
                if isinstance(m, Block):
                    m.zero_init_last()

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input (N, C, H, W) -> the last stage's feature map (N, num_features, H/s, W/s)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        if self.final_bn is not None:
            x = self.relu(self.final_bn(x))
        return x

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(feats), 1)
        return x if pre_logits else self.fc(x)

    def score_map(self, feats: torch.Tensor) -> torch.Tensor:
        """The fully-convolutional head: the fc applied as a 1x1 conv at every position of a feature map of
        any size, (N, F, h, w) -> (N, classes, h, w). Its spatial mean equals forward_head (the head is
        linear), which is how the paper scores whole images at several scales."""
        w = self.fc.weight[:, :, None, None]
        return nn.functional.conv2d(feats, w, self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"name={c.name!r}, family={c.family}, depth={c.depth}, block={c.block}, shortcut={c.shortcut}, "
                f"stride_variant={c.stride_variant}, residual={c.residual}, preact={c.preact}, width={c.width}, "
                f"block_layers={c.block_layers}, relu_after_add={c.relu_after_add}, bn_after_add={c.bn_after_add}")

    @property
    def metadata(self) -> dict:
        return self.cfg.metadata()
