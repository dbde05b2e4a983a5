"""The model zoo: a depth is a row in a table, a name is a registry entry.

    create_model("resnet56")                         # CIFAR, option A (the paper's CIFAR nets)
    create_model("resnet50", stride_in_1x1=False)    # ImageNet bottleneck, torchvision's v1.5
    create_model("plain34", num_classes=100)
    create_model("resnet26")                         # any CIFAR depth 6n+2 (n >= 1)
    create_model("resnet110", bn_after_add=True)     # block variants: bn_after_add, block_layers, shortcut="gated"

Depths 50 and 152 are both ImageNet depths and 6n+2, so `resnet50`/`resnet152` are the ImageNet nets;
the CIFAR nets of those depths are `cifar_resnet50` / `cifar_resnet152` (any 6n+2 depth takes the prefix).

A name fixes the paper's block (block_layers=2): `create_model("resnet20", block_layers=3)` keeps the name
"resnet20" and the same 3x3x3 blocks, and its config's `depth` says 29 (the layers it really has).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

from .resnet import ResNet, ResNetConfig

# paper Table 1: blocks per stage
IMAGENET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
MAX_CIFAR_DEPTH = 20_000  # 6n+2 beyond this is refused: billions of blocks would exhaust memory, not fail
# paper §4.2: depth 6n+2 -> n blocks per stage
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_PLAIN_DEPTHS = (18, 34, 50, 101, 152)

_REGISTRY: dict[str, Callable[..., ResNetConfig]] = {}


def register_model(name: str):
    """Decorator: register a builder of a ResNetConfig (no arguments) under `name`, for this process (a run of
    it resumed in another process needs it registered there too). A duplicate name, or a builder that does not
    return a ResNetConfig, is an error here: once registered, a bad one broke list_models() for the process."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        got = fn()
        if not isinstance(got, ResNetConfig):
            raise ValueError(f"register_model({name!r}): the builder must return a ResNetConfig (e.g. "
                             f"resolve_config('resnet14', shortcut='B')), got {type(got).__name__}")
        _REGISTRY[name] = fn
        return fn
    return deco


def cifar_config(depth: int, residual: bool = True, name: str = "") -> ResNetConfig:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, 44, 56, 110, ...), got {depth}")
    if depth > MAX_CIFAR_DEPTH:
        raise ValueError(f"CIFAR depth {depth} is beyond {MAX_CIFAR_DEPTH:,} layers (the paper's deepest is 1202)")
    n = (depth - 2) // 6
    return ResNetConfig(family="cifar", block="basic", layers=(n, n, n), shortcut="A", residual=residual,
                        num_classes=10, name=name)


def imagenet_config(depth: int, residual: bool = True, name: str = "") -> ResNetConfig:
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"ImageNet depth must be one of {', '.join(map(str, IMAGENET_LAYERS))}, got {depth}")
    block, layers = IMAGENET_LAYERS[depth]
    return ResNetConfig(family="imagenet", block=block, layers=layers, shortcut="B", residual=residual,
                        num_classes=1000, name=name)


def _register_tables() -> None:
    for d in CIFAR_DEPTHS:
        register_model(f"resnet{d}")(lambda d=d, name=f"resnet{d}": cifar_config(d, True, name))
    for d in CIFAR_PLAIN_DEPTHS:
        register_model(f"plain{d}")(lambda d=d, name=f"plain{d}": cifar_config(d, False, name))
    for d in IMAGENET_LAYERS:
        register_model(f"resnet{d}")(lambda d=d, name=f"resnet{d}": imagenet_config(d, True, name))
    for d in IMAGENET_PLAIN_DEPTHS:
        register_model(f"plain{d}")(lambda d=d, name=f"plain{d}": imagenet_config(d, False, name))


_register_tables()

_DYNAMIC = re.compile(r"^(cifar_)?(resnet|plain)(\d+)$")


def list_models() -> list[str]:
    """Registered names, CIFAR family first, each in depth order."""
    def key(n):
        cfg = _REGISTRY[n]()
        return (cfg.family != "cifar", cfg.residual is False, cfg.depth)
    return sorted(_REGISTRY, key=key)


def resolve_config(name: str, **overrides) -> ResNetConfig:
    """Name + overrides -> config. Overrides that are None are ignored (CLI defaults never win)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name in _REGISTRY:
        cfg = _REGISTRY[name]()
    else:
        m = _DYNAMIC.match(name)
        if not m or (m.group(1) is None and int(m.group(3)) in IMAGENET_LAYERS):
            raise ValueError(_unknown(name))
        depth, residual = int(m.group(3)), m.group(2) == "resnet"
        try:
            cfg = cifar_config(depth, residual, name)
        except ValueError:
            if depth > MAX_CIFAR_DEPTH and (depth - 2) % 6 == 0:
                raise  # its own message: a valid depth, too deep to build
            raise ValueError(_unknown(name)) from None
    valid = set(ResNetConfig.__dataclass_fields__) - {"family", "name"}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown model option(s) {', '.join(bad)}; valid choices: {', '.join(sorted(valid))}")
    if "layers" in overrides:
        overrides["layers"] = tuple(overrides["layers"])
    return replace(cfg, **overrides)


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}; valid choices: {', '.join(list_models())}, "
            f"or resnetD/plainD for any CIFAR depth D = 6n+2 (cifar_resnetD where D is also an ImageNet depth)")


def create_model(name: str, **overrides) -> ResNet:
    """Build a zoo model. Overrides are ResNetConfig fields: shortcut='A'|'B'|'C'|'gated', stride_in_1x1=True|False
    (False = v1.5), residual, preact, relu_after_add, bn_after_add, block_layers=1|2|3, zero_init_last, width,
    num_classes, in_channels."""
    return ResNet(resolve_config(name, **overrides))
