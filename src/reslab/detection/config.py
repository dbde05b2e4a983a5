"""Detection settings as data: the detector's build (DetectorConfig) and the training recipe (DetectRecipe).

Both are frozen dataclasses; a checkpoint stores them as dicts and a run is rebuilt from them in one way.
Field metadata carries each user-facing field's --help text: `reslab detect train` derives its flags from
these fields. This module imports no torchvision, so building the command line stays fast.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import ReslabError
from ..interop import IMAGENET

HEADS = ("c4", "fpn")
# anchors (pixels at the network's input): Faster R-CNN's COCO setting (4 scales, adding 64^2) for c4;
# one size per pyramid level (P2..P6) for fpn, as torchvision's FPN detectors use
DEFAULT_ANCHORS = {"c4": (64, 128, 256, 512), "fpn": (32, 64, 128, 256, 512)}


def _h(text: str) -> dict:
    return {"help": text}  # a field's --help text: the CLI derives its flags from these dataclasses


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that builds a detector; a checkpoint stores it, and load_detector rebuilds from it."""
    backbone: dict                          # ResNetConfig metadata of the trunk
    head: str = "c4"                        # "c4" (paper) | "fpn"
    num_classes: int = 81                   # K foreground classes + background (torchvision's convention)
    min_size: int = field(default=600, metadata=_h("shorter image side in px (paper: 600)"))
    max_size: int = field(default=1000, metadata=_h("cap on the longer image side in px"))
    frozen_bn: bool = field(default=True, metadata=_h(
        "BatchNorm frozen to its statistics and affine values (paper; default on)"))
    frozen_stages: int = field(default=2, metadata=_h(
        "leading stages not trained: 1 conv1, 2 conv1 + conv2_x (paper), ... 5 all; 0 none"))
    anchor_sizes: tuple[int, ...] = field(default=(), metadata=_h(
        "anchor sides in px (default c4: 64 128 256 512; fpn: 32 64 128 256 512, one per level)"))
    aspect_ratios: tuple[float, ...] = field(default=(0.5, 1.0, 2.0), metadata=_h("anchor aspect ratios"))
    rois_per_image: int = field(default=512, metadata=_h("sampled RoIs per image for the detector's loss"))
    proposals_train: int = field(default=2000, metadata=_h("RPN proposals kept per image in training"))
    proposals_test: int = field(default=1000, metadata=_h("RPN proposals kept per image at test time"))
    fpn_channels: int = field(default=256, metadata=_h("channels of every pyramid level (fpn)"))
    image_mean: tuple[float, ...] = IMAGENET[0]   # [0, 1] units, per channel
    image_std: tuple[float, ...] = IMAGENET[1]

    def __post_init__(self):
        if self.head not in HEADS:
            raise ReslabError(f"unknown detection head {self.head!r}; valid choices: {', '.join(HEADS)}")
        if self.num_classes < 2:
            raise ReslabError(f"num_classes counts the background too, so it must be at least 2, got {self.num_classes}")
        if not 0 <= self.frozen_stages <= 5:
            raise ReslabError(f"frozen_stages must be 0..5 (conv1, conv2_x .. conv5_x), got {self.frozen_stages}")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ReslabError(f"need 32 <= min_size <= max_size, got min_size={self.min_size} max_size={self.max_size}")
        counts = (self.rois_per_image, self.proposals_train, self.proposals_test, self.fpn_channels)
        if min(counts) < 1 or min(self.anchors(), default=0) <= 0 or min(self.aspect_ratios, default=0) <= 0:
            raise ReslabError("rois_per_image, proposals, fpn_channels, anchor sizes and aspect ratios must be "
                              "positive (and there must be at least one anchor size and ratio)")
        n = len(self.anchors())
        if self.head == "fpn" and n != 5:
            raise ReslabError(f"the fpn head has 5 levels (P2..P6): give 5 anchor sizes, one per level, got {n}")

    def anchors(self) -> tuple[int, ...]:
        return tuple(self.anchor_sizes) or DEFAULT_ANCHORS[self.head]

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "backbone" else v
                      for k, v in d.items() if k in names})


@dataclass(frozen=True)
class DetectRecipe:
    """The paper's COCO schedule (appendix A): 240k iterations at lr 0.001 then 80k at 0.0001, 8 images a
    step (one per GPU). Caffe summed the 8 GPUs' gradients; DistributedDataParallel averages them, so the
    same update needs lr 8 x 0.001 = 0.008 here. `lr_steps` are fractions of `iters`, so --iters scales
    the schedule: 0.75 of 320k is the paper's 240k."""
    iters: int = field(default=320_000, metadata=_h("optimisation steps in all"))
    batch_size: int = field(default=8, metadata=_h("images per step, all processes together"))
    lr: float = field(default=0.008, metadata=_h("learning rate (paper: 0.001 x 8 summed GPUs)"))
    lr_steps: tuple[float, ...] = field(default=(0.75,), metadata=_h("fractions of --iters where lr x 0.1"))
    warmup_iters: int = field(default=0, metadata=_h("linear warm-up steps (not in the paper)"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_h("SGD weight decay"))
    log_every: int = field(default=20, metadata=_h("steps between train lines in metrics.jsonl"))
    save_every: int = field(default=2_000, metadata=_h("steps between checkpoints (RUN/last.pt)"))
    eval_every: int = field(default=0, metadata=_h("steps between COCO evaluations (0: at the end only)"))

    def __post_init__(self):
        for k in ("iters", "batch_size", "log_every", "save_every"):
            if getattr(self, k) < 1:
                raise ReslabError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        if self.lr <= 0 or not all(0 < f < 1 for f in self.lr_steps):
            raise ReslabError(f"need lr > 0 and lr steps strictly between 0 and 1, got lr={self.lr} "
                              f"lr_steps={self.lr_steps}")

    def with_overrides(self, **kw) -> "DetectRecipe":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if v is not None}
        return replace(self, **kw)


def lr_at(step: int, r: DetectRecipe) -> float:
    """Step schedule (x0.1 at each of lr_steps x iters) with an optional linear warm-up; step is 0-based."""
    lr = r.lr * 0.1 ** sum(step >= round(f * r.iters) for f in r.lr_steps)
    if step < r.warmup_iters:
        lr *= (step + 1) / r.warmup_iters
    return lr
