"""The timing harness: candidates built and warmed up first, then timed interleaved with their baseline in
rounds, so the baseline and the candidates run under the same machine load."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

@dataclass
class Setting:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    graphs: bool = False             # the step captured as one CUDA graph (GraphedStep)
    compile_mode: str | None = None  # torch.compile mode (None: its default)

    @property
    def label(self) -> str:
        comp = ([f"compile({self.compile_mode})" if self.compile_mode else "compile"] if self.compile else [])
        return "+".join([self.precision] + (["channels_last"] if self.channels_last else [])
                        + comp + (["graphs"] if self.graphs else []))

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
    drain: int = 0      # untimed steps before each timed segment: use up a prefetch queue refilled meanwhile


# pause before each timed segment: the previous candidate's DataLoader workers refill their prefetch queue
# right after it stops, and on a 2-core machine that would be charged to the next candidate
SETTLE_S = 0.3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(candidates: list[tuple], batch: int, device, plan: Plan) -> list[dict]:
    """Time candidates given as (label, factory[, runs]); a factory builds its model and data and returns a
    zero-argument function that runs one step (of each of its `runs` runs: images/s counts them all). The
    first candidate is the baseline. Returns one result dict per candidate."""
    built = []
    for label, factory, *runs in candidates:
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        step = factory()
        for _ in range(plan.warmup):
            step()
        sync(device)
        warm = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        built.append((label, step, warm, peak, runs[0] if runs else 1))
    rates = [[] for _ in built]
    for _ in range(plan.rounds):
        for i, (_, step, _, _, k) in enumerate(built):
            sync(device)
            time.sleep(SETTLE_S)
            for _ in range(plan.drain):
                step()
            sync(device)
            t = time.perf_counter()
            for _ in range(plan.steps):
                step()
            sync(device)
            rates[i].append(k * batch * plan.steps / (time.perf_counter() - t))
    out = []
    for (label, _, warm, peak, k), r in zip(built, rates):
        ratios = [a / b for a, b in zip(r, rates[0])]
        ips = statistics.median(r)
        out.append({"setting": label, "runs": k, "images_per_s": ips, "images_per_s_rounds": r,
                    "ratio": statistics.median(ratios), "ratio_rounds": ratios, "step_ms": 1000 * k * batch / ips,
                    "warmup_s": warm, "peak_mem_bytes": peak, "baseline_images_per_s": statistics.median(rates[0])})
    return out


