"""Faster R-CNN on a reslab ResNet: the paper's C4 design and torchvision's FPN (paper §4.3, appendix A).

  c4   conv1 .. conv4_x are the shared trunk (stride 16) that the RPN and the detector both read;
       each region is RoI-aligned to 14x14 on conv4_x's map, then conv5_x (its first block keeps its
       stride 2: 14 -> 7) and global average pooling give one vector per region -> FastRCNNPredictor.
  fpn  conv2_x .. conv5_x feed torchvision's feature pyramid (P2..P6) -> multi-scale RoIAlign 7x7 ->
       torchvision's two-layer MLP head -> FastRCNNPredictor. Not in the paper; the modern option.

The RPN, RoI heads, losses, box coders and the resize/normalise transform are torchvision's own.
Backbone defaults are the paper's: v1 bottlenecks (stride on the first 1x1), option-B projections,
BatchNorm frozen to its statistics and affine values (FrozenBatchNorm2d: the detector's minibatches
are too small for batch statistics), and conv1 + conv2_x not trained.

The body is rebuilt in forward order (conv1 -> bn1 -> relu -> maxpool -> layer1 ...), not found by walking
the ResNet's children, so that it does not rest on their registration order (a test pins trunk == the
classifier's forward). Parameter names stay the ResNet's (`conv1.weight`, `layer3.0.bn1.weight`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from .. import checkpoint as ckpt
from ..errors import ReslabError
from ..interop import IMAGENET
from ..resnet import ResNet, ResNetConfig
from .config import DetectorConfig

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(bn, name))
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d holding the same statistics,
    affine values and eps (in place; returns `module`)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen_copy(child))
        else:
            freeze_batchnorm(child)
    return module


def body_in_forward_order(net: ResNet, last_stage: str) -> nn.Sequential:
    """conv1 -> bn1 -> relu -> maxpool -> layer1 .. `last_stage`, named as in the ResNet."""
    parts = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
    for name in STAGES[:STAGES.index(last_stage) + 1]:
        parts.append((name, getattr(net, name)))
    return nn.Sequential(OrderedDict(parts))


def freeze_stages(body: nn.Sequential, n: int) -> None:
    """Freeze the first n stages (1: conv1 + bn1; k >= 2: layer{k-1}) of a body. A frozen stage is frozen
    entirely: no gradients, and its BatchNorm frozen too (else its running statistics would still move)."""
    groups = [("conv1", "bn1"), *((s,) for s in STAGES)]
    for names in groups[:n]:
        for name in (nm for nm in names if hasattr(body, nm)):
            m = getattr(body, name)
            if isinstance(m, nn.BatchNorm2d):
                setattr(body, name, _frozen_copy(m))
            else:
                freeze_batchnorm(m)
            getattr(body, name).requires_grad_(False)


class C5Head(nn.Module):
    """The per-region head of the C4 design: conv5_x on each 14x14 RoI, then global average pooling.
    (R, C4, 14, 14) -> (R, C5)."""

    def __init__(self, layer4: nn.Sequential, out_channels: int):
        super().__init__()
        self.layer4 = layer4
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


def stage_channels(net: ResNet) -> list[int]:
    """Output channels of conv2_x .. conv5_x (the last conv of each stage's last block)."""
    return [getattr(stage[-1], "conv3", stage[-1].conv2).out_channels for stage in net.stages()]


def check_backbone(cfg: ResNetConfig) -> None:
    if cfg.family != "imagenet":
        raise ReslabError(f"{cfg.name or 'this model'} is a CIFAR-family net (3 stages, 32x32 inputs); detection "
                          "needs an ImageNet-family backbone: resnet18, resnet34, resnet50, resnet101 or resnet152")
    if cfg.preact:
        raise ReslabError("detection backbones are post-activation ResNets (the paper's); preact=True is not "
                          "supported here")


def build_detector(cfg: DetectorConfig, net: ResNet) -> FasterRCNN:
    """A Faster R-CNN around `net` (whose weights it shares), set up as `cfg` says; `.config` is `cfg`."""
    check_backbone(net.cfg)
    channels = stage_channels(net)
    if cfg.frozen_bn:
        freeze_batchnorm(net)
    anchors = cfg.anchors()
    ratios = tuple(cfg.aspect_ratios)
    if cfg.head == "c4":
        body = body_in_forward_order(net, "layer3")
        freeze_stages(body, cfg.frozen_stages)
        body.out_channels = channels[2]
        head = C5Head(net.layer4, channels[3])
        if cfg.frozen_stages == 5:  # conv5_x lives in the region head here
            freeze_stages(nn.Sequential(OrderedDict(layer4=head.layer4)), 5)
        backbone, anchor_gen = body, AnchorGenerator((anchors,), (ratios,))
        roi_pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)
        extra = dict(box_head=head, box_predictor=FastRCNNPredictor(head.out_channels, cfg.num_classes))
    else:
        body = body_in_forward_order(net, "layer4")
        freeze_stages(body, cfg.frozen_stages)
        backbone = BackboneWithFPN(body, {s: str(i) for i, s in enumerate(STAGES)}, channels,
                                   cfg.fpn_channels)
        anchor_gen = AnchorGenerator(tuple((a,) for a in anchors), (ratios,) * len(anchors))
        roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        extra = dict(num_classes=cfg.num_classes)
    # pre-NMS candidate counts are torchvision's defaults, raised if more proposals are asked for
    model = FasterRCNN(backbone, min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(cfg.image_mean),
                       image_std=list(cfg.image_std), rpn_anchor_generator=anchor_gen, box_roi_pool=roi_pool,
                       box_batch_size_per_image=cfg.rois_per_image,
                       rpn_pre_nms_top_n_train=max(2000, cfg.proposals_train),
                       rpn_post_nms_top_n_train=cfg.proposals_train,
                       rpn_pre_nms_top_n_test=max(1000, cfg.proposals_test),
                       rpn_post_nms_top_n_test=cfg.proposals_test, **extra)
    model.config = cfg
    return model


