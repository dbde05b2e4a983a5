"""ImageNet-style JPEG folders end to end: files on disk to a trained step, and to evaluation views.

The folder is written by the benchmark itself: photograph-like JPEGs of about 500x375 at quality 90 (smooth
colour fields with grain, so files are the size of ImageNet's average, not of incompressible noise). Rows:

  data   JPEGs -> augmented batch on the device, no model: the textbook torchvision pipeline (PIL decode,
         RandomResizedCrop, flip, ToTensor, Normalize in DataLoader workers; the baseline) vs reslab's folder
         pipeline decoding in the workers (cpu) and, on a GPU, batched on the device (nvJPEG).
  e2e    the same pipelines feeding a training step (the textbook one: torchvision's net, eager fp32; reslab's:
         its engine step under the device's default setting), plus reslab's step on one synthetic
         device-resident batch: the step alone, the ceiling the pipeline should reach.
  eval   10-crop and multi-scale evaluation of JPEGs, images/s, workers' decode (baseline) vs device decode.

A pipeline with workers keeps a queue of prefetched batches; each timed segment is preceded by `drain`
untimed steps (Plan.drain), so the queue that filled while other candidates ran is used up before the clock
starts, and the rate is the pipeline's steady state.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..complexity import count_macs
from ..data import folder
from ..data.augment import Augment
from ..data.build import FolderStream
from ..step import autocast_for
from ..zoo import create_model
from .baselines import forever, plain_step, synthetic
from .harness import Plan, Setting, measure


def write_photos(root, n: int, split: str = "train", size=(375, 500), quality: int = 90, classes: int = 4) -> float:
    """n photograph-like JPEGs under root/split/c<k>/; returns their mean size in kB."""
    from PIL import Image
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        d = Path(root) / split / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
        arr = np.asarray(field, np.float32) + rng.normal(0, 18, (*size, 3))
        f = d / f"{i}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(f, quality=quality)
        total += f.stat().st_size
    return total / max(1, n) / 1000


def repeat_epoch(samples: list, batch: int, workers: int) -> list:
    """The file list repeated until an epoch holds at least four times the batches the workers keep in
    flight (2 each): each new epoch hands its first batches to all workers at once, and an epoch shorter
    than the queue would time that start-up rather than the steady state."""
    reps = max(1, -(-4 * 2 * max(1, workers) * batch // max(1, len(samples))))
    return samples * reps


def textbook_batches(root, batch: int, workers: int, device, size: int = 224):
    """The common ImageNet pipeline (pytorch/examples' recipe): PIL decode and per-sample transforms in
    DataLoader workers, pinned memory."""
    import torchvision
    import torchvision.transforms as T
    t = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                   T.Normalize(folder.IMAGENET_MEAN, folder.IMAGENET_STD)])
    ds = torchvision.datasets.ImageFolder(str(Path(root) / "train"), t)
    ds.samples = repeat_epoch(ds.samples, batch, workers)
    dl = torch.utils.data.DataLoader(ds, batch, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in forever(dl))


def reslab_batches(root, batch: int, workers: int, device, decode: str, size: int = 224, mem=None):
    """reslab's folder pipeline, as training builds it: the paper's scale augmentation drawn per image,
    decoded in the workers ("cpu") or on the device ("device")."""
    ds = folder.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", size), encoded=decode == "device")
    ds.samples = repeat_epoch(ds.samples, batch, workers)
    stream = FolderStream(folder.make_loader(ds, batch, train=True, workers=workers),
                          folder.Finisher(ds, device, folder.imagenet_normalizer()))
    mem = mem or torch.contiguous_format
    return ((x.contiguous(memory_format=mem), y) for x, y in forever(stream))


def decoders(device) -> list[str]:
    return ["cpu", "device"] if device.type == "cuda" else ["cpu"]


def bench_folder(arch: str, device, batch: int, s: Setting, plan: Plan, dev_name: str, *, images: int,
                 workers: int, size: int = 224) -> list[dict]:
    """`data` and `e2e` rows on a folder of `images` photographs written here (see the module docstring)."""
    import tempfile
    import torchvision
    from .cases import data_rows, next_of, reslab_step, rows_for
    with tempfile.TemporaryDirectory() as tmp:
        kb = write_photos(tmp, images)
        tag = f", {workers} workers, {kb:.0f} kB JPEGs"
        cands = [(f"torchvision DataLoader (baseline){tag}",
                  lambda: next_of(textbook_batches(tmp, batch, workers, device, size)))]
        cands += [(f"reslab, decode={d}{tag}", lambda d=d: next_of(reslab_batches(tmp, batch, workers, device, d, size)))
                  for d in decoders(device)]
        data = measure(cands, batch, device, plan)
        rows = data_rows(data, batch, size)

        def model():
            return create_model(arch, stride_in_1x1=False)  # v1.5, torchvision's twin
        cands = [(f"torchvision {arch} fp32, torchvision DataLoader (baseline){tag}",
                  lambda: plain_step(getattr(torchvision.models, arch)(),
                                     textbook_batches(tmp, batch, workers, device, size), device))]
        cands += [(f"{s.label}, decode={d}{tag}",
                   lambda d=d: reslab_step(model(), reslab_batches(tmp, batch, workers, device, d, size, s.memory_format),
                                           device, s)) for d in decoders(device)]
        if device.type == "cuda":  # the graphed step (`--graphs`): each decoded batch copied into the graph
            g = replace(s, graphs=True)
            cands += [(f"{g.label}, decode=device{tag}",
                       lambda: reslab_step(model(), reslab_batches(tmp, batch, workers, device, "device", size,
                                                                   g.memory_format), device, g))]
        cands += [(f"{s.label}, synthetic batch on the device (step alone)",
                   lambda: reslab_step(model(), synthetic(batch, size, 1000, device, s.memory_format), device, s))]
        e2e = measure(cands, batch, device, plan)
    macs = count_macs(model(), size)
    return rows + rows_for(f"{arch} (v1.5)", "e2e", batch, size, e2e, macs, dev_name,
                           ["fp32"] + [s.precision] * (len(e2e) - 1))


def bench_eval_views(arch: str, device, s: Setting, plan: Plan, dev_name: str, *, images: int, workers: int,
                     batch: int = 250) -> list[dict]:
    """10-crop and multi-scale evaluation of `images` photographs: images/s (each image counts once, whatever
    its number of views), the workers decoding (baseline) vs the device decoding."""
    import tempfile
    from ..evaluate import log_probs
    from .cases import rows_for
    net = create_model(arch, stride_in_1x1=False)
    # multi-scale sees the whole 4:3 photograph at each shorter side: 4/3 of the square's work
    macs = {"10crop": 10 * count_macs(net, 224),
            "multiscale": round(4 / 3 * sum(count_macs(net, k) for k in folder.MULTISCALE_SIZES))}
    net = net.to(device, memory_format=s.memory_format).eval()
    norm, ctx = folder.imagenet_normalizer(), autocast_for(device, s.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kb = write_photos(tmp, images, split="val")
        for view in ("10crop", "multiscale"):
            per = 1 if view == "multiscale" else max(1, batch // 10)
            t = folder.eval_transform(norm, view)

            def views(decode):
                ds = folder.ImageFolderSplit(tmp, "val", None if decode == "device" else t, encoded=decode == "device")
                stream = FolderStream(folder.make_loader(ds, per, train=False, workers=workers,
                                                         multiscale=view == "multiscale"),
                                      folder.Finisher(ds, device, norm, t))
                it = forever(stream)

                @torch.no_grad()
                def step():
                    x, _ = next(it)
                    with ctx:
                        log_probs(net, x)
                return step
            cands = [(f"{s.label}, {view}, decode={d}{' (baseline)' if i == 0 else ''}, {workers} workers, {kb:.0f} kB",
                      lambda d=d: views(d)) for i, d in enumerate(decoders(device))]
            # one image per step at multi-scale, each costing ~18 centre views: five times the steps
            p = plan if view == "10crop" else Plan(plan.steps * 5, plan.warmup, plan.rounds, plan.drain)
            res = measure(cands, per, device, p)
            rows += rows_for(f"{arch} (v1.5)", "eval", per, 224, res, macs[view], dev_name, [s.precision] * len(res))
    return rows


def default_workers() -> int:
    """Leave two cores to the main process (and the GPU's driver thread); at least one worker."""
    return max(1, min(12, (os.cpu_count() or 2) - 2))
