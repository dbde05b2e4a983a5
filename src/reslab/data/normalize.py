"""Input normalisation, saved with every run so that evaluation uses exactly what training used.

  "pixel"   (the paper): subtract the per-pixel mean image of the training split in use; std 1
  "channel" (an option): subtract the per-channel mean and divide by the per-channel std
Images are scaled to [0, 1] first. Stored as two tensors, so a checkpoint holding one still loads with
torch.load(weights_only=True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ReslabError

MODES = ("pixel", "channel")


@dataclass
class Normalizer:
    mode: str
    mean: torch.Tensor      # (C, H, W) for "pixel", (C, 1, 1) for "channel"; in [0, 1] units
    std: torch.Tensor       # (C, 1, 1)

    @classmethod
    def fit(cls, images_uint8, mode: str = "pixel") -> "Normalizer":
        """Statistics of (N, C, H, W) uint8 training images, or of an iterable of such batches (all of one
        size), accumulated a chunk at a time: the memory is one chunk's, whatever N is."""
        return cls.from_sums(*cls.sums(images_uint8), mode)

    @staticmethod
    def sums(images_uint8, shape: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(per-pixel sum (C, H, W), per-channel sum of squares (C,), N) of uint8 images, in int64: exact
        in any order (a sum of squares over 10,000 images at 224x224 passes 2**53, where float64 would
        round), so shares summed on several ranks (or in other chunks) give the very same statistics.
        `shape` (C, H, W): the zeros returned for no images."""
        chunks = images_uint8.split(256) if isinstance(images_uint8, torch.Tensor) else images_uint8
        total = torch.zeros(shape, dtype=torch.int64) if shape else None
        sq = torch.zeros(shape[0], dtype=torch.int64) if shape else None
        n = 0
        for chunk in chunks:
            f = chunk.to(torch.int64)
            if total is None:
                total, sq = torch.zeros(f.shape[1:], dtype=torch.int64), torch.zeros(f.shape[1], dtype=torch.int64)
            total += f.sum(0)
            sq += f.square().sum((0, 2, 3))
            n += len(f)
        return total, sq, n

    @classmethod
    def from_sums(cls, total: torch.Tensor, sq: torch.Tensor, n: int, mode: str = "pixel") -> "Normalizer":
        if mode not in MODES:
            raise ValueError(f"unknown normalisation {mode!r}; valid choices: {', '.join(MODES)}")
        if not n:
            raise ValueError("no images to fit the normalisation on")
        c, h, w = total.shape
        total, sq = total.to(torch.float64), sq.to(torch.float64)
        mean_img = total / (255 * n)
        if mode == "pixel":
            return cls(mode, mean_img.float(), torch.ones(c, 1, 1))
        mean_c = mean_img.mean((1, 2))
        var_c = sq / (255 ** 2 * n * h * w) - mean_c.square()
        return cls(mode, mean_c.float().view(c, 1, 1), var_c.clamp_min(1e-12).sqrt().float().view(c, 1, 1))

    def mean_at(self, h: int, w: int) -> torch.Tensor:
        """The mean at another resolution (for multi-scale tests): the mean image resized bilinearly."""
        if self.mean.shape[1:] in ((1, 1), (h, w)):
            return self.mean
        return F.interpolate(self.mean[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float32. Anything else is refused: a float batch already in [0, 1]
        (what ToTensor gives) would be divided by 255 again, and silently, in the caller's own tensor."""
        if x_uint8.dtype != torch.uint8:
            raise ReslabError(f"the normaliser takes uint8 images (0-255), got {x_uint8.dtype}; for a float batch in "
                              "[0, 1] pass (x * 255).round().to(torch.uint8)")
        x = x_uint8.float().div_(255)
        mean = self.mean_at(*x.shape[-2:]).to(x.device)
        return x.sub_(mean).div_(self.std.to(x.device))

    def state_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean.cpu(), "std": self.std.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Normalizer":
        return cls(d["mode"], torch.as_tensor(d["mean"]), torch.as_tensor(d["std"]))
