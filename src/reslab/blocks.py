"""Residual blocks and the shortcut factory (paper §3.3, §4.1, §4.2).

Parameter names follow torchvision (conv1/bn1/conv2/bn2[/conv3/bn3], `downsample`) so that state dicts
move between reslab and torchvision without renaming. A basic block with `block_layers=K` names its
layers conv1..convK / bn1..bnK (K=2, the paper's block, is exactly torchvision's layout).

Shortcut options (paper §3.3):
  A      parameter-free: identity, or a stride-s subsample with zero-padded extra channels where dims grow
  B      a projection (1x1 conv with the stride + BN) where dims grow, identity elsewhere
  C      a projection on every block
  gated  not the paper's: a highway-style gate around option A (Srivastava et al. 2015; docs/paper.md),
         y = T(x)·F(x) + (1 − T(x))·s(x); see `GatedShortcut`
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAPER_SHORTCUTS = ("A", "B", "C")
# every valid `shortcut` value (the CLI takes its choices from here); nothing iterates this expecting only
# the paper's options: use PAPER_SHORTCUTS for those
SHORTCUTS = (*PAPER_SHORTCUTS, "gated")
# basic-block depths the `block_layers` switch offers (2 is the paper's block; docs/paper.md)
BLOCK_LAYERS = (1, 2, 3)
# gated shortcut: the gate's bias at init. Highway nets start "carry-biased" (−1 to −3); with the gate's
# weight at zero, T(x) = σ(−2) ≈ 0.12 everywhere at init, so a block starts as ~0.88·s(x) + 0.12·F(x).
GATE_BIAS_INIT = -2.0


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
            raise ValueError(f"option A cannot shrink channels ({cin} -> {cout}; a width below 1 makes the first stage "
                             "narrower than the stem); use shortcut='B' or 'C', or a width of 1 or more")
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


class GatedShortcut(nn.Module):
    """Highway-style shortcut: y = T(x)·F(x) + (1 − T(x))·s(x), elementwise, where
    s(x) is option A (identity, or subsample + zero-pad where dims grow; parameter-free) and
    T(x) = σ(conv1x1(x) + b), a 1x1 conv with the block's stride from the block input to cout channels.

    Unlike the other shortcuts it also takes the branch output F(x): it merges instead of being added.
    The gate starts with weight 0 and bias GATE_BIAS_INIT, so every block starts near its shortcut.
    """

    def __init__(self, cin: int, cout: int, stride: int, zero_pad: str = "end"):
        super().__init__()
        self.gate = nn.Conv2d(cin, cout, 1, stride=stride, bias=True)
        grows = stride != 1 or cin != cout
        self.carry = ShortcutA(cin, cout, stride, zero_pad) if grows else nn.Identity()
        self.reset_gate()

    def reset_gate(self) -> None:
        """Weight 0, bias GATE_BIAS_INIT. ResNet's He init touches every conv, so it calls this again after."""
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, GATE_BIAS_INIT)

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.gate(x))
        s = self.carry(x)
        return s + t * (branch - s)  # = T·F + (1 − T)·s with one multiply


def make_shortcut(option: str, cin: int, cout: int, stride: int, preact: bool = False,
                  zero_pad: str = "end") -> nn.Module | None:
    """The one shortcut factory. Returns None for a plain identity (nothing to apply)."""
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; valid choices: {', '.join(SHORTCUTS)}")
    grows = stride != 1 or cin != cout
    if option == "A":
        return ShortcutA(cin, cout, stride, zero_pad) if grows else None
    if option == "gated":
        return GatedShortcut(cin, cout, stride, zero_pad)
    if option == "B" and not grows:
        return None
    if preact:  # pre-activation nets project the already-normalised input: no BN on the shortcut
        return nn.Sequential(conv1x1(cin, cout, stride))
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def check_options(block: str, shortcut: str, residual: bool, preact: bool, block_layers: int,
                  bn_after_add: bool) -> None:
    """Switches that cannot go together: a one-line ValueError naming the conflict and what to do.
    ResNetConfig calls this before building anything; every block calls it too."""
    if block_layers not in BLOCK_LAYERS:
        raise ValueError(f"block_layers must be one of {', '.join(map(str, BLOCK_LAYERS))} "
                         f"(3x3 layers per basic block), got {block_layers!r}")
    if block == "bottleneck" and block_layers != 2:
        raise ValueError(f"block_layers={block_layers} conflicts with block='bottleneck' (always 1x1, 3x3, 1x1); "
                         "use a basic-block net (resnet20..., resnet18/34) or leave block_layers=2")
    if bn_after_add and preact:
        raise ValueError("bn_after_add=True conflicts with preact=True (a pre-activation block has no BN-ReLU "
                         "after the addition); use one or the other")
    if bn_after_add and not residual:
        raise ValueError("bn_after_add=True conflicts with residual=False (a plain block has no addition); "
                         "use residual=True or drop bn_after_add")
    if shortcut == "gated" and not residual:
        raise ValueError("shortcut='gated' conflicts with residual=False (a plain block has no shortcut to "
                         "gate); use residual=True or another shortcut")
    if shortcut == "gated" and preact:
        raise ValueError("shortcut='gated' conflicts with preact=True (the gate is defined for post-activation "
                         "blocks); use preact=False or another shortcut")


