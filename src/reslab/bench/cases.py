"""The benchmark cases: each builds its candidates (reslab under several settings) and its same-run baseline,
measures them with the harness, and returns rows of the stable schema
(`arch`, `kind`, `setting`, `batch`, `images_per_s`, `ratio`, ...)."""
from __future__ import annotations

import torch

from ..complexity import count_macs
from ..step import autocast_for
from ..zoo import create_model
from .baselines import LR, baseline_batches, forever, plain_step, synthetic
from .flops import achieved, peak_for
from .harness import Plan, Setting, measure


def reslab_step(model, batches, device, s: Setting, loader=None):
    """reslab's training step: the engine's own TrainStep with the paper's optimiser, under setting `s`;
    with `s.graphs`, the engine's GraphedStep, which takes (indices, variants) plans from the resident
    `loader` and gathers the batch inside the graph, or without a loader copies each of `batches` in."""
    from ..recipes import get_recipe
    from ..step import TrainStep, make_optimizer
    model = model.to(device, memory_format=s.memory_format).train()
    opt = make_optimizer(model, get_recipe("cifar-paper"))
    net = torch.compile(model, mode=s.compile_mode) if s.compile else model
    ts = TrainStep(net, model, opt, torch.amp.GradScaler(device.type, enabled=False), None, s.precision, device)
    return stepper(ts, batches, s, loader)


def stepper(ts, batches, s: Setting, loader=None):
    """One training step per call: `ts` on the next of `batches`, or with `s.graphs` the GraphedStep of `ts`,
    fed index plans by `loader` (which gathers the batch inside the graph) or, without one, `batches`."""
    from ..step import GivenBatch, GraphedStep
    if s.graphs and loader is None:  # whole batches, copied into the graph's buffers
        graphed = GraphedStep(ts, GivenBatch())
        return lambda: graphed(*next(batches), LR)
    if s.graphs:
        plans, graphed = forever_plans(loader), GraphedStep(ts, loader)
        return lambda: graphed(*next(plans), LR)
    return lambda: ts(*next(batches), LR)


def forever_plans(loader):
    while True:
        yield from loader.plans()


def inference_step(model, batch, size, device, s: Setting):
    model = model.to(device, memory_format=s.memory_format).eval()
    net = torch.compile(model, mode=s.compile_mode) if s.compile else model
    x, _ = next(synthetic(batch, size, 10, device, s.memory_format))
    ctx = autocast_for(device, s.precision)

    @torch.no_grad()
    def step():
        with ctx:
            net(x)
    return step


def rows_for(arch, kind, batch, size, results, macs, dev_name, precisions) -> list[dict]:
    rows = []
    for res, prec in zip(results, precisions):
        flops = achieved(res["images_per_s"], macs, train=kind in ("train", "e2e"))
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
              lambda: plain_step(getattr(torchvision.models, arch)(), synthetic(batch, 224, 1000, device), device))]
    cands += [(s.label, lambda s=s: reslab_step(create_model(arch, stride_in_1x1=False),
                                                  synthetic(batch, 224, 1000, device, s.memory_format), device, s))
              for s in settings]
    res = measure(cands, batch, device, plan)
    return rows_for(arch + " (v1.5)", "train", batch, 224, res, macs, dev_name, ["fp32"] + [s.precision for s in settings])


def bench_cifar(arch: str, device, batch: int, settings: list[Setting], plan: Plan, dev_name: str,
                images=None) -> list[dict]:
    """CIFAR training end to end (data + step): the baseline pipeline (DataLoader + per-sample transforms +
    the textbook eager loop) vs reslab's resident loader + engine step under each setting.
    `images`: (uint8 (N,3,32,32), labels), else synthetic."""
    from ..data import Normalizer
    if images is None:
        g = torch.Generator().manual_seed(0)
        images = (torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (4096,), generator=g))
    x, y = images
    macs = count_macs(create_model(arch))
    norm = Normalizer.fit(x)
    torch.manual_seed(0)
    cands = [("DataLoader+transforms fp32 (baseline)",
              lambda: plain_step(create_model(arch), baseline_batches(x, y, batch, device), device))]
    cands += [(s.label, lambda s=s: _resident_step(arch, x, y, batch, norm, device, s)) for s in settings]
    res = measure(cands, batch, device, plan)
    return rows_for(arch, "train", batch, 32, res, macs, dev_name, ["fp32"] + [s.precision for s in settings])


def _resident_step(arch, x, y, batch, norm, device, s: Setting):
    from ..data import ResidentLoader
    loader = ResidentLoader(x, y, batch, norm, train=True, device=device, channels_last=s.channels_last)
    return reslab_step(create_model(arch), forever(loader), device, s, loader)


def synthetic_cifar(n: int = 4096):
    """uint8 CIFAR-sized images, labels and their normaliser (the run-set and fused rows' data)."""
    from ..data import Normalizer
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))
    return x, y, Normalizer.fit(x)


