"""ImageNet-style folders (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`) with the paper's pipelines.

Training (paper §3.4): the paper's scale augmentation (or RandomResizedCrop), flip and PCA lighting, drawn
per image by `augment.Augment` from (seed, epoch, index), so every way of decoding crops the same boxes.

Two places to decode (`decode`):
  cpu     DataLoader workers decode and crop each image; the batch of uint8 crops goes to the device, where
          flip, lighting and normalisation run batched.
  device  workers only read the files' bytes (and a JPEG's size from its header, to draw its crop); the main
          process decodes the whole batch on the run's device (nvJPEG on a GPU, via torchvision), crops
          and resizes there, and finishes as above. Files that are not JPEGs are decoded in the workers.
Both crop the same boxes of the same images: on the CPU the batches are bitwise equal. On a GPU the decoders'
pixels differ by a level or so, and the resampling filters (RoIAlign on the exact box there, torchvision's
resize of the box rounded to whole pixels on the CPU) by about 2 levels on average, up to about 9.

Evaluation views (paper §3.4 and §4.1), for a crop size of 224:
  center      resize shorter side to 256, centre 224 crop                   -> (C, 224, 224)
  10crop      resize 256, four corners + centre, and their flips             -> (10, C, 224, 224)
  multiscale  the whole image with its shorter side at 224/256/384/480/640   -> list of 5 tensors
              (scored by the fully-convolutional head; sizes differ, so batch size 1)
Other crop sizes keep the proportions. On the device path the same torchvision transforms run on the
decoded GPU tensors.

Corrupt images: with on_corrupt="stop" (the default) the first undecodable file stops the run with an error
that names it; with "skip" it is reported once on stderr by name, counted, and replaced (by the next
decodable image of the split in a worker, or by another image of the same batch when only the device's
decoder finds it broken), so an epoch keeps its length.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from ..errors import ReslabError
from ..interrupt import worker_options
from .augment import Augment, Finish, crop_resize
from .images import FOLDER_SUFFIXES, ImageReadMode, decode, decode_jpeg, is_image_file, is_jpeg, jpeg_size, read_bytes
from .normalize import Normalizer
from .resident import mix_seed

MULTISCALE_SIZES = (224, 256, 384, 480, 640)
VIEWS = ("center", "10crop", "multiscale")
ON_CORRUPT = ("stop", "skip")
DECODERS = ("auto", "cpu", "device")   # auto: on the GPU where the run is on one, else in the workers
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(torch.nn.Module):
    """A Normalizer as a transform on one float image in [0, 1] (any size: the pixel mean is resized), on
    whatever device the image is."""

    def __init__(self, norm: Normalizer):
        super().__init__()
        self.norm, self.cache = norm, {}

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        key = (img.device, *img.shape[-2:])
        if key not in self.cache:  # once per device and size: a copy per image would wait for the GPU
            self.cache[key] = (self.norm.mean_at(*img.shape[-2:]).to(img.device), self.norm.std.to(img.device))
        mean, std = self.cache[key]
        return (img - mean) / std


def view_resize(size: int) -> int:
    """The shorter side the 1- and 10-crop test views resize to (paper §3.4): 256 for 224 crops, in proportion
    for others."""
    return round(size * 256 / 224)


def center_view(size: int = 224, resize: int | None = None) -> v2.Compose:
    """The single test view: the shorter side resized (`view_resize`), the centre size x size crop. On uint8 or
    float images; `predict` and `eval` both take it."""
    return v2.Compose([v2.Resize(resize or view_resize(size), antialias=True), v2.CenterCrop(size)])


def eval_transform(norm: Normalizer, view: str = "center", size: int = 224, resize: int | None = None):
    if view not in VIEWS:
        raise ReslabError(f"unknown view {view!r}; valid choices: {', '.join(VIEWS)}")
    tail = [v2.ToDtype(torch.float32, scale=True), Normalize(norm)]
    if view == "center":
        return v2.Compose([center_view(size, resize), *tail])
    resize = resize or view_resize(size)
    if view == "10crop":
        return TenCropStack(v2.Resize(resize, antialias=True), size, v2.Compose(tail))
    return MultiScale([v2.Compose([v2.Resize(round(s * size / 224), antialias=True), *tail])
                       for s in MULTISCALE_SIZES])


class TenCropStack(torch.nn.Module):
    """Resize, then the 4 corner + centre crops and their horizontal flips, stacked: (10, C, size, size)."""

    def __init__(self, resize, size: int, after):
        super().__init__()
        self.resize, self.size, self.after = resize, size, after

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        crops = v2.functional.ten_crop(self.resize(img), [self.size, self.size])
        return self.after(torch.stack(crops))   # one batched normalisation of the ten crops


class MultiScale(torch.nn.Module):
    """The whole image at each scale: a list of tensors of different sizes."""

    def __init__(self, per_scale):
        super().__init__()
        self.per_scale = per_scale

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.per_scale]


def names_of(classes, most: int = 6) -> str:
    """Class names for an error message: the first few, and how many in all."""
    shown = ", ".join(classes[:most])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > most else "")


class Classes(datasets.ImageFolder):
    """torchvision's ImageFolder without hidden class folders (`.ipynb_checkpoints`, say), which would
    otherwise become classes."""

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}


class ImageFolderSplit(Dataset):
    """One split (`train`, `val`; `test` where a tree has no `val`) of an ImageNet-style folder.

    `ds[i]` is (image or view, target). The loaders index with (i, seed) and get (payload, target, params,
    the index of the file used):
    with `augment`, params are the image's drawn crop box, flip and lighting, and the payload is the
    uint8 crop; with `encoded`, the payload is the file's bytes (a JPEG) or the decoded image (anything
    else), cropped or transformed later on the device."""

    def __init__(self, root, split: str, transform=None, on_corrupt: str = "stop", augment: Augment | None = None,
                 encoded: bool = False):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be 'stop' or 'skip', got {on_corrupt!r}")
        folder = Path(root) / split
        if split == "val" and not folder.is_dir() and (Path(root) / "test").is_dir():
            folder = Path(root) / "test"   # e.g. the CIFAR-10 JPEG tree: train/ and test/
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--data-dir {root} {'is a file' if Path(root).exists() else 'does not exist'}: "
                                    "--data folder needs a folder holding train/<class>/ and val/<class>/")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: an ImageNet-style folder has train/<class>/ and val/<class>/"
                                    + (" (or test/<class>/)" if split == "val" else ""))
        other: list[str] = []  # files left out for their suffix (.jfif, .heic, .txt, ...); hidden ones are not data

        def keep(p: str) -> bool:
            ok = is_image_file(p, folder)
            if not ok and not any(part.startswith(".") for part in Path(os.path.relpath(p, folder)).parts):
                other.append(p)
            return ok
        try:  # empty class folders are let through here and judged below (a missing one is fine in val/)
            # not kept: its lambdas would not pickle, and spawned workers (macOS, Windows) get the dataset pickled
            found = Classes(str(folder), loader=lambda p: p, allow_empty=True,  # we decode
                            is_valid_file=keep)
        except FileNotFoundError as e:
            raise ReslabError(f"{folder}: {e}") from None
        if not found.samples:
            raise ReslabError(f"{folder}: no images in its class folders (files ending {', '.join(FOLDER_SUFFIXES)})")
        empty = sorted(set(found.classes) - {found.classes[t] for t in found.targets})
        if empty and split == "train":
            raise ReslabError(f"{folder}: class folder(s) {names_of(empty)} hold no images; a class needs training "
                              "images (remove the folder to leave the class out)")
        self.folder = folder
        self.classes, self.samples, self.targets = found.classes, found.samples, found.targets
        self.transform, self.on_corrupt, self.augment, self.encoded = transform, on_corrupt, augment, encoded
        self.skipped: list[str] = []
        self.other_files = sorted(other)  # a run says how many (build), as ImageFolder would not

    def files_md5(self) -> str:
        """The MD5 of the split's file list: each path under the split folder and its label, in the loader's
        order. A resume compares it: with a file added, removed or renamed (even keeping the count), the
        loader's saved position would point at other images. Contents are not read (an ImageNet split would
        take minutes)."""
        h, cut = hashlib.md5(), len(os.path.join(str(self.folder), ""))
        for path, target in self.samples:
            h.update(os.fsencode(path[cut:]) + b"\t%d\n" % target)
        return h.hexdigest()

    def label_as(self, classes: list[str]) -> None:
        """Label by `classes` (the training split's): a label is an index into the sorted class folders, so a
        split that lacks one of them would shift every label after it. A class the training split does not
        have cannot be scored at all: an error."""
        extra = sorted(set(self.classes) - set(classes))
        if extra:
            raise ReslabError(f"{self.folder}: class folder(s) {names_of(extra)} are not among the training classes "
                              f"({names_of(classes)}); evaluate on the classes the model was trained on")
        if self.classes != list(classes):
            index = {c: i for i, c in enumerate(classes)}
            to = [index[c] for c in self.classes]
            self.samples = [(path, to[t]) for path, t in self.samples]
            self.targets = [to[t] for t in self.targets]
            self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        for j in range(len(self.samples)):
            path, target = self.samples[(i + j) % len(self.samples)]
            try:
                payload, params = self._load(path, 0 if seed is None else seed)
            except ReslabError as e:
                if self.on_corrupt == "stop":
                    raise
                self.note_skipped(path, e)
                continue
            return (payload, target) if seed is None else (payload, target, params, (i + j) % len(self.samples))
        raise ReslabError(f"no decodable image in {len(self.samples)} files")

    def note_skipped(self, path: str, e: Exception) -> None:
        if path not in self.skipped:
            self.skipped.append(path)
            print(f"reslab: skipping corrupt image: {e}", file=sys.stderr)

    def _load(self, path: str, seed: int):
        data = read_bytes(path)
        if self.encoded and is_jpeg(data):
            img, (h, w) = data, jpeg_size(path, data)
        else:
            img = decode(path, data)
            h, w = img.shape[-2:]
        if self.augment is None:
            return (img if self.encoded or self.transform is None else self.transform(img)), None
        box, flip, alpha = self.augment.draw(h, w, seed)
        box = torch.tensor(box, dtype=torch.float32)
        if not self.encoded:
            img = crop_resize([img], box[None], self.augment.size)[0]
        return img, (box, flip, torch.tensor(alpha))


class Keyed(Sampler):
    """Another sampler's indices, each with the seed of that image's augmentation in this epoch:
    (index, mix_seed(seed, epoch, index)). The seeds are drawn here, in the main process, so they do not
    depend on workers, ranks or where a run resumed."""

    def __init__(self, inner: Sampler, seed: int = 0):
        self.inner, self.seed, self.epoch = inner, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((i, mix_seed(self.seed, self.epoch, i)) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class ShardSampler(Sampler[int]):
    """Contiguous, exact shard of range(n) for rank r of w: no padding, no duplicates (evaluation)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size

    def __iter__(self):
        return iter(range(self.lo, self.hi))

    def __len__(self) -> int:
        return self.hi - self.lo


def collate(batch):
    """(payloads, targets, params, indices): payloads stacked where they are tensors of one shape, else a list
    (multi-scale views); encoded files packed into one byte tensor with their lengths (one shared-memory
    block per batch, not one per file) as {"bytes", "lengths", "decoded": {position: image}}; params
    (boxes, flips, alphas) stacked, or None for evaluation."""
    payloads, targets, params, indices = zip(*batch)
    first = payloads[0]
    if any(isinstance(p, torch.Tensor) and p.ndim == 1 for p in payloads):
        enc = [p for p in payloads if p.ndim == 1]
        x = {"bytes": torch.cat(enc), "lengths": torch.tensor([len(p) if p.ndim == 1 else 0 for p in payloads]),
             "decoded": {k: p for k, p in enumerate(payloads) if p.ndim != 1}}
    elif isinstance(first, torch.Tensor) and all(isinstance(p, torch.Tensor) and p.shape == first.shape
                                                 for p in payloads):
        x = torch.stack(payloads)
    else:
        x = list(payloads)
    if params[0] is None:
        return x, torch.tensor(targets), None, list(indices)
    boxes, flips, alphas = zip(*params)
    return x, torch.tensor(targets), (torch.stack(boxes), torch.tensor(flips), torch.stack(alphas)), list(indices)


def unpack(x) -> list[torch.Tensor]:
    """collate()'s encoded batch back to one payload per image: byte views of the packed block, or images."""
    if not isinstance(x, dict):
        return list(x)
    ends = x["lengths"].cumsum(0).tolist()
    out, start = [], 0
    for k, end in enumerate(ends):
        out.append(x["decoded"][k] if k in x["decoded"] else x["bytes"][start:end])
        start = end
    return out


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 4, seed: int = 0,
                rank: int = 0, world_size: int = 1, multiscale: bool = False) -> DataLoader:
    """A DataLoader with workers, pinned memory and persistent workers, yielding collate()'s batches.
    Training shuffles with a seeded DistributedSampler (call loader.sampler.set_epoch(e)); evaluation uses
    an exact ShardSampler. More workers than the CPUs this process may use are not started: they would only
    contend (and DataLoader warns), and a stream's batches do not depend on the number of workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, cpus)
    if train:
        inner = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                    seed=seed, drop_last=True)
    else:
        inner = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=1 if multiscale else batch_size, sampler=Keyed(inner, seed),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      drop_last=train, collate_fn=collate, **worker_options(workers))


class Finisher:
    """The main process's half of the pipeline: a collated batch to the network's input (x, y) on `device`.
    Decodes encoded payloads there (batched), crops and augments training batches, transforms evaluation
    views."""

    def __init__(self, dataset: ImageFolderSplit, device, norm: Normalizer, transform=None):
        self.ds, self.device, self.transform = dataset, torch.device(device), transform
        self.finish = Finish(norm, self.device)

    def __call__(self, batch):
        x, y, params, indices = batch
        y = y.to(self.device, non_blocking=True)
        if not self.ds.encoded:
            if params is None:
                return _to(x, self.device), y
            return self.finish(x.to(self.device, non_blocking=True), params[1], params[2]), y
        imgs, keep = self.decode(unpack(x), indices)
        if len(keep) < len(imgs):  # skipped images: reuse good ones of the batch, so the batch keeps its size
            pick = torch.tensor([keep[k % len(keep)] if k not in keep else k for k in range(len(imgs))])
            imgs, y = [imgs[int(k)] for k in pick], y[pick.to(y.device)]
            if params is not None:
                params = tuple(p[pick] for p in params)
        if params is not None:
            crops = crop_resize(imgs, params[0].to(self.device, non_blocking=True), self.ds.augment.size)
            return self.finish(crops, params[1], params[2]), y
        views = [self.transform(img) for img in imgs]
        return (views if isinstance(views[0], list) else torch.stack(views)), y

    def decode(self, payloads: list[torch.Tensor], indices: list[int]) -> tuple[list[torch.Tensor], list[int]]:
        """Decode the batch's JPEG bytes on the device in one call; a failure there retries image by image
        (on the device, then on the CPU) to name the broken file. Returns the images and the positions that
        decoded."""
        enc = [k for k, p in enumerate(payloads) if p.ndim == 1]
        out = list(payloads)
        if enc:
            try:
                dec = decode_jpeg([payloads[k] for k in enc], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                dec = [self._decode_one(payloads[k], self.ds.samples[indices[k]][0]) for k in enc]
            for k, d in zip(enc, dec):
                out[k] = d
        keep = [k for k, o in enumerate(out) if o is not None]
        if not keep:  # nothing in the batch to stand in for them (a multi-scale batch holds one image)
            raise ReslabError(f"no image of a batch of {len(out)} could be decoded "
                              f"({', '.join(self.ds.samples[i][0] for i in indices[:3])}, ...)")
        return [o.to(self.device, non_blocking=True) if o is not None else None for o in out], keep

    def _decode_one(self, data: torch.Tensor, path: str):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            return decode(path, data)   # the CPU's libjpeg accepts some files nvJPEG refuses (CMYK, say)
        except ReslabError:
            err = ReslabError(f"{path}: cannot decode image on {self.device.type} or the CPU")
            if self.ds.on_corrupt == "stop":
                raise err from None
            self.ds.note_skipped(path, err)
            return None


def _to(x, device):
    if isinstance(x, list):  # multi-scale: a list (batch) of lists (scales) of tensors
        return [[v.to(device, non_blocking=True) for v in views] for views in x]
    return x.to(device, non_blocking=True)


def fit_normalizer(dataset: ImageFolderSplit, mode: str = "channel", size: int = 224, max_images: int = 10_000,
                   seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu") -> Normalizer:
    """Mean (and std) from up to `max_images` training images at the centre view. For "channel" without
    a dataset pass, use imagenet_normalizer() instead. An undecodable image stops it with its name, or
    under on_corrupt="skip" is reported (once, as the loader would) and left out. Under torchrun each of
    the `world_size` ranks decodes its share and the sums are added up (on `device`, as the backend wants):
    exact integer sums, so every rank gets the statistics one process would fit, for 1/world_size of the
    decoding."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:max_images]
    view = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def batches(n=256):  # decoded a batch at a time: 10,000 images at 224x224 would hold 1.5 GB at once
        imgs = []
        for i in idx[rank::world_size].tolist():
            path = dataset.samples[i][0]
            try:
                imgs.append(view(decode(path)))
            except ReslabError as e:
                if dataset.on_corrupt == "stop":
                    raise
                dataset.note_skipped(path, e)
            if len(imgs) == n:
                yield torch.stack(imgs)
                imgs = []
        if imgs:
            yield torch.stack(imgs)
    total, sq, n = Normalizer.sums(batches(), shape=(3, size, size))
    if world_size > 1:
        from .. import dist
        packed = dist.all_reduce_sum(torch.cat([total.flatten(), sq, torch.tensor([n])]).to(device)).cpu()
        total, sq, n = packed[:total.numel()].view_as(total), packed[total.numel():-1], int(packed[-1])
    if not n:
        raise ReslabError(f"none of the {len(idx)} images sampled to fit the normalisation could be decoded")
    return Normalizer.from_sums(total, sq, n, mode)


def imagenet_normalizer() -> Normalizer:
    return Normalizer("channel", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1))


def info(root) -> dict:
    """What `reslab data info --data folder` reports (mean pixel from up to 1,000 training images)."""
    out = {"dataset": "folder", "source": str(root), "checksum_official": None}
    train = None
    for split, key in (("train", "train"), ("val", "test")):
        ds = ImageFolderSplit(root, split)
        if train is not None:
            ds.label_as(train.classes)  # as training labels it: a class val/ lacks counts 0
        out[key] = len(ds)
        out[f"{key}_per_class"] = torch.bincount(torch.tensor(ds.targets), minlength=len(ds.classes)).tolist()
        if split == "train":
            train = ds
            out["classes"] = ds.classes
            first = decode(ds.samples[0][0])
            out["image_shape"] = list(first.shape)  # the first file's: a folder's images differ in size
            out["mean_pixel"] = [round(float(v), 4) for v in fit_normalizer(ds, "channel", 224, 1000).mean.flatten()]
            out["mean_pixel_images"] = min(len(ds), 1000)  # a sample of the split, at the 224 centre view
        else:
            out["eval_split"] = ds.folder.name  # val, or test where the tree has no val/
    return out
