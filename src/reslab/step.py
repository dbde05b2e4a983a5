"""The training step and what it is made of: precision, optimiser, EMA.

Precision: "fp32", "bf16" (autocast), "fp16" (autocast + GradScaler). One code path for all three: the
autocast context is a no-op for fp32 and the scaler is disabled unless fp16.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .recipes import Recipe

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_runtime(rt, device: torch.device):
    """Fill a Runtime's automatic choices with the fast defaults for `device` (README: Performance)."""
    prec = rt.precision if rt.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if prec not in PRECISIONS:
        raise ValueError(f"unknown precision {prec!r}; valid choices: auto, {', '.join(PRECISIONS)}")
    return replace(rt, precision=prec, channels_last=True if rt.channels_last is None else rt.channels_last,
                   compile=bool(rt.compile))


def autocast_for(device: torch.device, precision: str, cache: bool = True):
    """The one precision context. `cache=False` for CUDA graph capture: autocast's cast cache would hold
    casts made during capture that a replay must redo."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def make_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """The paper's SGD. Its learning rate is a tensor on the model's device and its update the fused kernel:
    one pass over the weights per step, and a step a CUDA graph can capture (the lr is read on the device,
    never through a host float)."""
    if r.no_wd_bn_bias:
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": r.weight_decay}]
    lr = torch.tensor(r.lr, device=next(model.parameters()).device)
    return torch.optim.SGD(groups, lr=lr, momentum=r.momentum, nesterov=r.nesterov, fused=True)


def make_ema(model: nn.Module, decay: float):
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class TrainStep:
    """One optimisation step exactly as the loop runs it; `reslab bench` times this same object.

    Per-step statistics stay on the device (no host sync): `acc` holds the running loss sum, wrong
    predictions, images seen and non-finite steps until the next log line reads and clears it.
    """

    def __init__(self, net, model, opt, scaler, ema, precision: str, device: torch.device,
                 label_smoothing: float = 0.0, acc: torch.Tensor | None = None):
        self.net, self.model, self.opt, self.scaler, self.ema = net, model, opt, scaler, ema
        self.precision, self.device = precision, device
        self.ctx = autocast_for(device, precision)
        self.label_smoothing = label_smoothing
        self.acc = torch.zeros(4, dtype=torch.float64, device=device) if acc is None else acc
        self._one = torch.ones((), dtype=torch.float64, device=device)  # reused: no host->device copy per step
        self.lr = torch.tensor(0.0, device=device)

    def set_lr(self, lr: float) -> None:
        """Write the step's lr into the one device tensor every param group reads (a resumed optimiser
        brings its own tensors from the checkpoint: they are replaced by this one)."""
        self.lr.fill_(lr)
        for g in self.opt.param_groups:
            if g["lr"] is not self.lr:
                g["lr"] = self.lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Train on (x, y) at learning rate `lr`; returns the number of wrong predictions (a device scalar)."""
        self.set_lr(lr)
        self.opt.zero_grad(set_to_none=True)
        return self.update(x, y, self.ctx)

    def update(self, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        """Forward, backward, optimiser, EMA, statistics: device work only, so it can be captured."""
        with ctx:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        with torch.no_grad():
            loss = loss.detach().double()
            wrong = (logits.argmax(1) != y).sum()
            self.acc += torch.stack([loss * len(y), wrong.double(), self._one * len(y),
                                     (~torch.isfinite(loss)).double()])
        return wrong


def graph_fallback(device: torch.device, precision: str, loader, ema, distributed: bool, compiled: bool,
                   sync_bn: bool, asked: bool = False) -> str | None:
    """Why the training step is not captured as a CUDA graph here (None: it is). `asked`: --graphs given."""
    from .data.resident import ResidentLoader
    reasons = [
        (device.type != "cuda", "CUDA graphs need a CUDA device"),
        (precision == "fp16", "the fp16 GradScaler decides on the host whether to skip a step"),
        # a folder batch is copied into the graph's input buffers (GivenBatch); whether that beats the eager
        # step for 224x224 nets, whose launches are few beside their arithmetic, is for a GPU bench to show
        (not isinstance(loader, ResidentLoader) and not asked,
         "image folders: the graphed step is opt-in (--graphs) until measured faster on a GPU"),
        (distributed, "DDP's gradient all-reduce is not captured here (one process per GPU runs eagerly)"),
        (compiled, "--compile has its own graphs (--compile-mode reduce-overhead)"),
        (sync_bn, "SyncBatchNorm communicates between processes"),
        (ema is not None, "the EMA update branches on the host on its first step"),
    ]
    return next((why for bad, why in reasons if bad), None)


class GivenBatch:
    """The batch source of a graphed step whose batches arrive whole (image folders, the bench's synthetic
    batches): GraphedStep copies each (images, labels) into its static buffers, and the graph takes them as
    they are. (The resident loader instead hands over indices and gathers the batch inside the graph.)"""

    @staticmethod
    def batch_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y


class GraphedStep:
    """The whole training step — augmentation gather, forward, loss, backward, fused SGD, BN statistics and
    the on-device counters — captured once as a CUDA graph and replayed. Between replays only the lr tensor
    and the graph's inputs change: from the resident loader two small index tensors (images, crop/flip
    variants), from which the graph gathers the batch itself; from any other source (`GivenBatch`: image
    folders, the bench's synthetic batches) the whole batch, copied into the graph's buffers. Evaluation and
    checkpoints stay outside the graph and read the same tensors.

    Capture needs warm-up steps (cuDNN picks its algorithms, the optimiser makes its momentum buffers), and
    those must not count: every weight, buffer, momentum buffer and counter is restored afterwards, momentum
    buffers that did not exist to zeros (SGD's first step, buf = grad, is the same as 0.9 * 0 + grad).
    """

    WARMUP = 3

    def __init__(self, step: TrainStep, loader):
        self.step, self.loader = step, loader
        self.ctx = autocast_for(step.device, step.precision, cache=False)
        self.graph = None
        self.idx = self.variant = self.wrong = None

    def __call__(self, idx: torch.Tensor, variant: torch.Tensor, lr: float) -> torch.Tensor:
        if self.graph is not None and (idx.shape != self.idx.shape or variant.shape != self.variant.shape):
            # a graph replays one shape, and every training loader drops its last partial batch: another shape
            # is a bug in the caller, not a batch to take some other way
            raise RuntimeError(f"the graphed step was captured for batches of {tuple(self.idx.shape)}, "
                               f"got {tuple(idx.shape)}")
        if self.graph is None:
            self.idx, self.variant = torch.empty_like(idx), torch.empty_like(variant)
        self.idx.copy_(idx, non_blocking=True)
        self.variant.copy_(variant, non_blocking=True)
        self.step.set_lr(lr)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.wrong

    def _body(self) -> torch.Tensor:
        x, y = self.loader.batch_of(self.idx, self.variant)
        return self.step.update(x, y, self.ctx)

    def _capture(self) -> None:
        s = self.step
        before = snapshot(s)
        side = torch.cuda.Stream(s.device)
        side.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                s.opt.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream(s.device).wait_stream(side)
        restore(s, before)
        s.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread allocating pinned memory during the capture is not
        # this thread's work, and under the default (global) mode it would invalidate the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.wrong = self._body()


def snapshot(step: TrainStep) -> dict:
    """Copies of everything a training step changes, keyed by the tensor's identity."""
    opt_state = [t for st in step.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {id(t): (t, t.detach().clone())
            for t in [*step.model.parameters(), *step.model.buffers(), step.acc, *opt_state]}


@torch.no_grad()
def restore(step: TrainStep, saved: dict) -> None:
    """Undo the steps taken since `snapshot`: every tensor back to its copy, in place (a captured graph
    keeps pointing at the same memory), and momentum buffers created since then to zero — SGD's first
    step (buf = grad) is exactly 0.9 * 0 + grad."""
    for t, copy in saved.values():
        t.copy_(copy)
    for st in step.opt.state.values():
        buf = st.get("momentum_buffer")
        if isinstance(buf, torch.Tensor) and id(buf) not in saved:
            buf.zero_()
