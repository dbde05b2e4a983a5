"""ImageNet-style folders (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`) with the paper's pipelines.

Training (paper §3.4): shorter side resized to a random size in [256, 480], a random 224x224 crop, a random
horizontal flip, AlexNet's PCA colour lighting, then normalisation. `rrc=True` swaps the resize+crop for
torchvision's RandomResizedCrop(224) (the modern recipe).

Evaluation views (paper §3.4 and §4.1):
  center      resize shorter side to 256, centre 224 crop                   -> (C, 224, 224)
  10crop      resize 256, four corners + centre, and their flips             -> (10, C, 224, 224)
  multiscale  the whole image with its shorter side at 224/256/384/480/640   -> list of 5 tensors
              (scored by the fully-convolutional head; sizes differ, so batch size 1)

Corrupt images: with on_corrupt="stop" (the default) the first undecodable file stops the run with an error
that names it; with "skip" it is reported once on stderr by name, counted, and replaced by the next
decodable image of the split, so an epoch keeps its length.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from ..errors import ReslabError
from .normalize import Normalizer

MULTISCALE_SIZES = (224, 256, 384, 480, 640)
VIEWS = ("center", "10crop", "multiscale")
# AlexNet's PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), in [0, 1] units; std of alpha 0.1.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Lighting(torch.nn.Module):
    """AlexNet PCA lighting noise on a float image in [0, 1]: add eigvec @ (alpha * eigval), alpha ~ N(0, std)."""

    def __init__(self, alphastd: float = 0.1):
        super().__init__()
        self.alphastd = alphastd

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        return img + rgb.view(3, 1, 1).to(img)


class Normalize(torch.nn.Module):
    """A Normalizer as a transform on one float image in [0, 1] (any size: the pixel mean is resized)."""

    def __init__(self, norm: Normalizer):
        super().__init__()
        self.norm = norm

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.norm.mean_at(*img.shape[-2:])) / self.norm.std


def train_transform(norm: Normalizer, size: int = 224, scale=(256, 480), rrc: bool = False, lighting: float = 0.1):
    crop = [v2.RandomResizedCrop(size, antialias=True)] if rrc else [
        v2.RandomShortestSize(list(range(scale[0], scale[1] + 1)), antialias=True), v2.RandomCrop(size)]
    return v2.Compose([*crop, v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       Lighting(lighting), Normalize(norm)])


def eval_transform(norm: Normalizer, view: str = "center", size: int = 224, resize: int = 256):
    if view not in VIEWS:
        raise ReslabError(f"unknown view {view!r}; valid choices: {', '.join(VIEWS)}")
    tail = [v2.ToDtype(torch.float32, scale=True), Normalize(norm)]
    if view == "center":
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), *tail])
    if view == "10crop":
        return TenCropStack(v2.Resize(resize, antialias=True), size, v2.Compose(tail))
    return MultiScale([v2.Compose([v2.Resize(s, antialias=True), *tail]) for s in MULTISCALE_SIZES])


class TenCropStack(torch.nn.Module):
    """Resize, then the 4 corner + centre crops and their horizontal flips, stacked: (10, C, size, size)."""

    def __init__(self, resize, size: int, after):
        super().__init__()
        self.resize, self.size, self.after = resize, size, after

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        crops = v2.functional.ten_crop(self.resize(img), [self.size, self.size])
        return torch.stack([self.after(c) for c in crops])


class MultiScale(torch.nn.Module):
    """The whole image at each scale: a list of tensors of different sizes."""

    def __init__(self, per_scale):
        super().__init__()
        self.per_scale = per_scale

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.per_scale]


def decode(path: str) -> torch.Tensor:
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError for many decoder failures
        raise ReslabError(f"{path}: cannot decode image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class ImageFolderSplit(Dataset):
    """One split (`train` or `val`) of an ImageNet-style folder, decoded by torchvision."""

    def __init__(self, root, split: str, transform=None, on_corrupt: str = "stop"):
        if on_corrupt not in ("stop", "skip"):
            raise ValueError(f"on_corrupt must be 'stop' or 'skip', got {on_corrupt!r}")
        folder = Path(root) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: an ImageNet-style folder has train/<class>/ and val/<class>/")
        try:
            self.inner = datasets.ImageFolder(str(folder), loader=lambda p: p)  # we decode ourselves
        except FileNotFoundError as e:
            raise ReslabError(f"{folder}: {e}") from None
        self.classes = self.inner.classes
        self.samples = self.inner.samples
        self.targets = self.inner.targets
        self.transform, self.on_corrupt = transform, on_corrupt
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for j in range(len(self.samples)):
            path, target = self.samples[(i + j) % len(self.samples)]
            try:
                img = decode(path)
            except ReslabError as e:
                if self.on_corrupt == "stop":
                    raise
                if path not in self.skipped:
                    self.skipped.append(path)
                    print(f"reslab: skipping corrupt image: {e}", file=sys.stderr)
                continue
            return (self.transform(img) if self.transform else img), target
        raise ReslabError(f"no decodable image in {len(self.samples)} files")


class ShardSampler(Sampler[int]):
    """Contiguous, exact shard of range(n) for rank r of w: no padding, no duplicates (evaluation)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size

    def __iter__(self):
        return iter(range(self.lo, self.hi))

    def __len__(self) -> int:
        return self.hi - self.lo


def _collate_lists(batch):
    """Multi-scale samples are lists of differently-sized tensors: keep them as lists."""
    views = [b[0] for b in batch]
    return views, torch.tensor([b[1] for b in batch])


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 4, seed: int = 0,
                rank: int = 0, world_size: int = 1, multiscale: bool = False) -> DataLoader:
    """A DataLoader with workers, pinned memory and persistent workers. Training shuffles with a seeded
    DistributedSampler (call loader.sampler.set_epoch(e)); evaluation uses an exact ShardSampler."""
    if train:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=1 if multiscale else batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, drop_last=train,
                      collate_fn=_collate_lists if multiscale else None,
                      generator=torch.Generator().manual_seed(seed) if train else None)


def fit_normalizer(dataset: ImageFolderSplit, mode: str = "channel", size: int = 224, max_images: int = 10_000,
                   seed: int = 0) -> Normalizer:
    """Mean (and std) from up to `max_images` training images at the centre view. For "channel" without
    a dataset pass, use imagenet_normalizer() instead."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:max_images]
    view = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    imgs = torch.stack([view(decode(dataset.samples[int(i)][0])) for i in idx])
    return Normalizer.fit(imgs, mode)


def imagenet_normalizer() -> Normalizer:
    return Normalizer("channel", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1))


def info(root) -> dict:
    """What `reslab data info --data folder` reports (mean pixel from up to 1,000 training images)."""
    out = {"dataset": "folder", "source": str(root), "checksum_official": None}
    for split, key in (("train", "train"), ("val", "test")):
        ds = ImageFolderSplit(root, split)
        out[key] = len(ds)
        out[f"{key}_per_class"] = torch.bincount(torch.tensor(ds.targets), minlength=len(ds.classes)).tolist()
        if split == "train":
            out["classes"] = ds.classes
            first = decode(ds.samples[0][0])
            out["image_shape"] = list(first.shape)
            out["mean_pixel"] = [round(float(v), 4) for v in fit_normalizer(ds, "channel", 224, 1000).mean.flatten()]
    return out
