"""Benchmarks: training and inference throughput, each next to a baseline measured in the same run.

Training throughput is images/s of a full step (forward, backward, SGD). reslab's rows run the engine's own
TrainStep, so the bench times the code `reslab train` runs. Baselines: for the CIFAR nets, the same net in a
textbook eager fp32 loop fed by a torchvision DataLoader with per-sample transforms (the usual CIFAR
pipeline), against reslab's resident loader: both end to end, data included; for the 224x224 nets,
torchvision's ResNet in that eager loop, both on synthetic batches already on the device. Candidates run
interleaved with their baseline in rounds (shared machines drift; see `measure`). Achieved FLOP/s counts 6 x
forward MACs per trained image (2 per multiply-add, x3 for the backward pass) and 2 x MACs per inferred
image. No test asserts a speed.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
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

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format


@dataclass
class Plan:
    """How long to measure: `warmup` untimed steps per candidate (compilation happens there), then `rounds`
    rounds in which every candidate runs `steps` timed steps in turn. Interleaving puts the baseline and the
    candidates under the same machine load; the ratio is the median of the per-round ratios."""
    steps: int
    warmup: int
    rounds: int


# pause before each timed segment: the previous candidate's DataLoader workers refill their prefetch queue
# right after it stops, and on a 2-core machine that would be charged to the next candidate
SETTLE_S = 0.3


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(candidates: list[tuple[str, object]], batch: int, device, plan: Plan) -> list[dict]:
    """Time candidates given as (label, factory); a factory builds its model and data and returns a zero-argument
    function that runs one step. The first candidate is the baseline. Returns one result dict per candidate."""
    built = []
    for label, factory in candidates:
        _sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        step = factory()
        for _ in range(plan.warmup):
            step()
        _sync(device)
        warm = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        built.append((label, step, warm, peak))
    rates = [[] for _ in built]
    for _ in range(plan.rounds):
        for i, (_, step, _, _) in enumerate(built):
            _sync(device)
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            for _ in range(plan.steps):
                step()
            _sync(device)
            rates[i].append(batch * plan.steps / (time.perf_counter() - t))
    out = []
    for (label, _, warm, peak), r in zip(built, rates):
        ratios = [a / b for a, b in zip(r, rates[0])]
        ips = statistics.median(r)
        out.append({"setting": label, "images_per_s": ips, "images_per_s_rounds": r,
                    "ratio": statistics.median(ratios), "ratio_rounds": ratios, "step_ms": 1000 * batch / ips,
                    "warmup_s": warm, "peak_mem_bytes": peak, "baseline_images_per_s": statistics.median(rates[0])})
    return out


# both sides train at the paper's lr with its momentum and weight decay: same arithmetic, and a stable loss
# (a diverging one would time NaN/denormal arithmetic on the CPU)
LR = 0.1


def _plain_step(model, batches, device):
    """The baseline's training step: the textbook eager loop (fp32, contiguous, SGD)."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def step():
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _reslab_step(model, batches, device, s: Setting):
    """reslab's training step: the engine's own TrainStep with the paper's optimiser, under setting `s`."""
    from .engine import TrainStep, make_optimizer
    from .recipes import get_recipe
    model = model.to(device, memory_format=s.memory_format).train()
    opt = make_optimizer(model, get_recipe("cifar-paper"))
    net = torch.compile(model) if s.compile else model
    ts = TrainStep(net, model, opt, torch.amp.GradScaler(device.type, enabled=False), None, s.precision, device)
    return lambda: ts(*next(batches), LR)


def _synthetic(batch, size, num_classes, device, mem=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=mem)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return itertools.repeat((x, y))


def _inference_step(model, batch, size, device, s: Setting):
    model = model.to(device, memory_format=s.memory_format).eval()
    net = torch.compile(model) if s.compile else model
    x, _ = next(_synthetic(batch, size, 10, device, s.memory_format))
    ctx = autocast_for(device, s.precision)

    @torch.no_grad()
    def step():
        with ctx:
            net(x)
    return step


def _rows(arch, kind, batch, size, results, macs, dev_name, precisions) -> list[dict]:
    rows = []
    for res, prec in zip(results, precisions):
        flops = achieved(res["images_per_s"], macs, train=kind == "train")
        peak = peak_for(dev_name, prec)
        rows.append({"arch": arch, "kind": kind, "batch": batch, "size": size, **res, "tflops": flops / 1e12,
                     "peak_fraction": flops / peak if peak else None})
    return rows


