"""Evaluation protocols: loss, top-1 and top-5 error over exact distributed shards, and precise BN.

Views: a batch of images (N, C, H, W) is one view each; a 10-crop batch (N, 10, C, H, W) averages the
softmax scores of the ten crops; a multi-scale batch (a list of per-image lists of tensors of different
sizes) averages, over the scales, the softmax of the fully-convolutional score map's spatial mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .errors import ReslabError


def _mean_of_probs(logp: torch.Tensor, dim: int) -> torch.Tensor:
    """log of the mean of exp(logp) over `dim`, without leaving log space: a confidently wrong view keeps
    its true loss (averaging probabilities and taking the log would floor it at the float's smallest)."""
    return torch.logsumexp(logp, dim) - math.log(logp.shape[dim])


def log_probs(model: nn.Module, x) -> torch.Tensor:
    """Log of the (view-averaged) softmax scores, (N, classes) in float32."""
    if isinstance(x, list):  # multi-scale: one image at several sizes
        return torch.stack([_mean_of_probs(torch.cat([
            F.log_softmax(model.score_map(model.forward_features(v[None])).mean((2, 3)).float(), 1)
            for v in views]), 0) for views in x])
    if x.ndim == 5:  # (N, crops, C, H, W)
        n, k = x.shape[:2]
        return _mean_of_probs(F.log_softmax(model(x.flatten(0, 1)).float(), 1).view(n, k, -1), 1)
    return F.log_softmax(model(x).float(), 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast=None) -> dict:
    """Top-1/top-5 error and mean cross-entropy over every example of the (sharded) loader, summed over
    ranks: each example counts exactly once."""
    model = dist.unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 wrong, top5 wrong, n
    classes = 0
    ctx = autocast or torch.autocast(device.type, enabled=False)
    try:
        for x, y in loader:
            with ctx:
                logp = log_probs(model, x)
            logp = logp.float()
            classes = logp.shape[1]
            top = logp.topk(min(5, classes), 1).indices
            hit = top == y[:, None]
            sums[0] += F.nll_loss(logp, y, reduction="sum").double()
            sums[1] += (~hit[:, 0]).sum()
            sums[2] += (~hit.any(1)).sum()
            sums[3] += len(y)
    finally:
        model.train(was_training)
    dist.all_reduce_sum(sums)
    n = max(1.0, float(sums[3]))
    # top-5 of 5 classes or fewer is always right: "classes" lets a report say so instead of printing 0%
    return {"loss": float(sums[0]) / n, "top1_err": float(sums[1]) / n, "top5_err": float(sums[2]) / n,
            "n": int(sums[3]), "classes": classes}


@torch.no_grad()
def precise_bn(model: nn.Module, batches, num_batches: int) -> int:
    """Recompute every BN layer's running mean/var as the true average over `num_batches` training batches
    (what the paper's released models did), instead of the exponential moving average. `batches` is gone
    through again (the loader's next epoch) until that many came; a loader that yields fewer (none, when its
    batch is larger than the split and it drops the last) is an error, and so is a failure
    on the way (a corrupt image), with the statistics left as they were in both cases.
    Returns the number of batches used."""
    model = dist.unwrap(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches <= 0:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    stats = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    was_training = model.training
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: after k batches, the plain mean of k batch stats
    used = 0
    try:
        while used < num_batches:
            before = used
            for x, _ in batches:
                model(x)
                used += 1
                if used >= num_batches:
                    break
            if used == before:  # an epoch without a batch: no more will come
                break
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
        if used < num_batches:  # too few batches, or a failure (a corrupt image) on the way: a run saved after
            with torch.no_grad():  # it must not keep statistics half reset
                for m, st in zip(bns, stats):
                    m.load_state_dict(st)
    if used < num_batches:
        raise ReslabError(f"precise BN needs {num_batches} training batches and the training data gave none; "
                          "its batch is larger than the training split (use a smaller batch)")
    return used
