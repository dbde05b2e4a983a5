"""Using trained checkpoints: rebuild the model they hold and evaluate it with the paper's protocols."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data import build as data_build
from .data.augment import Augment
from .dist import pick_device
from .evaluate import evaluate, precise_bn


def evaluate_checkpoint(path, data_dir=None, view: str = "center", device: str = "auto",
                        precise_bn_batches: int = 0, batch_size: int = 256, workers: int = 4,
                        decode: str = "auto") -> dict:
    """A checkpoint's model on its own dataset and evaluation split, with its own normalisation."""
    p = ckpt.resolve(path)
    ck = ckpt.load(p)
    dev = pick_device(device)
    model = ckpt.load_model(ck, name=str(p)).to(dev)
    cfg = ck.get("config") or {}
    info = ck.get("data") or {}
    # converted weights record no data: an ImageNet net is evaluated on an image folder (--data-dir)
    data_name = info.get("name") or ("cifar10" if model.cfg.family == "cifar" else "folder")
    data_dir = data_dir or (cfg.get("data") or {}).get("dir") or (ck.get("run") or {}).get("data_dir")
    # precise BN averages the statistics of batches of the size the run's BN layers saw (the statistics of
    # batches of another size are other numbers); converted weights record none: the evaluation batch
    train_batch = (cfg.get("recipe") or {}).get("batch_size") or batch_size
    if not (cfg.get("runtime") or {}).get("sync_bn"):  # without sync BN each rank normalised its own share
        train_batch = max(1, train_batch // _world_size(ck, p))
    data = data_build.build(data_name, data_dir, batch_size=train_batch, device=dev,
                            val_split=info.get("eval_split") == "val5k", normalizer=model.reslab["normalizer"],
                            view=view, workers=workers, eval_batch=batch_size, with_train=precise_bn_batches > 0,
                            seed=cfg.get("seed", 0), augment=augment_of(cfg), decode=decode)
    data_build.check_classes(ck.get("classes"), data, f"evaluating {p}")
    if precise_bn_batches:
        precise_bn(model, data.train, precise_bn_batches)
    m = evaluate(model, data.eval)
    return {"checkpoint": str(p), "arch": ck["model_config"].get("name"), "data": data_name,
            "split": data.eval_split, "view": view, "step": ck.get("step"), **m}


def _world_size(ck: dict, path: Path) -> int:
    """The ranks a run trained on: its checkpoint says so (from 2026-12), earlier ones the config.json beside
    them; otherwise one."""
    if ck.get("world_size"):
        return int(ck["world_size"])
    if not ck.get("config"):  # converted weights: a config.json beside them is some other run's
        return 1
    try:
        return int(json.loads((path.parent / "config.json").read_text()).get("world_size") or 1)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def augment_of(cfg: dict) -> Augment:
    """The crop a checkpoint's run trained with (older checkpoints: the paper's, at 224)."""
    r = cfg.get("recipe") or {}
    return Augment.for_size(r.get("crop", "scale"), r.get("crop_size", 224))


def image_paths(inputs) -> list[Path]:
    """Files as given, folders expanded (recursively) to their images, in sorted order (hidden files and
    folders left out)."""
    from .data.images import IMAGE_SUFFIXES, is_image_file
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q, p, IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image or folder")
    if not out:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return out


def preprocess(img_uint8: torch.Tensor, family: str, crop_size: int | None = None, data: str | None = None) -> torch.Tensor:
    """Decoded (3, H, W) uint8 -> the view the network was tested on, decided by the data it trained on:
    CIFAR arrays are 32x32 whatever the net (resize the shorter side to 32, centre crop); an image folder's
    test view is the resize to 256 and centre 224 (paper §3.4), at the crop size it trained with, as `reslab
    eval` takes it. Weights without a record of their data (converted) follow their family."""
    from .data.folder import center_view
    cifar = _cifar(family, data)
    size = view_size(family, crop_size, data)
    return center_view(size, resize=size if cifar else None)(img_uint8)  # CIFAR: no border cropped off


def _cifar(family: str, data: str | None) -> bool:
    return data.startswith("cifar") if data else family == "cifar"


def view_size(family: str, crop_size: int | None = None, data: str | None = None) -> int:
    """The side of the test view `preprocess` makes: 32 for nets trained on CIFAR arrays, else the crop the
    run trained with (224 unless it chose another)."""
    return 32 if _cifar(family, data) else crop_size or 224


@torch.no_grad()
def predict(path, inputs, top: int = 5, batch_size: int = 64, device: str = "auto") -> list[dict]:
    """Top-k classes with probabilities for each image, with the checkpoint's normalisation and class names."""
    from .data.images import decode
    from .interop import load
    model = load(path)
    dev = pick_device(device)
    model.to(dev)
    norm, classes = model.reslab["normalizer"], model.reslab["classes"]
    files = image_paths(inputs)
    k = min(top, model.cfg.num_classes)
    results = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        x = torch.stack([preprocess(decode(str(f), upright=True), model.cfg.family, model.reslab.get("crop_size"),
                                    model.reslab.get("data")) for f in chunk])
        probs = torch.softmax(model(norm(x).to(dev)).float(), 1).cpu()
        p, idx = probs.topk(k, 1)
        for f, pi, ii in zip(chunk, p, idx):
            results.append({"image": str(f), "top": [
                {"class": classes[j] if classes else str(int(j)), "index": int(j), "prob": float(q)}
                for q, j in zip(pi, ii)]})
    return results