def bench_imagenet(arch: str, device, batch: int, settings: list[Setting], plan: Plan, dev_name: str) -> list[dict]:
    """224x224 training: torchvision's ResNet (eager fp32) vs reslab's v1.5 twin under each setting."""
    import torchvision
    macs = count_macs(create_model(arch, stride_in_1x1=False))
    torch.manual_seed(0)
    cands = [("torchvision fp32 (baseline)",
              lambda: _plain_step(getattr(torchvision.models, arch)(), _synthetic(batch, 224, 1000, device), device))]
    cands += [(s.label, lambda s=s: _reslab_step(create_model(arch, stride_in_1x1=False),
                                                  _synthetic(batch, 224, 1000, device, s.memory_format), device, s))
              for s in settings]
    res = measure(cands, batch, device, plan)
    return _rows(arch + " (v1.5)", "train", batch, 224, res, macs, dev_name, ["fp32"] + [s.precision for s in settings])


def bench_cifar(arch: str, device, batch: int, settings: list[Setting], plan: Plan, dev_name: str,
                images=None) -> list[dict]:
    """CIFAR training end to end (data + step): the baseline pipeline (DataLoader + per-sample transforms +
    the textbook eager loop) vs reslab's resident loader + engine step under each setting.
    `images`: (uint8 (N,3,32,32), labels), else synthetic."""
    from .data import Normalizer, ResidentLoader
    if images is None:
        g = torch.Generator().manual_seed(0)
        images = (torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (4096,), generator=g))
    x, y = images
    macs = count_macs(create_model(arch))
    norm = Normalizer.fit(x)
    torch.manual_seed(0)
    cands = [("DataLoader+transforms fp32 (baseline)",
              lambda: _plain_step(create_model(arch), _baseline_batches(x, y, batch, device), device))]
    cands += [(s.label, lambda s=s: _reslab_step(
        create_model(arch), _forever(ResidentLoader(x, y, batch, norm, train=True, device=device,
                                                    channels_last=s.channels_last)), device, s))
              for s in settings]
    res = measure(cands, batch, device, plan)
    return _rows(arch, "train", batch, 32, res, macs, dev_name, ["fp32"] + [s.precision for s in settings])


def bench_inference(arch: str, device, batch: int, size: int, settings: list[Setting], plan: Plan,
                    dev_name: str) -> list[dict]:
    """Forward passes in eval mode: eager fp32 contiguous (baseline) vs each setting."""
    kw = {"stride_in_1x1": False} if size > 32 else {}
    macs = count_macs(create_model(arch, **kw), size)
    torch.manual_seed(0)
    base = Setting()
    cands = [("eager fp32 (baseline)", lambda: _inference_step(create_model(arch, **kw), batch, size, device, base))]
    cands += [(s.label, lambda s=s: _inference_step(create_model(arch, **kw), batch, size, device, s))
              for s in settings if s != base]
    res = measure(cands, batch, device, plan)
    precs = ["fp32"] + [s.precision for s in settings if s != base]
    return _rows(arch + (" (v1.5)" if kw else ""), "infer", batch, size, res, macs, dev_name, precs)