class Block(nn.Module):
    """What every block shares: the shortcut, the residual switch, the optional BN on the sum and the
    post-addition ReLU."""

    expansion = 1
    kind = ""  # the name in BLOCKS

    def _init_common(self, cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad,
                     block_layers, bn_after_add):
        check_options(self.kind, shortcut, residual, preact, block_layers, bn_after_add)
        self.residual = residual
        self.relu_after_add = relu_after_add
        self.preact = preact
        # A plain block has no shortcut at all (so a plain net has no projection parameters).
        self.downsample = make_shortcut(shortcut, cin, cout, stride, preact, zero_pad) if residual else None
        # Gross & Wilber: BN on the sum, before the final ReLU
        self.bn_add = nn.BatchNorm2d(cout) if bn_after_add else None
        self.relu = nn.ReLU(inplace=True)

    def _merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            if isinstance(self.downsample, GatedShortcut):
                out = self.downsample(x, out)
            else:
                out = out + (x if self.downsample is None else self.downsample(x))
        if self.bn_add is not None:
            out = self.bn_add(out)
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
    """[3x3, c] x block_layers (2 = the paper's [3x3, c; 3x3, c]). Post-activation (conv-BN, ReLU between
    layers, none before the addition) by default; BN-ReLU-conv with `preact`. Layer k is conv{k}/bn{k};
    only the first conv strides."""

    expansion = 1
    kind = "basic"

    def __init__(self, cin, planes, stride=1, shortcut="A", residual=True, relu_after_add=True,
                 preact=False, stride_in_1x1=True, zero_pad="end", block_layers=2, bn_after_add=False):
        super().__init__()
        cout = planes * self.expansion
        self.block_layers = block_layers
        for k in range(1, block_layers + 1):
            ci = cin if k == 1 else cout  # expansion 1: every layer outputs cout = planes
            conv = conv3x3(ci, cout, stride if k == 1 else 1)
            # registration order (BN first when pre-activated) keeps the state-dict order, and the
            # seeded init, of the 2-layer block exactly as before
            if preact:
                self.add_module(f"bn{k}", nn.BatchNorm2d(ci))
                self.add_module(f"conv{k}", conv)
            else:
                self.add_module(f"conv{k}", conv)
                self.add_module(f"bn{k}", nn.BatchNorm2d(cout))
        self._init_common(cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad,
                          block_layers, bn_after_add)

    def layer(self, k: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The k-th (1-based) conv and its BN."""
        return getattr(self, f"conv{k}"), getattr(self, f"bn{k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            a = self.relu(self.bn1(x))
            # the projection shortcut sees the pre-activated input (Identity Mappings, §3)
            src = a if self.downsample is not None else x
            out = self.conv1(a)
            for k in range(2, self.block_layers + 1):
                conv, bn = self.layer(k)
                out = conv(self.relu(bn(out)))
            return self._merge(out, src)
        out = x
        for k in range(1, self.block_layers + 1):
            conv, bn = self.layer(k)
            out = bn(conv(out))
            if k < self.block_layers:  # the last layer's ReLU comes after the addition
                out = self.relu(out)
        return self._merge(out, x)

    def branch_end(self) -> nn.Module:
        conv, bn = self.layer(self.block_layers)
        return conv if self.preact else bn


class Bottleneck(Block):
    """[1x1, c; 3x3, c; 1x1, 4c]. `stride_in_1x1=True` is the paper's v1 (stride on the first 1x1);
    False is torchvision's v1.5 (stride on the 3x3)."""

    expansion = 4
    kind = "bottleneck"

    def __init__(self, cin, planes, stride=1, shortcut="B", residual=True, relu_after_add=True,
                 preact=False, stride_in_1x1=True, zero_pad="end", block_layers=2, bn_after_add=False):
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
        self._init_common(cin, cout, stride, shortcut, residual, relu_after_add, preact, zero_pad,
                          block_layers, bn_after_add)

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
