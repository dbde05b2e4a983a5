"""Where a CPU training step's time goes: torch.profiler over the step `reslab train` runs (the engine's
TrainStep on the resident loader, the paper's SGD, reslab's CPU defaults), its operators grouped by kind.

    python benchmarks/profile_step.py [--arch resnet20] [--batch 128] [--steps 10]

Prints each group's share of the profiled time (self time of its operators) and the step's rate while
profiled (the profiler's own overhead included, so below `reslab bench`'s). This is a diagnosis, not a
benchmark: the comparisons against a baseline are `reslab bench`'s.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from reslab.bench.cases import _resident_step, synthetic_cifar
from reslab.bench.harness import Setting
from reslab.config import Runtime
from reslab.step import resolve_runtime

# first match wins (so addmm is the classifier's before "aten::add" claims it); an operator matching none is
# "other" (allocation, copies, the loader's gather and flips)
GROUPS = [("loss, pooling, classifier", ("cross_entropy", "log_softmax", "nll_loss", "avg_pool", "mean",
                                          "addmm", "aten::mm", "linear")),
          ("convolution", ("convolution", "conv2d", "mkldnn_conv", "cudnn_conv")),
          ("batch norm", ("batch_norm",)),
          ("relu", ("relu", "threshold", "clamp_min")),
          ("addition (shortcut)", ("aten::add", "aten::add_")),
          ("optimizer", ("_fused_sgd", "sgd", "foreach"))]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    device = torch.device("cpu")
    rt = resolve_runtime(Runtime(), device)  # what `reslab train` would choose on this device
    s = Setting(rt.precision, channels_last=rt.channels_last)
    x, y, norm = synthetic_cifar()
    step = _resident_step(a.arch, x, y, a.batch, norm, device, s)
    for _ in range(5):  # warm-up: oneDNN primitives, allocator
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        wall = time.perf_counter() - t0
    shares: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):  # self times of operators: nested ones are not counted twice
            shares[group_of(ev.key)] = shares.get(group_of(ev.key), 0.0) + ev.self_cpu_time_total
    total = sum(shares.values())
    print(f"{a.arch}, batch {a.batch}, {s.label}, cpu ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}: {a.steps * a.batch / wall:.0f} img/s while profiled")
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {group:28s} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