def bench_data(device, batch: int, plan: Plan, folder_images: int = 256) -> list[dict]:
    """Augmented images/s of the data pipelines alone (a step = one batch): the resident CIFAR loader vs the
    baseline DataLoader; and the ImageNet-style folder loader (paper training augmentation) on synthetic
    JPEGs, which has no baseline."""
    import tempfile
    from .data import Normalizer, ResidentLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (8192,), generator=g)

    def stepper(it):
        return lambda: next(it)

    res = measure([("cifar DataLoader+transforms (baseline)", lambda: stepper(_baseline_batches(x, y, batch, device))),
                   ("cifar resident loader", lambda: stepper(_forever(
                       ResidentLoader(x, y, batch, Normalizer.fit(x), train=True, device=device))))],
                  batch, device, plan)
    with tempfile.TemporaryDirectory() as tmp:
        from .data import folder
        _write_jpegs(tmp, folder_images)
        ds = folder.ImageFolderSplit(tmp, "train", folder.train_transform(folder.imagenet_normalizer()))
        dl = folder.make_loader(ds, 8, train=True, workers=2)
        fres = measure([("folder loader, paper augmentation, 2 workers", lambda: stepper(_on(dl, device)))], 8,
                       device, Plan(max(1, plan.steps // 4), 1, plan.rounds))
        fres[0]["ratio"] = fres[0]["ratio_rounds"] = fres[0]["baseline_images_per_s"] = None
    return [{"arch": "-", "kind": "data", "batch": b, "size": None, **r, "tflops": 0.0, "peak_fraction": None}
            for r, b in zip(res + fres, [batch, batch, 8])]


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
        imagenet_archs=None, rounds: int | None = None) -> dict:
    """The whole benchmark; `rounds` overrides the number of interleaved rounds of every group."""
    from .dist import pick_device
    from .logs import environment, hardware_line
    dev = pick_device(device)
    env = environment()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else env["cpu"]
    gpu = dev.type == "cuda"
    if quick:
        plan, plan224 = Plan(steps=2, warmup=1, rounds=2), None
    else:
        plan, plan224 = (Plan(20, 10, 5), Plan(10, 5, 3)) if gpu else (Plan(4, 2, 5), Plan(2, 1, 2))
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {rounds}")
        plan = Plan(plan.steps, plan.warmup, rounds)
        plan224 = plan224 and Plan(plan224.steps, plan224.warmup, rounds)
    settings = [Setting("fp32", False, False), Setting("fp32", True, False)]
    if gpu:
        settings += [Setting("bf16", True, False), Setting("bf16", True, True)]
    elif not quick:  # what --compile adds to the CPU defaults
        settings += [Setting("fp32", True, True)]
    groups = [lambda: bench_data(dev, 128, Plan(8, 2, 2) if quick else Plan(40, 4, rounds or 5),
                                 folder_images=16 if quick else 256)]
    for a in archs or (["resnet8"] if quick else ["resnet20", "resnet56", "resnet110"]):
        groups.append(lambda a=a: bench_cifar(a, dev, 128 if not quick else 16, settings, plan, dev_name))
        groups.append(lambda a=a: bench_inference(a, dev, 256 if not quick else 16, 32, settings, plan, dev_name))
    if not quick:
        # compiling the 224x224 nets on a 2-core CPU costs more than the few steps measured there
        s224 = settings if gpu else [s for s in settings if not s.compile]
        for a in ["resnet18", "resnet50"] if imagenet_archs is None else imagenet_archs:
            groups.append(lambda a=a: bench_imagenet(a, dev, 256 if gpu else 64, s224, plan224, dev_name))
            groups.append(lambda a=a: bench_inference(a, dev, 256 if gpu else 64, 224, s224, plan224, dev_name))
    rows = []
    for group in groups:
        done = group()
        rows += done
        for r in done:  # progress: a full CPU run takes a while
            ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] else ""
            print(f"{r['arch']} {r['kind']} {r['setting']}: {r['images_per_s']:,.0f} img/s{ratio}",
                  file=sys.stderr, flush=True)
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
             "Training step = forward + backward + SGD; TFLOP/s = 6 x MACs x images/s. Each candidate ran "
             "interleaved with its baseline: images/s is the median over rounds (range in brackets), the "
             "ratio the median of per-round ratios. Warm-up includes compilation.", "",
             "| model | setting | batch | images/s | vs baseline | TFLOP/s | of peak | warm-up | peak mem |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] else "-"
        mem = f"{r['peak_mem_bytes'] / 2**30:.1f} GiB" if r.get("peak_mem_bytes") else "-"
        what = f"{r['arch']} ({r['kind']})" if r["kind"] != "train" else r["arch"]
        lo, hi = min(r["images_per_s_rounds"]), max(r["images_per_s_rounds"])
        fmt = ",.0f" if r["images_per_s"] >= 100 else ".1f"
        lines.append(f"| {what} | {r['setting']} | {r['batch']} | {r['images_per_s']:{fmt}} ({lo:{fmt}}-{hi:{fmt}}) "
                     f"| {ratio} | {r['tflops']:.2f} | {frac} | {r['warmup_s']:.1f} s | {mem} |")
    return "\n".join(lines) + "\n"
