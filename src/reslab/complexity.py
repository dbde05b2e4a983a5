"""Parameters, multiply-adds and per-stage shapes of a model.

MACs are counted by torch.utils.flop_counter (convolutions and matrix products; BN, ReLU, pooling and
additions are not counted — the paper's convention). The counter reports FLOPs = 2 x MACs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_input_size(model: nn.Module) -> int:
    return 32 if getattr(getattr(model, "cfg", None), "family", "imagenet") == "cifar" else 224


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int | None = None, batch: int = 1) -> int:
    """Forward multiply-adds per image at input_size x input_size."""
    size = input_size or default_input_size(model)
    cin = getattr(getattr(model, "cfg", None), "in_channels", 3)
    x = torch.zeros(batch, cin, size, size)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch


@torch.no_grad()
def stage_shapes(model: nn.Module, input_size: int | None = None) -> dict[str, list[int]]:
    """Output shape (C, H, W) of the stem and each stage, for one image."""
    size = input_size or default_input_size(model)
    x = torch.zeros(1, model.cfg.in_channels, size, size)
    shapes = {}
    was_training = model.training
    model.eval()
    try:
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        shapes["stem"] = list(x.shape[1:])
        for name, stage in zip(model.stage_names, model.stages()):
            x = stage(x)
            shapes[name] = list(x.shape[1:])
    finally:
        model.train(was_training)
    return shapes


def count_layers(model: nn.Module) -> int:
    """Weighted layers (convolutions and fc) on the main path, the paper's "depth": shortcut convolutions
    (option B/C projections, the gates of gated shortcuts) are not counted. Equals ResNetConfig.depth."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and ".downsample" not in name:
            n += 1
    return n


def describe(model: nn.Module, input_size: int | None = None) -> dict:
    """Everything `reslab info` prints, as plain data."""
    size = input_size or default_input_size(model)
    meta = model.metadata
    return {
        **meta,
        "input_size": size,
        "layers_weighted": count_layers(model),
        "params": count_params(model),
        "macs": count_macs(model, size),
        "stage_shapes": stage_shapes(model, size),
    }
