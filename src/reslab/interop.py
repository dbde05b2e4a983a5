"""Weights in and out: reslab checkpoints, safetensors + JSON sidecar, and state dicts from elsewhere.

    reslab.load(path)   a reslab checkpoint (.pt), a converted file, or a .safetensors with its .json sidecar
                        -> a model in eval mode with .reslab = {classes, normalizer, config, crop_size}

Converters (`reslab convert SRC --from torchvision|cifar-repro --arch NAME --out FILE.pt`):
  torchvision  a torchvision ResNet state dict (v1.5): loaded into the same-depth reslab net with
               stride_in_1x1=False; outputs are identical.
  cifar-repro  the popular PyTorch CIFAR reproduction's checkpoints: {"state_dict": ...} with DataParallel's
               "module." prefix, the classifier named "linear", option A as a lambda that zero-pads
               channels on both sides; loaded into the reslab CIFAR net with zero_pad="both".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data.normalize import Normalizer
from .errors import ReslabError
from .resnet import ResNet
from .zoo import create_model

# Normalisations the sources used (facts about them, not tunable here)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_REPRO = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # that reproduction normalised with these too


def _channel_norm(mean_std) -> Normalizer:
    mean, std = mean_std
    return Normalizer("channel", torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1))


def weights_record(model: ResNet, normalizer: Normalizer, classes: list[str], source: str) -> dict:
    """The minimal checkpoint that load/predict/eval/export accept."""
    return {"model": model.state_dict(), "model_config": model.metadata, "normalizer": normalizer.state_dict(),
            "classes": list(classes), "source": source, "step": None}


def load(path) -> ResNet:
    p = Path(path)
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    return ckpt.load_model(p)


# ------------------------------------------------------------------ safetensors
_NORM_PREFIX = "reslab_normalizer."


def save_safetensors(ck: dict, out: Path) -> tuple[Path, Path]:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ReslabError("safetensors export needs the safetensors package: pip install 'reslab[export]'") from None
    out = Path(out)
    tensors = {k: v.contiguous() for k, v in ck["model"].items()}
    tensors[_NORM_PREFIX + "mean"] = ck["normalizer"]["mean"].contiguous()
    tensors[_NORM_PREFIX + "std"] = ck["normalizer"]["std"].contiguous()
    save_file(tensors, str(out))
    meta = ck["model_config"]
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({
        "format": "reslab-safetensors-1", "architecture": meta.get("name"), "model_config": meta,
        "shortcut": meta.get("shortcut"), "stride_variant": meta.get("stride_variant"),
        "normalization": ck["normalizer"]["mode"], "classes": ck.get("classes"),
        "crop_size": ckpt.crop_size_of(ck), "data": ckpt.data_of(ck)}, indent=2))
    return out, sidecar


def _load_safetensors(p: Path) -> ResNet:
    from safetensors.torch import load_file
    sidecar = p.with_suffix(".json")
    if not sidecar.is_file():
        raise ReslabError(f"{p}: the JSON sidecar {sidecar.name} (architecture, normalisation, classes) is missing")
    try:
        side = json.loads(sidecar.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReslabError(f"{sidecar}: not a readable JSON file ({type(e).__name__})") from None
    missing = [k for k in ("model_config", "normalization") if not isinstance(side, dict) or k not in side]
    if missing:
        raise ReslabError(f"{sidecar}: the sidecar lacks {', '.join(missing)}; write it again with reslab export")
    tensors = load_file(str(p))
    if not {_NORM_PREFIX + "mean", _NORM_PREFIX + "std"} <= set(tensors):
        raise ReslabError(f"{p}: no {_NORM_PREFIX}mean/std tensors (not written by reslab export)")
    norm = Normalizer(side["normalization"], tensors.pop(_NORM_PREFIX + "mean"), tensors.pop(_NORM_PREFIX + "std"))
    model = ckpt.build_model(side["model_config"])
    ckpt.load_model_state(model, tensors, str(p))
    classes = side.get("classes")
    if classes is not None and len(classes) != model.cfg.num_classes:
        raise ReslabError(f"{sidecar}: {len(classes)} class names for a model with {model.cfg.num_classes} outputs")
    model.reslab = {"classes": side.get("classes"), "normalizer": norm, "config": side["model_config"],
                    "crop_size": side.get("crop_size"), "data": side.get("data")}
    return model.eval()


# ------------------------------------------------------------------ converters
def _read_state_dict(src) -> dict:
    """A state dict from a file as others write them: bare or under "state_dict", zip or legacy (pre-1.6)
    serialisation, with or without `_metadata`, from PyTorch versions old enough that BatchNorm had no
    `num_batches_tracked` (the converters fill those in; see checkpoint.load_model_state)."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        # a whole pickled model is refused by the safe loader: say how to save what can be read safely
        hint = ("; if it holds a whole pickled model, load it where its code lives and save "
                "model.state_dict() instead" if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else "")
        raise ReslabError(f"{src}: not a readable PyTorch file ({type(e).__name__}){hint}") from None
    # the training scripts of pytorch/examples keep {"state_dict": ...}, torchvision's references {"model": ...}
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReslabError(f"{src}: not a state dict (a dict of tensors, {{'state_dict': ...}} or {{'model': ...}})")
    # DataParallel / DistributedDataParallel wrote every name behind "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def convert_torchvision(src, arch: str, num_classes: int | None = None) -> dict:
    sd = _read_state_dict(src)
    n = num_classes or (sd["fc.weight"].shape[0] if "fc.weight" in sd else 1000)
    model = create_model(arch, stride_in_1x1=False, num_classes=n)
    if model.cfg.family != "imagenet" or not model.cfg.residual:
        raise ReslabError(f"--from torchvision needs an ImageNet-family ResNet (resnet18 ... resnet152), got {arch}")
    ckpt.load_model_state(model, sd, str(src), fill_bn_counters=True)
    return weights_record(model, _channel_norm(IMAGENET), [str(i) for i in range(n)], f"torchvision:{src}")


def convert_cifar_repro(src, arch: str) -> dict:
    sd = _read_state_dict(src)
    renamed = {}
    for k, v in sd.items():
        k = "fc." + k[len("linear."):] if k.startswith("linear.") else k
        renamed[k] = v
    n = renamed["fc.weight"].shape[0] if "fc.weight" in renamed else 10
    model = create_model(arch, zero_pad="both", num_classes=n)
    # a plain net has exactly an option-A ResNet's tensors: loading would succeed and silently drop the
    # shortcuts the weights were trained with
    if model.cfg.family != "cifar" or not model.cfg.residual:
        raise ReslabError(f"--from cifar-repro needs a CIFAR ResNet (resnet20, resnet56, ...; the reproduction "
                          f"has no plain nets), got {arch}")
    ckpt.load_model_state(model, renamed, str(src), fill_bn_counters=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return weights_record(model, _channel_norm(CIFAR_REPRO), classes if n == 10 else [str(i) for i in range(n)],
                          f"cifar-repro:{src}")


CONVERTERS = {"torchvision": convert_torchvision, "cifar-repro": convert_cifar_repro}


def convert(src, source: str, arch: str, out) -> Path:
    if source not in CONVERTERS:
        raise ReslabError(f"unknown source {source!r}; valid choices: {', '.join(CONVERTERS)}")
    rec = CONVERTERS[source](src, arch)
    ckpt.save_atomic(rec, out)
    return Path(out)
