"""Using trained checkpoints: rebuild the model they hold and evaluate it with the paper's protocols."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data import build as data_build
from .data.normalize import Normalizer
from .dist import pick_device
from .evaluate import evaluate, precise_bn
from .resnet import ResNet, ResNetConfig


def model_from_checkpoint(ck: dict, key: str = "model") -> ResNet:
    cfg = dict(ck["model_config"])
    for k in ("depth", "stride_variant"):
        cfg.pop(k, None)
    cfg["layers"] = tuple(cfg["layers"])
    model = ResNet(ResNetConfig(**cfg))
    ckpt.load_model_state(model, ck[key], "checkpoint")
    return model


def evaluate_checkpoint(path, data_dir=None, view: str = "center", device: str = "auto",
                        precise_bn_batches: int = 0, batch_size: int = 256, workers: int = 4) -> dict:
    p = ckpt.resolve(path)
    ck = ckpt.load(p)
    dev = pick_device(device)
    model = model_from_checkpoint(ck).to(dev)
    run = ck.get("run", {})
    data_name = ck.get("data", {}).get("name", "cifar10")
    data_dir = data_dir or run.get("data_dir")
    norm = Normalizer.from_state_dict(ck["normalizer"])
    val_split = ck.get("data", {}).get("eval_split") == "val5k"
    data = data_build.build(data_name, data_dir, batch_size=batch_size, device=dev, val_split=val_split,
                            normalizer=norm, view=view, workers=workers, eval_batch=batch_size,
                            with_train=precise_bn_batches > 0, seed=run.get("seed", 0))
    if precise_bn_batches:
        precise_bn(model, iter(data.train), precise_bn_batches)
    m = evaluate(model, data.eval)
    return {"checkpoint": str(p), "arch": ck["model_config"].get("name"), "data": data_name,
            "split": data.eval_split, "view": view, "step": ck.get("step"), **m}
