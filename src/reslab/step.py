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


def autocast_for(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    if r.no_wd_bn_bias:
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": r.weight_decay}]
    return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov)


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
                 label_smoothing: float = 0.0):
        self.net, self.model, self.opt, self.scaler, self.ema = net, model, opt, scaler, ema
        self.ctx = autocast_for(device, precision)
        self.label_smoothing = label_smoothing
        self.acc = torch.zeros(4, dtype=torch.float64, device=device)
        self._one = torch.ones((), dtype=torch.float64, device=device)  # reused: no host->device copy per step

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Train on (x, y) at learning rate `lr`; returns the number of wrong predictions (a device scalar)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.ctx:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
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
