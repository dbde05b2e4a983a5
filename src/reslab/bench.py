"""Benchmarks: training and inference throughput, each next to a baseline measured in the same run.

Training throughput is images/s of a full step (forward, backward, SGD) on synthetic batches already on
the device; achieved FLOP/s counts 6 x forward MACs per trained image (2 per multiply-add, x3 for the
backward pass) and 2 x MACs per inferred image. Baselines: torchvision's ResNet (eager, fp32, contiguous)
for the 224x224 models; for the CIFAR nets the same net in eager fp32 fed by a torchvision DataLoader with
per-sample transforms (the usual CIFAR pipeline), next to reslab's resident loader. No test asserts a speed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .complexity import count_macs
from .engine import autocast_for
from .zoo import create_model

# dense peak FLOP/s by device name fragment and precision (vendor datasheets; leads, not measurements)
PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}, "H200": {"bf16": 989e12, "fp16": 989e12,
                                                                             "fp32": 494e12},
         "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}}


def train_flops_per_image(macs: int) -> float:
    return 6.0 * macs


def achieved(images_per_s: float, macs: int, train: bool = True) -> float:
    return images_per_s * (train_flops_per_image(macs) if train else 2.0 * macs)


def peak_for(device_name: str, precision: str) -> float | None:
    for key, table in PEAKS.items():
        if key in device_name:
            return table.get(precision)
    return None


@dataclass
class Setting:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        return "+".join([self.precision] + (["channels_last"] if self.channels_last else [])
                        + (["compile"] if self.compile else []))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_steps(model, batch: int, size: int, device, s: Setting, steps: int, warmup: int,
                     batches=None) -> dict:
    """images/s of full training steps; `batches` (an iterator of (x, y)) replaces synthetic data."""
    mem = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mem).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    net = torch.compile(model) if s.compile else model
    ctx = autocast_for(device, s.precision)
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=mem)
    y0 = torch.randint(0, model.fc.out_features, (batch,), generator=g).to(device)

    def step():
        x, y = next(batches) if batches is not None else (x0, y0)
        with ctx:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"images_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps, "peak_mem_bytes": peak}


@torch.no_grad()
def time_inference(model, batch: int, size: int, device, s: Setting, steps: int, warmup: int) -> dict:
    mem = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mem).eval()
    net = torch.compile(model) if s.compile else model
    x = torch.randn(batch, 3, size, size).to(device).contiguous(memory_format=mem)
    ctx = autocast_for(device, s.precision)
    for _ in range(warmup):
        with ctx:
            net(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        with ctx:
            net(x)
    _sync(device)
    return {"images_per_s": batch * steps / (time.perf_counter() - t)}


def _row(arch, kind, setting, batch, size, res, macs, baseline_ips, dev_name) -> dict:
    flops = achieved(res["images_per_s"], macs, train=kind == "train")
    peak = peak_for(dev_name, setting.precision if isinstance(setting, Setting) else "fp32")
    return {"arch": arch, "kind": kind, "setting": setting.label if isinstance(setting, Setting) else setting,
            "batch": batch, "size": size, **res, "baseline_images_per_s": baseline_ips,
            "ratio": res["images_per_s"] / baseline_ips if baseline_ips else None, "tflops": flops / 1e12,
            "peak_fraction": flops / peak if peak else None}


def bench_imagenet(arch: str, device, batch: int, settings: list[Setting], steps: int, warmup: int,
                   dev_name: str) -> list[dict]:
    import torchvision
    macs = count_macs(create_model(arch, stride_in_1x1=False))
    torch.manual_seed(0)
    base = time_train_steps(getattr(torchvision.models, arch)(), batch, 224, device, Setting(), steps, warmup)
    rows = [_row(arch, "train", "torchvision fp32 (baseline)", batch, 224, base, macs, base["images_per_s"], dev_name)]
    for s in settings:
        r = time_train_steps(create_model(arch, stride_in_1x1=False), batch, 224, device, s, steps, warmup)
        rows.append(_row(arch + " (v1.5)", "train", s, batch, 224, r, macs, base["images_per_s"], dev_name))
    return rows


def bench_cifar(arch: str, device, batch: int, settings: list[Setting], steps: int, warmup: int,
                dev_name: str, images=None) -> list[dict]:
    """CIFAR training: the baseline pipeline (DataLoader + per-sample transforms + eager fp32) vs reslab's
    resident loader with each setting. `images`: (uint8 (N,3,32,32), labels) or synthetic."""
    from .data import Normalizer, ResidentLoader
    if images is None:
        g = torch.Generator().manual_seed(0)
        images = (torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (4096,), generator=g))
    x, y = images
    macs = count_macs(create_model(arch))
    base = time_train_steps(create_model(arch), batch, 32, device, Setting(), steps, warmup,
                            batches=_baseline_batches(x, y, batch, device))
    rows = [_row(arch, "train", "DataLoader+transforms fp32 (baseline)", batch, 32, base, macs,
                 base["images_per_s"], dev_name)]
    norm = Normalizer.fit(x)
    for s in settings:
        loader = ResidentLoader(x, y, batch, norm, train=True, device=device, channels_last=s.channels_last)
        r = time_train_steps(create_model(arch), batch, 32, device, s, steps, warmup, batches=_forever(loader))
        rows.append(_row(arch, "train", s, batch, 32, r, macs, base["images_per_s"], dev_name))
    return rows


def bench_inference(arch: str, device, batch: int, size: int, settings: list[Setting], steps: int, warmup: int,
                    dev_name: str) -> list[dict]:
    macs = count_macs(create_model(arch), size)
    base = time_inference(create_model(arch), batch, size, device, Setting(), steps, warmup)
    rows = [_row(arch, "infer", "eager fp32 (baseline)", batch, size, base, macs, base["images_per_s"], dev_name)]
    for s in settings[1:]:
        r = time_inference(create_model(arch), batch, size, device, s, steps, warmup)
        rows.append(_row(arch, "infer", s, batch, size, r, macs, base["images_per_s"], dev_name))
    return rows


def bench_data(device, batch: int, seconds: float, dev_name: str, folder_images: int = 256) -> list[dict]:
    """Augmented images/s of the data pipelines alone: the resident CIFAR loader vs the baseline
    DataLoader; and the ImageNet-style folder loader (paper training augmentation) on synthetic JPEGs."""
    import tempfile
    from .data import Normalizer, ResidentLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (8192,), generator=g)

    def rate(it):
        next(it)  # start-up (workers) outside the timing
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            xb, _ = next(it)
            n += len(xb)
        _sync(device)
        return {"images_per_s": n / (time.perf_counter() - t)}

    base = rate(_baseline_batches(x, y, batch, device))
    res = rate(_forever(ResidentLoader(x, y, batch, Normalizer.fit(x), train=True, device=device)))
    rows = [_data_row("cifar DataLoader+transforms (baseline)", batch, base, base),
            _data_row("cifar resident loader", batch, res, base)]
    with tempfile.TemporaryDirectory() as tmp:
        from .data import folder
        _write_jpegs(tmp, folder_images)
        ds = folder.ImageFolderSplit(tmp, "train", folder.train_transform(folder.imagenet_normalizer()))
        dl = folder.make_loader(ds, 8, train=True, workers=2)
        rows.append(_data_row("folder loader, paper augmentation, 2 workers", 8,
                              rate(_on(dl, device)), None))
    return rows


def _on(loader, device):
    """Endless batches from a (re-iterable) DataLoader, moved to the device."""
    for xb, yb in _forever(loader):
        yield xb.to(device, non_blocking=True), yb


def _write_jpegs(root: str, n: int) -> None:
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        d = Path(root) / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        arr = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=rng).numpy()
        Image.fromarray(arr).save(d / f"{i}.JPEG", quality=90)


def _data_row(name, batch, res, base) -> dict:
    b = base["images_per_s"] if base else None
    return {"arch": "-", "kind": "data", "setting": name, "batch": batch, "size": None, **res,
            "baseline_images_per_s": b, "ratio": res["images_per_s"] / b if b else None, "tflops": 0.0,
            "peak_fraction": None}


def _forever(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:  # an empty epoch would otherwise spin forever
            raise ValueError("the loader yields no batches (fewer examples than one batch?)")


def _baseline_batches(x, y, batch, device):
    """The common CIFAR pipeline: PIL images, per-sample RandomCrop(32, padding=4) + flip + ToTensor +
    Normalize, a DataLoader with 2 workers."""
    import torchvision.transforms as T
    from PIL import Image

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y
            self.t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.t(Image.fromarray(self.x[i])), int(self.y[i])

    dl = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=2, drop_last=True,
                                     persistent_workers=True, pin_memory=device.type == "cuda")
    while True:
        for xb, yb in dl:
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def run(device: str = "auto", quick: bool = False, out: str | None = None, archs=None,
        imagenet_archs=None) -> dict:
    from .dist import pick_device
    from .logs import environment, hardware_line
    dev = pick_device(device)
    env = environment()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else env["cpu"]
    gpu = dev.type == "cuda"
    steps, warmup = (3, 1) if quick else ((50, 10) if gpu else (10, 2))
    settings = [Setting("fp32", False, False), Setting("fp32", True, False)]
    if gpu:
        settings += [Setting("bf16", True, False), Setting("bf16", True, True)]
    rows = bench_data(dev, 128, 0.5 if quick else 5.0, dev_name, folder_images=16 if quick else 256)
    cifar_archs = archs or (["resnet8"] if quick else ["resnet20", "resnet56", "resnet110"])
    for a in cifar_archs:
        rows += bench_cifar(a, dev, 128 if not quick else 16, settings, steps, warmup, dev_name)
        rows += bench_inference(a, dev, 256 if not quick else 16, 32, settings, steps, warmup, dev_name)
    if not quick:
        for a in ["resnet18", "resnet50"] if imagenet_archs is None else imagenet_archs:
            rows += bench_imagenet(a, dev, 256 if gpu else 64, settings, steps, warmup, dev_name)
            rows += bench_inference(a, dev, 256 if gpu else 64, 224, settings, steps, warmup, dev_name)
    result = {"machine": hardware_line(env), "device": dev_name, "env": env,
              "date": time.strftime("%Y-%m-%d"), "quick": quick, "rows": rows}
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2))
        p.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# Benchmark: {result['machine']} ({result['date']})", "",
             f"torch {result['env']['torch']}, torchvision {result['env']['torchvision']}. "
             "Training step = forward + backward + SGD; TFLOP/s = 6 x MACs x images/s.", "",
             "| model | setting | batch | images/s | vs baseline | TFLOP/s | of peak | peak mem |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] else "-"
        mem = f"{r['peak_mem_bytes'] / 2**30:.1f} GiB" if r.get("peak_mem_bytes") else "-"
        what = f"{r['arch']} ({r['kind']})" if r["kind"] != "train" else r["arch"]
        lines.append(f"| {what} | {r['setting']} | {r['batch']} | {r['images_per_s']:,.0f} | {ratio} | "
                     f"{r['tflops']:.2f} | {frac} | {mem} |")
    return "\n".join(lines) + "\n"
