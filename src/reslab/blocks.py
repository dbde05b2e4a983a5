"""Residual blocks and the shortcut factory (paper §3.3, §4.1, §4.2).

Parameter names follow torchvision (conv1/bn1/conv2/bn2[/conv3/bn3], `downsample`) so that state dicts
move between reslab and torchvision without renaming.

Shortcut options (paper §3.3):
  A  parameter-free: identity, or a stride-s subsample with zero-padded extra channels where dims grow
  B  a projection (1x1 conv with the stride + BN) where dims grow, identity elsewhere
  C  a projection on every block
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A: identity on a stride-`stride` subsample, the extra channels zero-padded.

    A named module (not a lambda) so that models pickle, script and export. `pad` says where the zero
    channels go: "end" (after the identity channels, as the paper's Torch code does) or "both" (split
    before and after, as the popular PyTorch CIFAR reproduction does; needed to load its weights exactly).
    """

    def __init__(self, cin: int, cout: int, stride: int, pad: str = "end"):
        super().__init__()
        if cout < cin:
            raise ValueError(f"option A cannot shrink channels ({cin} -> {cout}); use shortcut='B' or 'C'")
        if pad not in ("end", "both"):
            raise ValueError(f"ShortcutA pad must be 'end' or 'both', got {pad!r}")
        self.cin, self.cout, self.stride, self.pad = cin, cout, stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            # exactly x[:, :, ::s, ::s], but the backward of a 1x1 average pool keeps channels_last, where the
            # slice's backward returns NCHW gradients that make later CPU kernels mix layouts (~10x slower)
            x = F.avg_pool2d(x, 1, self.stride)
        extra = self.cout - self.cin
        if extra == 0:
            return x
        before = extra // 2 if self.pad == "both" else 0
        # F.pad's last pair pads dim 1 (channels) of an NCHW tensor
        return F.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.cin}->{self.cout}, stride={self.stride}, zero-pad={self.pad}"


def make_shortcut(option: str, cin: int, cout: int, stride: int, preact: bool = False,
                  zero_pad: str = "end") -> nn.Module | None:
    """The one shortcut factory. Returns None for a plain identity (nothing to apply)."""
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; valid choices: {', '.join(SHORTCUTS)}")
    grows = stride != 1 or cin != cout
    if option == "A":
        return ShortcutA(cin, cout, stride, zero_pad) if grows else None
    if option == "B" and not grows:
        return None
    if preact:  # pre-activation nets project the already-normalised input: no BN on the shortcut
        return nn.Sequential(conv1x1(cin, cout, stride))
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """What every block shares: the shortcut, the residual switch and the post-addition ReLU."""

    expansion = 1

    def _init_common(self, cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad):
        self.residual = residual
        self.relu_after_add = relu_after_add
        self.preact = preact
        # A plain block has no shortcut at all (so a plain net has no projection parameters).
        self.downsample = make_shortcut(shortcut, cin, cout, stride, preact, zero_pad) if residual else None
        self.relu = nn.ReLU(inplace=True)

    def _merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        if self.preact or (self.residual and not self.relu_after_add):
            return out
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Zero the branch's last scale so the block starts as its shortcut (Goyal et al. 2017): the last
        BN's gamma, or, in a pre-activation block (no BN at the branch end), the last conv's weight."""
        last = self.branch_end()
        nn.init.zeros_(last.weight)

    def branch_end(self) -> nn.Module:
        raise NotImplementedError


class BasicBlock(Block):
    """[3x3, c; 3x3, c]. Post-activation (conv-BN-ReLU) by default; BN-ReLU-conv with `preact`."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, shortcut="A", residual=True, relu_after_add=True,
                 preact=False, stride_in_1x1=True, zero_pad="end"):
        super().__init__()
        cout = planes * self.expansion
        if preact:
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = conv3x3(cin, planes, stride)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, cout)
        else:
            self.conv1 = conv3x3(cin, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, cout)
            self.bn2 = nn.BatchNorm2d(cout)
        self._init_common(cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            a = self.relu(self.bn1(x))
            # the projection shortcut sees the pre-activated input (Identity Mappings, §3)
            src = a if self.downsample is not None else x
            out = self.conv2(self.relu(self.bn2(self.conv1(a))))
            return self._merge(out, src)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._merge(out, x)

    def branch_end(self) -> nn.Module:
        return self.conv2 if self.preact else self.bn2


class Bottleneck(Block):
    """[1x1, c; 3x3, c; 1x1, 4c]. `stride_in_1x1=True` is the paper's v1 (stride on the first 1x1);
    False is torchvision's v1.5 (stride on the 3x3)."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, shortcut="B", residual=True, relu_after_add=True,
                 preact=False, stride_in_1x1=True, zero_pad="end"):
        super().__init__()
        cout = planes * self.expansion
        self.stride_in_1x1 = stride_in_1x1
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(cin, planes, s1)
        self.conv2 = conv3x3(planes, planes, s3)
        self.conv3 = conv1x1(planes, cout)
        if preact:
            self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(cin), nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        else:
            self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes), nn.BatchNorm2d(cout)
        self._init_common(cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            a = self.relu(self.bn1(x))
            src = a if self.downsample is not None else x
            out = self.conv1(a)
            out = self.conv2(self.relu(self.bn2(out)))
            out = self.conv3(self.relu(self.bn3(out)))
            return self._merge(out, src)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._merge(out, x)

    def extra_repr(self) -> str:
        return "stride_in_1x1=True (v1, paper)" if self.stride_in_1x1 else "stride_in_1x1=False (v1.5)"

    def branch_end(self) -> nn.Module:
        return self.conv3 if self.preact else self.bn3


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