def trunk_features(detector: FasterRCNN, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last map for normalised input x: conv4_x (c4) or conv5_x (fpn's body)."""
    bb = detector.backbone
    return bb(x) if isinstance(bb, nn.Sequential) else bb.body(x)[str(len(STAGES) - 1)]


# ------------------------------------------------------------------ building from names and files
def _detector_fields() -> set[str]:
    return {f.name for f in fields(DetectorConfig)} - {"backbone", "image_mean", "image_std"}


def create_detector(arch: str, head: str = "c4", num_classes: int = 81, weights=None, min_size: int = 600,
                    max_size: int = 1000, **overrides) -> FasterRCNN:
    """A Faster R-CNN with a reslab backbone. `overrides` are DetectorConfig fields (frozen_bn,
    frozen_stages, anchor_sizes, rois_per_image, ...) or ResNetConfig fields of the backbone (width,
    stride_in_1x1, shortcut, ...). `weights`: a reslab classification checkpoint or converted file
    (anything reslab.load reads); its normalisation becomes the detector's. The model's `.config` is
    its DetectorConfig."""
    det = {k: overrides.pop(k) for k in list(overrides) if k in _detector_fields()}
    net, mean, std = backbone_from(arch, weights, overrides)
    cfg = DetectorConfig(backbone=net.metadata, head=head, num_classes=num_classes, min_size=min_size,
                         max_size=max_size, image_mean=mean, image_std=std, **det)
    return build_detector(cfg, net)


def backbone_from(arch: str, weights, overrides: dict) -> tuple[ResNet, tuple, tuple]:
    """(ResNet, image mean, image std): random init with ImageNet statistics, or the file's weights and
    normalisation. Options not given are the file's; options given must agree with it."""
    from ..zoo import resolve_config
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = resolve_config(arch, **given)
    except ValueError as e:
        raise ReslabError(str(e)) from None
    check_backbone(cfg)
    if weights is None:
        return ResNet(cfg), IMAGENET[0], IMAGENET[1]
    net = _load_classifier(weights)
    have = net.cfg
    same = ("family", "block", "layers", "residual", *given)
    wrong = [k for k in same if getattr(have, k) != getattr(cfg, k)]
    if wrong:
        detail = ", ".join(f"{k}={getattr(have, k)!r} (wanted {getattr(cfg, k)!r})" for k in wrong)
        raise ReslabError(f"{weights} holds a {have.name or 'ResNet'} with {detail}; pick the matching --arch "
                          "and model options, or other weights")
    check_backbone(have)
    norm = net.reslab["normalizer"]
    # a per-pixel mean image (the paper's classification input) becomes its per-channel mean: detection
    # inputs have any size
    mean = tuple(float(v) for v in norm.mean.reshape(3, -1).mean(1))
    std = tuple(float(v) for v in norm.std.reshape(3, -1).mean(1))
    return net.train(), mean, std


def _load_classifier(path) -> ResNet:
    from ..interop import load
    try:
        return load(path)
    except FileNotFoundError:
        raise ReslabError(f"--weights {path}: no such file (give a reslab checkpoint or a file made by "
                          "`reslab convert`)") from None
    except ReslabError:
        if _is_detector_checkpoint(path):
            raise ReslabError(f"{path} is a detector checkpoint, not classification weights; continue its run "
                              "with --resume, or evaluate it with `reslab detect eval`") from None
        raise


def _is_detector_checkpoint(path) -> bool:
    try:
        return "detector" in ckpt.load(path)
    except (ReslabError, FileNotFoundError):
        return False


def load_detector(path) -> FasterRCNN:
    """A detector from a `reslab detect train` checkpoint or run folder, in eval mode. `.config` is its
    DetectorConfig; `.reslab` holds {categories, step, checkpoint}."""
    try:
        ck = ckpt.load(path)
    except FileNotFoundError as e:
        raise ReslabError(str(e)) from None
    if "detector" not in ck:
        raise ReslabError(f"{ckpt.resolve(path)} is a classification checkpoint, not a detector; train one with "
                          "`reslab detect train`")
    cfg = DetectorConfig.from_dict(ck["detector"])
    from ..checkpoint import build_model
    model = build_detector(cfg, build_model(cfg.backbone))
    ckpt.load_model_state(model, ck["model"], str(ckpt.resolve(path)))
    model.reslab = {"categories": ck["categories"], "step": ck["step"], "checkpoint": str(ckpt.resolve(path))}
    return model.eval()