def bench_runsets(arch: str, device, batch: int, s: Setting, ks: tuple[int, ...], plan: Plan,
                  dev_name: str) -> list[dict]:
    """K runs of one net trained together (a RunSet: one step of each run in turn, each on its own CUDA stream
    on a GPU) against one run alone, eager, under the same setting: aggregate images/s, and the `runs` field
    says K. Synthetic CIFAR-sized data on the device."""
    x, y, norm = synthetic_cifar()
    macs = count_macs(create_model(arch))
    eager = Setting(s.precision, s.channels_last, s.compile, graphs=False)

    def runset(k):
        steps = [_resident_step(arch, x, y, batch, norm, device, s) for _ in range(k)]
        streams = [torch.cuda.Stream(device) if device.type == "cuda" and k > 1 else None for _ in range(k)]

        def step():
            for fn, st in zip(steps, streams):
                if st is None:
                    fn()
                else:
                    with torch.cuda.stream(st):
                        fn()
        return step

    cands = [(f"{eager.label}, 1 run (baseline)", lambda: _resident_step(arch, x, y, batch, norm, device, eager), 1)]
    cands += [(f"{s.label}, {k} runs", lambda k=k: runset(k), k) for k in ks]
    res = measure(cands, batch, device, plan)
    return rows_for(arch, "train", batch, 32, res, macs, dev_name, [s.precision] * len(cands))


def bench_fused(arch: str, device, batch: int, s: Setting, ks: tuple[int, ...], plan: Plan,
                dev_name: str) -> list[dict]:
    """Design (b) next to bench_runsets' design (a): K runs of one net as one FusedResNet (grouped convs,
    K*C-channel BNs; src/reslab/fused.py), each member on its own batch stream, one step for all K, against
    the same baseline (one run alone, eager) under the same setting. With `s.graphs` the fused step is
    captured by the engine's GraphedStep, which gathers all K members' batches inside the graph.
    images/s is the aggregate over the K members; `runs` says K."""
    x, y, norm = synthetic_cifar()
    macs = count_macs(create_model(arch))
    eager = Setting(s.precision, s.channels_last, s.compile, graphs=False)
    cands = [(f"{eager.label}, 1 run (baseline)", lambda: _resident_step(arch, x, y, batch, norm, device, eager), 1)]
    cands += [(f"{s.label}, fused {k} runs", lambda k=k: _fused_step(arch, k, x, y, batch, norm, device, s), k)
              for k in ks]
    res = measure(cands, batch, device, plan)
    return rows_for(arch, "train", batch, 32, res, macs, dev_name, [s.precision] * len(cands))


def _fused_step(arch, k, x, y, batch, norm, device, s: Setting):
    from ..data import ResidentLoader
    from ..fused import FusedBatches, FusedResNet, fused_train_step
    from ..recipes import get_recipe
    base = ResidentLoader(x, y, batch, norm, train=True, device=device, channels_last=s.channels_last)
    batches = FusedBatches([base.fork(i) for i in range(k)])  # one copy of the data, K seeds
    model = FusedResNet.create(arch, seeds=range(k)).to(device, memory_format=s.memory_format).train()
    net = torch.compile(model, mode=s.compile_mode) if s.compile else model
    ts = fused_train_step(model, get_recipe("cifar-paper"), s.precision, device, net=net)
    return stepper(ts, forever(batches), s, batches)


def bench_inference(arch: str, device, batch: int, size: int, settings: list[Setting], plan: Plan,
                    dev_name: str) -> list[dict]:
    """Forward passes in eval mode: eager fp32 contiguous (baseline) vs each setting."""
    kw = {"stride_in_1x1": False} if size > 32 else {}
    macs = count_macs(create_model(arch, **kw), size)
    torch.manual_seed(0)
    base = Setting()
    cands = [("eager fp32 (baseline)", lambda: inference_step(create_model(arch, **kw), batch, size, device, base))]
    cands += [(s.label, lambda s=s: inference_step(create_model(arch, **kw), batch, size, device, s))
              for s in settings if s != base]
    res = measure(cands, batch, device, plan)
    precs = ["fp32"] + [s.precision for s in settings if s != base]
    return rows_for(arch + (" (v1.5)" if kw else ""), "infer", batch, size, res, macs, dev_name, precs)


def bench_data(device, batch: int, plan: Plan) -> list[dict]:
    """Augmented images/s of the CIFAR pipelines alone (a step = one batch): the resident loader vs the
    baseline DataLoader. (Image folders: bench.e2e.)"""
    from ..data import ResidentLoader
    x, y, norm = synthetic_cifar(8192)
    res = measure([("cifar DataLoader+transforms (baseline)", lambda: next_of(baseline_batches(x, y, batch, device))),
                   ("cifar resident loader", lambda: next_of(forever(
                       ResidentLoader(x, y, batch, norm, train=True, device=device))))],
                  batch, device, plan)
    return data_rows(res, batch)


def next_of(it):
    """A data pipeline as a bench step: drawing its next batch."""
    return lambda: next(it)


def data_rows(results: list[dict], batch: int, size: int | None = None) -> list[dict]:
    """Rows of kind `data` (no model: no FLOPs)."""
    return [{"arch": "-", "kind": "data", "batch": batch, "size": size, **r, "tflops": 0.0, "peak_fraction": None}
            for r in results]



