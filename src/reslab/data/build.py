"""Assemble a run's data: loaders for training and evaluation, the normaliser and the class names.

CIFAR goes through the device-resident loader; ImageNet-style folders through torchvision DataLoaders
wrapped to offer the same interface (iterate one epoch; `state_dict()` = {epoch, batch}).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from ..errors import ReslabError
from . import cifar
from .normalize import Normalizer
from .resident import ResidentLoader

DATASETS = ("cifar10", "cifar100", "folder")


@dataclass
class RunData:
    train: object                 # iterable of (x, y) batches for one epoch, with state_dict()
    eval: object                  # iterable of (x, y) batches over the evaluation split (this rank's shard)
    normalizer: Normalizer
    classes: list[str]
    eval_split: str               # "test", "val5k" or "val"
    train_size: int
    eval_size: int
    identity: dict | None = None  # which data this is: CIFAR's checksums, a folder's file lists

    def info(self, name: str) -> dict:
        """What a checkpoint and config.json record about the data."""
        return {"name": name, "eval_split": self.eval_split, "train_size": self.train_size,
                "eval_size": self.eval_size, "identity": self.identity}


def check_classes(trained, data: RunData, what: str) -> None:
    """Output i of a model is class i of the data it trained on: data with other classes, or the same ones
    in another order, would be scored against the wrong labels. `trained`: the checkpoint's class names
    (None or empty: nothing to check; "0".."N-1", as converted weights name them: only the count)."""
    if trained and list(trained) == [str(i) for i in range(len(trained))]:  # converted weights: indices only
        if len(trained) != len(data.classes):
            raise ReslabError(f"{what}: the model has {len(trained)} outputs and the data {len(data.classes)} "
                              "classes; use data with as many classes, in the order the weights were trained on")
        return
    if trained and list(trained) != list(data.classes):
        from .folder import names_of
        raise ReslabError(f"{what}: the data's classes ({names_of(list(data.classes))}) are not the ones the model "
                          f"was trained on ({names_of(list(trained))}); use data with the same class folders")


class EpochCursor:
    """Where a DataLoader-backed stream is: its position is {epoch, batch within the epoch} and nothing else,
    so a stream that restores it yields the same next batch (the subclass's __iter__ honours it)."""

    loader: object
    epoch: int = 0
    batch: int = 0

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])


class FolderStream(EpochCursor):
    """A torchvision DataLoader seen as the resident loader is: one epoch per iteration, resumable, each batch
    finished on the device by `finish` (folder.Finisher). Resuming mid-epoch re-reads and discards the
    batches already used in that epoch; the shuffling (DistributedSampler: seed + epoch) and every image's
    augmentation (folder.Keyed: seed, epoch, index) are what the uninterrupted run drew."""

    def __init__(self, loader, finish):
        self.loader, self.finish = loader, finish  # the loader's sampler holds the seed and the rank
        self.epoch, self.batch = 0, 0

    def fork(self, seed: int) -> "FolderStream":
        """An independent stream over the same files with another shuffling seed and its own (non-persistent)
        workers: a second iterator of a persistent-worker DataLoader would reset the training one."""
        from torch.utils.data import DataLoader, DistributedSampler
        from ..interrupt import worker_options
        from .folder import Keyed
        ld, sp = self.loader, self.loader.sampler.inner
        sampler = DistributedSampler(ld.dataset, num_replicas=sp.num_replicas, rank=sp.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        return FolderStream(DataLoader(ld.dataset, batch_size=ld.batch_size, sampler=Keyed(sampler, seed),
                                       num_workers=ld.num_workers, pin_memory=ld.pin_memory, drop_last=True,
                                       collate_fn=ld.collate_fn, **worker_options(ld.num_workers)), self.finish)

    def __iter__(self):
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)
        for batch in islice(iter(self.loader), self.batch, None):
            out = self.finish(batch)  # a file only the device's decoder finds broken fails here: not yet used
            self.batch += 1
            yield out
        self.epoch, self.batch = self.epoch + 1, 0


