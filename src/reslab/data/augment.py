"""The ImageNet training augmentation as per-image parameters, drawn once and applied anywhere.

Paper §3.4: resize the shorter side to s ~ U{256..480}, take a random 224x224 crop, flip it with probability
1/2, add AlexNet's PCA lighting. The RandomResizedCrop option swaps the first two for torchvision's box.

Why parameters and not a torchvision transform pipeline: the same image must get the same crop whether it is
decoded on the CPU in a DataLoader worker or in a batch on the GPU, and whichever worker handles it. Each
image's parameters come from a generator seeded by (run seed, epoch, index) (`draw`), so both decoding paths
crop the same boxes (the CPU rounds a box to whole pixels), and a run resumed mid-epoch, with any number of
workers, draws what the uninterrupted run drew.

Resizing the whole image to shorter side s and then cropping 224x224 at (top, left) takes the pixels of one
box of the original image; we crop that box and resize it straight to 224x224 (`crop_resize`). The boxes
have the paper's distribution exactly; only the resampling filter differs from a resize of the whole image,
and the work no longer grows with the image's size. Crops are uint8, so batches travel between processes
and to the GPU at a quarter of float32's size.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import ReslabError
from .normalize import Normalizer

importlib.import_module("torchvision.ops")  # registers torch.ops.torchvision (the RoIAlign kernel below)

CROPS = ("scale", "rrc")   # the paper's scale augmentation | RandomResizedCrop (the modern recipe)
# AlexNet's PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), in [0, 1] units; alpha ~ N(0, 0.1).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
LIGHTING_STD = 0.1


@dataclass(frozen=True)
class Augment:
    """What to draw: the crop kind, the output size and the scale range (shorter side, for "scale")."""
    crop: str = "scale"
    size: int = 224
    scale: tuple[int, int] = (256, 480)
    lighting: float = LIGHTING_STD

    @classmethod
    def for_size(cls, crop: str, size: int) -> "Augment":
        """The paper's proportions at another crop size: shorter side in [size*256/224, size*480/224]."""
        if crop not in CROPS:
            raise ReslabError(f"unknown crop {crop!r}; valid choices: {', '.join(CROPS)}")
        return cls(crop, size, (round(size * 256 / 224), round(size * 480 / 224)))

    def draw(self, h: int, w: int, seed: int) -> tuple[list[float], bool, list[float]]:
        """The parameters of one image of height h and width w: its box (x0, y0, x1, y1) in the original's
        pixel-edge coordinates, whether to flip, and the lighting's alpha. A function of `seed` only."""
        g = torch.Generator().manual_seed(seed)
        box = self._scale_box(h, w, g) if self.crop == "scale" else self._rrc_box(h, w, g)
        flip = bool(torch.rand((), generator=g) < 0.5)
        alpha = (torch.randn(3, generator=g) * self.lighting).tolist()
        return box, flip, alpha

    def _scale_box(self, h: int, w: int, g) -> list[float]:
        s = int(torch.randint(self.scale[0], self.scale[1] + 1, (), generator=g))
        # the resized image's size as torchvision's resize computes it (shorter side s, longer one floored)
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        top = int(torch.randint(0, max(1, rh - self.size + 1), (), generator=g))
        left = int(torch.randint(0, max(1, rw - self.size + 1), (), generator=g))
        fy, fx = h / rh, w / rw
        return [left * fx, top * fy, min(w, (left + self.size) * fx), min(h, (top + self.size) * fy)]

    def _rrc_box(self, h: int, w: int, g) -> list[float]:
        # torchvision's own sampler (scale 0.08-1, aspect 3/4-4/3, ten tries, then a centre crop), run on a
        # private RNG state so that it draws from this image's seed and leaves the global generator alone
        from torchvision.transforms import RandomResizedCrop
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would reseed (and fork_rng not restore) CUDA's
            torch.default_generator.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
            i, j, ch, cw = RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, h, w), [0.08, 1.0],
                                                        [3 / 4, 4 / 3])
        return [float(j), float(i), float(j + cw), float(i + ch)]


def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int,
                batched: bool | None = None) -> torch.Tensor:
    """Crop each uint8 (3, H, W) image's box and resize it to size x size: uint8 (N, 3, size, size).

    On the CPU, image by image with torchvision's antialiased bilinear resize of the box rounded to whole
    pixels (its uint8 kernel: about 10x faster than RoIAlign there, docs/data.md). On a GPU,
    images of equal size together through RoIAlign on the exact box (one call per shape instead of
    several kernels per image). Both filters average the box's pixels into each output pixel; they differ
    by a level or so, and the boxes are the same. `batched` forces one path (None: by the boxes' device)."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=boxes.device)
    if batched is None:
        batched = boxes.device.type != "cpu"
    if not batched:
        from torchvision.transforms.v2 import functional as TF
        for i, (img, b) in enumerate(zip(images, boxes.tolist())):
            h, w = img.shape[-2:]
            top, left = min(h - 1, round(b[1])), min(w - 1, round(b[0]))
            bh, bw = max(1, min(h - top, round(b[3] - b[1]))), max(1, min(w - left, round(b[2] - b[0])))
            out[i] = TF.resized_crop(img, top, left, bh, bw, [size, size], antialias=True)
        return out
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    for idx in by_shape.values():
        x = torch.stack([images[i] for i in idx]).float()
        # index with a tensor sent without waiting: indexing a CUDA tensor with a list copies synchronously
        at = torch.tensor(idx, pin_memory=boxes.device.type == "cuda").to(boxes.device, non_blocking=True)
        rois = torch.cat([torch.arange(len(idx), dtype=boxes.dtype, device=boxes.device)[:, None], boxes[at]], 1)
        # aligned=True: box coordinates are pixel edges, so (0, 0, W, H) is exactly the whole image;
        # sampling_ratio -1: ceil(box/size) samples per output pixel and axis, averaged (shrinking antialiases)
        # the kernel itself, not torchvision.ops.roi_align: under deterministic algorithms that wrapper swaps in
        # a Python version that samples every input pixel for every output bin (hours for a batch of photos);
        # the forward kernel is deterministic already. Arguments: scale 1, S x S, sampling ratio, aligned
        y = torch.ops.torchvision.roi_align(x, rois, 1.0, size, size, -1, True)
        out[at] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


class Finish:
    """A batch of crops, uint8 (N, 3, S, S), to the network's input: flip where asked, scale to [0, 1], add
    each image's PCA lighting, normalise. All batched on `device`, whose constants are copied there once:
    a per-batch copy of a CPU tensor would make the host wait for the GPU's queue to drain."""

    def __init__(self, norm: Normalizer, device):
        self.device = torch.device(device)
        self.eigval, self.eigvec = PCA_EIGVAL.to(self.device), PCA_EIGVEC.to(self.device)
        self.norm, self.std = norm, norm.std.to(self.device)
        self.means: dict[tuple[int, int], torch.Tensor] = {}

    def mean_at(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self.means:
            self.means[h, w] = self.norm.mean_at(h, w).to(self.device)
        return self.means[h, w]

    def __call__(self, x: torch.Tensor, flip: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        dev = self.device
        flip, alpha = flip.to(dev, non_blocking=True), alpha.to(dev, non_blocking=True)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).float().div_(255)
        rgb = (alpha.float() * self.eigval) @ self.eigvec.T   # (N, 3): eigvec @ (alpha * eigval) per image
        x += rgb[:, :, None, None]
        return x.sub_(self.mean_at(*x.shape[-2:])).div_(self.std)
