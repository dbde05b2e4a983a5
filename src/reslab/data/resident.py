"""A device-resident loader for small datasets (CIFAR): no workers, no per-sample Python.

The whole split lives on the training device as one uint8 tensor. Training batches are augmented with the
paper's recipe — zero-pad `pad` pixels (zero AFTER mean subtraction, as in Caffe), random crop back to
H x W, random horizontal flip — by a single gather per batch: all (2p+1)^2 x 2 crop/flip variants have a
precomputed index map and mean-image crop, and each image picks one.

Randomness is a pure function of (seed, epoch, batch): the epoch's permutation comes from a generator
seeded with (seed, epoch), a batch's crops and flips from one seeded with (seed, epoch, batch). The
loader's whole state is therefore {epoch, batch}, and a restored loader yields the identical next batch.

Distributed: `batch_size` is the GLOBAL batch. In training every rank draws the same permutation and the
same augmentation for the global batch and keeps its contiguous slice, so the union over ranks is exactly
the single-process batch. In evaluation rank r takes the contiguous index range [r*N/W, (r+1)*N/W): every
example exactly once, no padding, no duplicates.

Last partial batch: dropped in training (`drop_last=True`, the default: every step has the full batch),
kept in evaluation.
"""
from __future__ import annotations

import copy

import torch

from .normalize import Normalizer

_MIX = 1_000_003  # spreads (seed, epoch, batch) over generator seeds


def mix_seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * _MIX + int(p) + 1) % (2**63 - 1)
    return s


class ResidentLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalizer: Normalizer, *,
                 train: bool, device: str | torch.device = "cpu", seed: int = 0, pad: int = 4,
                 flip: bool = True, drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1 or (train and batch_size % world_size):
            raise ValueError(f"the global batch ({batch_size}) must be a positive multiple of the world size "
                             f"({world_size})")
        self.device = torch.device(device)
        self.train, self.seed, self.pad, self.flip = train, seed, pad if train else 0, flip and train
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.normalizer = normalizer
        self.labels = labels.to(self.device, torch.long)
        self.n = len(labels)
        self.epoch, self.batch = 0, 0
        n, c, h, w = images.shape
        self.shape = (c, h, w)
        if self.train:
            p = self.pad
            padded = torch.zeros(n, c, h + 2 * p, w + 2 * p, dtype=torch.uint8)
            padded[:, :, p:p + h, p:p + w] = images
            self.store = padded.to(self.device).view(-1)
            self._build_crops(normalizer)
        else:
            self.store = images.to(self.device)
            lo, hi = rank * n // world_size, (rank + 1) * n // world_size
            self.shard = torch.arange(lo, hi, device=self.device)
            self.mean = normalizer.mean_at(h, w).to(self.device)
            self.std = normalizer.std.to(self.device)

    def _build_crops(self, norm: Normalizer) -> None:
        c, h, w = self.shape
        p = self.pad
        hp, wp = h + 2 * p, w + 2 * p
        k = 2 * p + 1
        flips = 2 if self.flip else 1
        dy = torch.arange(k).repeat_interleave(k * flips)
        dx = torch.arange(k).repeat_interleave(flips).repeat(k)
        fl = torch.arange(flips).repeat(k * k).bool()
        ar_h, ar_w = torch.arange(h), torch.arange(w)
        rows = dy[:, None] + ar_h                                                       # (V, H)
        cols = torch.where(fl[:, None], dx[:, None] + (w - 1) - ar_w, dx[:, None] + ar_w)  # (V, W)
        # index maps laid out (V, H, W, C): a gathered batch is channels_last in memory for free
        spatial = rows[:, :, None] * wp + cols[:, None, :]
        base = spatial[..., None] + torch.arange(c) * (hp * wp)                         # (V, H, W, C)
        mean_pad = torch.zeros(c, hp, wp)
        mean_pad[:, p:p + h, p:p + w] = norm.mean_at(h, w).expand(c, h, w)
        # padded pixels are 0 in both image and mean, so they are exactly 0 after normalisation
        self.crop_index = base.to(self.device)
        self.crop_mean = mean_pad.reshape(-1).take(base).to(self.device)                # (V, H, W, C)
        self.inv_std = (1.0 / norm.std).reshape(1, 1, 1, c).to(self.device)
        self.image_numel = c * hp * wp
        self.variants = len(base)

    # -------------------------------------------------------------- epoch bookkeeping
    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        if self.train:
            return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return -(-len(self.shard) // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        if d.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {d['seed']}, this loader has seed {self.seed}")
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])

    def fork(self, seed: int) -> "ResidentLoader":
        """An independent loader over the same device tensors (nothing copied) from epoch 0 of another seed:
        precise BN draws its batches from one without moving this loader's position."""
        other = copy.copy(self)
        other.seed, other.epoch, other.batch = seed, 0, 0
        return other

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g).to(self.device)

    def __iter__(self):
        """Yield the remaining batches of the current epoch, then advance the epoch."""
        if not self.train:
            for i in range(len(self)):
                idx = self.shard[i * self.batch_size:(i + 1) * self.batch_size]
                yield self._eval_batch(idx), self.labels[idx]
            return
        for idx, variant in self.plans():
            yield self.batch_of(idx, variant)

    def plans(self):
        """The rest of the epoch as (image indices, crop/flip variants) on the device, one pair per batch:
        the batch is `batch_of(idx, variant)`. A captured CUDA graph runs batch_of itself on static copies
        of these, so only two small index tensors change between steps."""
        perm = self._perm()
        # every remaining batch's variants drawn now and moved in one copy: a copy per step from pageable
        # memory would make the host wait for the device at every step (no overlap, none between a set's runs)
        first, sizes = self.batch, [len(perm[b * self.batch_size:(b + 1) * self.batch_size])
                                    for b in range(self.batch, len(self))]
        drawn = [torch.randint(self.variants, (k,), generator=torch.Generator().manual_seed(
            mix_seed(self.seed, self.epoch, first + i))) for i, k in enumerate(sizes)]
        variants = torch.cat(drawn).to(self.device).split(sizes) if drawn else ()
        while self.batch < len(self):
            b = self.batch
            glob = perm[b * self.batch_size:(b + 1) * self.batch_size]
            variant = variants[b - first]
            per_rank = len(glob) // self.world_size
            lo = self.rank * per_rank
            hi = len(glob) if self.rank == self.world_size - 1 else lo + per_rank
            self.batch += 1  # advanced before yielding: a state saved after this step resumes at the next
            yield glob[lo:hi], variant[lo:hi]
        self.epoch, self.batch = self.epoch + 1, 0

    def batch_of(self, idx: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented, normalised images; labels) of a training batch: pure tensor ops, no host work."""
        return self._train_batch(idx, variant), self.labels[idx]

    def _train_batch(self, idx: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        lin = self.crop_index[variant] + (idx * self.image_numel).view(-1, 1, 1, 1)
        x = self.store.take(lin).float().div_(255).sub_(self.crop_mean[variant]).mul_(self.inv_std)
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W) view of channels_last memory
        return x if self.channels_last else x.contiguous()

    def _eval_batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.store[idx].float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