def build(data: str, data_dir, *, batch_size: int, device, seed: int = 0, rank: int = 0, world_size: int = 1,
          val_split: bool = False, normalization: str = "pixel", normalizer: Normalizer | None = None,
          channels_last: bool = False, view: str = "center", workers: int = 4, eval_batch: int | None = None,
          with_train: bool = True, augment=None, decode: str = "auto", on_corrupt: str = "stop") -> RunData:
    """Loaders for a run. `normalizer` (e.g. from a checkpoint) overrides fitting one on the training split.
    Folders: `augment` (augment.Augment: crop kind and size), `decode` (folder.DECODERS) and `on_corrupt`
    (folder.ON_CORRUPT, for the training split; an evaluation always stops at an undecodable image)."""
    # Randomness is the run's own: the resident loader draws from (seed, epoch, batch), folder loaders from
    # (seed, epoch, index), so runs side by side in one process never share the global generator.
    if data not in DATASETS:
        raise ReslabError(f"unknown dataset {data!r}; valid choices: {', '.join(DATASETS)}")
    eval_batch = eval_batch or max(batch_size, 256)
    if data == "folder":
        from .augment import Augment
        return _build_folder(data_dir, batch_size=batch_size, device=device, seed=seed, rank=rank,
                             world_size=world_size, normalization=normalization, normalizer=normalizer, view=view,
                             workers=workers, eval_batch=eval_batch, with_train=with_train,
                             augment=augment or Augment(), decode=decode, on_corrupt=on_corrupt)
    if view != "center":
        raise ReslabError(f"--views {view} needs an ImageNet-style folder; CIFAR is tested on the single "
                          "original 32x32 view (paper §4.2)")
    loc = cifar.locate(data, data_dir)
    train_split, eval_split = ("train45k", "val5k") if val_split else ("train", "test")
    tr = cifar.load(data, train_split, located=loc)
    ev = cifar.load(data, eval_split, located=loc)
    norm = normalizer or Normalizer.fit(tr.images, normalization)
    per_rank_eval = max(1, eval_batch // world_size)
    train = ResidentLoader(tr.images, tr.labels, batch_size, norm, train=True, device=device, seed=seed,
                           rank=rank, world_size=world_size, channels_last=channels_last) if with_train else None
    evl = ResidentLoader(ev.images, ev.labels, per_rank_eval, norm, train=False, device=device, rank=rank,
                         world_size=world_size, channels_last=channels_last)
    return RunData(train, evl, norm, tr.classes, eval_split, len(tr), len(ev), _cifar_identity(loc, tr))


def _cifar_identity(loc, tr) -> dict:
    """The test set's checksums (loc.identity) and the training split's: its pixels and labels, hashed where
    they lie (the test set's MD5 alone let a changed training set pass for the same data on resume)."""
    h = hashlib.md5(tr.images.contiguous().numpy())
    h.update(tr.labels.contiguous().numpy())
    return {**loc.identity, "train_pixels_md5": h.hexdigest()}


def _folder_identity(train_ds, val_ds) -> dict:
    """No checksum names a folder, but its file lists fingerprint it: a resume refuses a changed one."""
    return {"train_files_md5": train_ds.files_md5(), "eval_files_md5": val_ds.files_md5()}


def identify(data: str, data_dir, val_split: bool = False) -> dict:
    """What a run on this data records as its data (RunData.info), read without loaders or a normaliser:
    `reslab reproduce` compares it with the record of each run it finds already trained."""
    if data not in DATASETS:
        raise ReslabError(f"unknown dataset {data!r}; valid choices: {', '.join(DATASETS)}")
    if data == "folder":
        from .folder import ImageFolderSplit
        tr, ev = ImageFolderSplit(data_dir, "train"), ImageFolderSplit(data_dir, "val")
        ev.label_as(tr.classes)
        return RunData(None, None, None, tr.classes, "val", len(tr), len(ev), _folder_identity(tr, ev)).info(data)
    loc = cifar.locate(data, data_dir, allow_download=False)  # a dry run must not download 170 MB
    train_split, eval_split = ("train45k", "val5k") if val_split else ("train", "test")
    tr, ev = cifar.load(data, train_split, located=loc), cifar.load(data, eval_split, located=loc)
    return RunData(None, None, None, tr.classes, eval_split, len(tr), len(ev), _cifar_identity(loc, tr)).info(data)


def _build_folder(root, *, batch_size: int, device, seed: int, rank: int, world_size: int, normalization: str,
                  normalizer: Normalizer | None, view: str, workers: int, eval_batch: int, with_train: bool,
                  augment, decode: str, on_corrupt: str) -> RunData:
    from . import folder, images
    if not root:
        raise ReslabError("--data folder needs --data-dir pointing at a folder with train/ and val/")
    if batch_size % world_size:
        raise ReslabError(f"the global batch ({batch_size}) must be a multiple of the world size ({world_size})")
    if decode not in folder.DECODERS:
        raise ReslabError(f"unknown decode {decode!r}; valid choices: {', '.join(folder.DECODERS)}")
    if decode == "device" and not images.device_decoding():
        raise ReslabError("--decode device needs torchvision's decode_jpeg, which this torchvision lacks; "
                          "use --decode cpu")
    on_gpu = torch.device(device).type == "cuda"
    encoded = decode == "device" or (decode == "auto" and on_gpu and images.device_decoding())
    train_ds = folder.ImageFolderSplit(root, "train", augment=augment, encoded=encoded, on_corrupt=on_corrupt)
    if len(train_ds.classes) < 2:  # a one-output classifier is always right: likely a --data-dir a level too deep
        raise ReslabError(f"{Path(root) / 'train'} holds one class folder ({train_ds.classes[0]}); a classifier needs "
                          "at least 2 (is --data-dir the folder that holds train/ and val/?)")
    if normalizer is None:
        normalizer = (folder.imagenet_normalizer() if normalization == "channel"
                      else folder.fit_normalizer(train_ds, "pixel", size=augment.size, seed=seed, rank=rank,
                                                 world_size=world_size, device=device))
    train = None
    if with_train:
        loader = folder.make_loader(train_ds, batch_size // world_size, train=True, workers=workers, seed=seed,
                                    rank=rank, world_size=world_size)
        train = FolderStream(loader, folder.Finisher(train_ds, device, normalizer))
    transform = folder.eval_transform(normalizer, view, size=augment.size)
    val_ds = folder.ImageFolderSplit(root, "val", None if encoded else transform, encoded=encoded)
    val_ds.label_as(train_ds.classes)
    if rank == 0:
        for ds in (train_ds, val_ds):
            if ds.other_files:
                kinds = sorted({Path(p).suffix.lower() or "(none)" for p in ds.other_files})
                print(f"reslab: note: {len(ds.other_files)} file(s) in {ds.folder} left out for their suffix "
                      f"({', '.join(kinds[:5])}; images are {', '.join(folder.FOLDER_SUFFIXES)})", file=sys.stderr)
    per_rank = max(1, eval_batch // world_size // (10 if view == "10crop" else 1))
    evl = FolderStream(folder.make_loader(val_ds, per_rank, train=False, workers=workers, rank=rank,
                                          world_size=world_size, multiscale=view == "multiscale"),
                       folder.Finisher(val_ds, device, normalizer, transform))
    return RunData(train, evl, normalizer, train_ds.classes, "val", len(train_ds), len(val_ds),
                   _folder_identity(train_ds, val_ds))
