"""Layer responses (paper Fig. 7): the standard deviation of each 3x3 layer's output after BN, before the
addition and the ReLU, on test images with the model in eval mode.

One value per 3x3 layer inside the residual stages: 6n for a 6n+2 CIFAR net (3n·block_layers with other
block depths), sum(layers)·block_layers for ImageNet basic nets, one per block (its 3x3) for bottlenecks;
the stem, the shortcuts (option B/C projections, the gates of gated shortcuts) and the BN on the sum
(`bn_after_add`) are not included. The std is taken over every element of the BN output
(images x channels x positions).
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BasicBlock, Bottleneck


def response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, BN module) for every BN that follows a 3x3 conv in the stages, in forward order."""
    out = []
    for sname, stage in zip(model.stage_names, model.stages()):
        for i, blk in enumerate(stage):
            if blk.preact:
                raise ValueError("layer responses are defined for post-activation blocks (BN after each conv)")
            if isinstance(blk, BasicBlock):
                out += [(f"{sname}.{i}.bn{k}", blk.layer(k)[1]) for k in range(1, blk.block_layers + 1)]
            elif isinstance(blk, Bottleneck):
                out += [(f"{sname}.{i}.bn2", blk.bn2)]
    return out


@torch.no_grad()
def layer_response_std(model: nn.Module, images: torch.Tensor, batch: int = 250) -> list[float]:
    """Std of each response layer's output over all images (eval mode), in forward order."""
    layers = response_layers(model)
    sums = torch.zeros(len(layers), 3, dtype=torch.float64)  # sum, sum of squares, count

    def hook(i):
        def fn(_m, _inp, out):
            o = out.double()
            sums[i] += torch.stack([o.sum(), o.square().sum(), torch.tensor(float(o.numel()), dtype=torch.float64)])
        return fn

    hooks = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    was = model.training
    model.eval()
    try:
        for x in images.split(batch):
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    mean = sums[:, 0] / sums[:, 2]
    return (sums[:, 1] / sums[:, 2] - mean.square()).clamp_min(0).sqrt().tolist()


def responses_for_runs(run_dirs, data_dir, n_images: int = 1000) -> dict:
    """{run name: [std per layer]} for the checkpoints of the given run folders, on the first `n_images`
    test images normalised as each run was trained."""
    from . import checkpoint as ckpt
    from .data import cifar
    out = {}
    test = None
    for d in run_dirs:
        ck = ckpt.load(d)
        if test is None:
            test = cifar.load(ck.get("data", {}).get("name", "cifar10"), "test", data_dir).images[:n_images]
        model = ckpt.load_model(ck)
        out[d.name] = {"arch": ck["model_config"]["name"], "step": ck["step"],
                       "std": layer_response_std(model, model.reslab["normalizer"](test))}
    return out
