"""Weights in and out: reslab checkpoints, safetensors + JSON sidecar, and state dicts from elsewhere.

    reslab.load(path)   a reslab checkpoint (.pt), a converted file, or a .safetensors with its .json sidecar
                        -> a model in eval mode with .reslab = {classes, normalizer, config, crop_size}

Converters (`reslab convert SRC --from torchvision|cifar-repro --arch NAME --out FILE.pt`):
  torchvision  a torchvision ResNet state dict (v1.5): loaded into the same-depth reslab net with
               stride_in_1x1=False; outputs are identical.
  cifar-repro  the popular PyTorch CIFAR reproduction's checkpoints: {"state_dict": ...} with DataParallel's
               "module." prefix, the classifier named "linear", option A as a lambda that zero-pads
               channels on both sides; loaded into the reslab CIFAR net with zero_pad="both".
  timm         timm's resnet18/34/50/101/152 (torchvision's tensor names and v1.5 stride): a Hugging Face hub
               folder (config.json + model.safetensors or pytorch_model.bin) or a checkpoint of timm's
               train.py; the architecture, normalisation and class names come from the files.
A state dict is read from .safetensors or from a PyTorch file; wrapper prefixes ("module." from
DataParallel/DDP, "_orig_mod." from torch.compile, in either order) are removed.
"""
from __future__ import annotations

import argparse
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
    import os
    from .logs import write_json
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ck["model"].items()}
    tensors[_NORM_PREFIX + "mean"] = ck["normalizer"]["mean"].contiguous()
    tensors[_NORM_PREFIX + "std"] = ck["normalizer"]["std"].contiguous()
    # both files written beside their targets, then renamed: a kill leaves the old pair or the new one's
    # tensors, never a torn file
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out)
    meta = ck["model_config"]
    sidecar = out.with_suffix(".json")
    write_json(sidecar, {
        "format": "reslab-safetensors-1", "architecture": meta.get("name"), "model_config": meta,
        "shortcut": meta.get("shortcut"), "stride_variant": meta.get("stride_variant"),
        "normalization": ck["normalizer"]["mode"], "classes": ck.get("classes"),
        "crop_size": ckpt.crop_size_of(ck), "data": ckpt.data_of(ck)})
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
def _load_file(src):
    """What a weights file holds, read without running code from it."""
    if Path(src).suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise ReslabError(f"{src}: reading .safetensors needs the safetensors package: "
                              "pip install 'reslab[export]'") from None
        try:
            return load_file(str(src))
        except (SafetensorError, OSError) as e:
            raise ReslabError(f"{src}: not a readable safetensors file ({e})") from None
    # timm's train.py keeps its argparse.Namespace of options in every checkpoint; a namespace of plain values
    # is as safe to rebuild as the dicts around it, and without it the safe loader refuses the whole file
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        if allow is None:  # torch 2.4: only the process-wide list exists
            torch.serialization.add_safe_globals([argparse.Namespace])
            return torch.load(src, map_location="cpu", weights_only=True)
        with allow([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        # a whole pickled model is refused by the safe loader: say how to save what can be read safely
        hint = ("; if it holds a whole pickled model, load it where its code lives and save "
                "model.state_dict() instead" if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else "")
        raise ReslabError(f"{src}: not a readable PyTorch file ({type(e).__name__}){hint}") from None


# wrappers that prefix every tensor name: DataParallel/DDP ("module."), torch.compile ("_orig_mod."), nested
_WRAPPERS = ("module.", "_orig_mod.")


def _unwrap_names(sd: dict) -> dict:
    while sd and any(all(k.startswith(w) for k in sd) for w in _WRAPPERS):
        w = next(w for w in _WRAPPERS if all(k.startswith(w) for k in sd))
        sd = {k[len(w):]: v for k, v in sd.items()}
    return sd


def _read_state_dict(src, keys=("state_dict", "model")) -> tuple[dict, object, str | None]:
    """A state dict from a file as others write them: .safetensors, or a PyTorch file bare or under one of
    `keys` (the first present wins), zip or legacy (pre-1.6) serialisation, with or without `_metadata`,
    from PyTorch versions old enough that BatchNorm had no `num_batches_tracked` (the converters fill those
    in; see checkpoint.load_model_state). Returns (state dict, what the file held, the key it was under)."""
    whole = _load_file(src)
    obj, key = whole, None
    # the training scripts of pytorch/examples keep {"state_dict": ...}, torchvision's references {"model": ...}
    for k in keys:
        if isinstance(whole, dict) and isinstance(whole.get(k), dict):
            obj, key = whole[k], k
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReslabError(f"{src}: not a state dict (a dict of tensors, {{'state_dict': ...}} or {{'model': ...}})")
    return _unwrap_names(dict(obj)), whole, key


def _torchvision_layout(sd: dict, src, arch: str, source: str) -> ResNet:
    """A reslab v1.5 net holding a state dict in torchvision's names (torchvision's and timm's ResNets)."""
    if "fc.weight" not in sd:
        raise ReslabError(f"{src}: no classifier (fc.weight): the weights of a backbone without its head; "
                          "reslab converts whole classifiers")
    model = create_model(arch, stride_in_1x1=False, num_classes=sd["fc.weight"].shape[0])
    if model.cfg.family != "imagenet" or not model.cfg.residual:
        raise ReslabError(f"--from {source} needs an ImageNet-family ResNet (resnet18 ... resnet152), got {arch}")
    ckpt.load_model_state(model, sd, str(src), fill_bn_counters=True)
    return model


def convert_torchvision(src, arch: str | None) -> dict:
    if arch is None:
        raise ReslabError("--from torchvision needs --arch (resnet18 ... resnet152): the file does not say")
    sd, _, _ = _read_state_dict(src)
    model = _torchvision_layout(sd, src, arch, "torchvision")
    n = model.cfg.num_classes
    return weights_record(model, _channel_norm(IMAGENET), [str(i) for i in range(n)], f"torchvision:{src}")


def convert_cifar_repro(src, arch: str | None) -> dict:
    if arch is None:
        raise ReslabError("--from cifar-repro needs --arch (resnet20, resnet32, ...): the file does not say")
    sd, _, _ = _read_state_dict(src)
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


# timm's ResNets that are the paper's nets: the same tensor names as torchvision's, the same v1.5 stride; its
# other resnet* (…d, …t, …s: deep stems, average-pool shortcuts) are other networks
TIMM_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _hub_snapshot(p: Path) -> Path:
    """A Hugging Face cache entry (models--timm--NAME: refs/, snapshots/HASH/, blobs/) as the snapshot folder
    its refs/main names, or its only snapshot; any other path as it is."""
    snaps = p / "snapshots"
    if not (p.is_dir() and snaps.is_dir()):
        return p
    ref = p / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted(d for d in snaps.iterdir() if d.is_dir())
    if len(found) != 1:
        raise ReslabError(f"{p}: a Hugging Face cache entry with {len(found)} snapshots and no refs/main naming "
                          f"one; give the snapshot folder ({snaps}/HASH)")
    return found[0]


def _timm_files(src) -> tuple[Path, dict]:
    """The weights file and timm's config.json (or {}) for a hub folder or a weights file."""
    p = _hub_snapshot(Path(src))
    if p.is_dir():
        weights = next((p / n for n in _HUB_WEIGHTS if (p / n).is_file()), None)
        if weights is None:
            raise ReslabError(f"{p}: no {' or '.join(_HUB_WEIGHTS)} in this folder (a timm hub download has one)")
    elif p.is_file():
        weights = p
    else:
        raise ReslabError(f"{p}: no such file or folder")
    conf = {}
    side = weights.parent / "config.json"
    if weights.name in _HUB_WEIGHTS and side.is_file():  # a config.json beside other files may be anyone's
        try:
            conf = json.loads(side.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReslabError(f"{side}: not a readable JSON file ({type(e).__name__})") from None
        if not isinstance(conf, dict) or "architecture" not in conf:
            raise ReslabError(f"{side}: not timm's config.json (no 'architecture'); give the weights file "
                              f"and --arch, or the folder timm's hub download made")
    return weights, conf


def convert_timm(src, arch: str | None) -> dict:
    weights, conf = _timm_files(src)
    # timm's own loader prefers the EMA weights where a training checkpoint holds both; so does this
    sd, whole, key = _read_state_dict(weights, keys=("state_dict_ema", "model_ema", "state_dict", "model"))
    # a train.py checkpoint names the model it was asked for (args.model) only where it kept its args; without
    # them its "arch" is the model's class name ("resnet"), which names no depth
    said = conf.get("architecture") or (whole.get("arch") if isinstance(whole, dict) and "args" in whole else None)
    said = said.split(".")[0] if isinstance(said, str) else None  # "resnet50.a1_in1k": name.pretrained tag
    if said is not None and arch is not None and said != arch:
        raise ReslabError(f"{src} holds timm's {said}, not {arch}; leave --arch out or give --arch {said}")
    arch = arch or said
    if arch is None:
        raise ReslabError(f"{src}: the file does not name its architecture; give --arch ({', '.join(TIMM_ARCHS)})")
    if arch not in TIMM_ARCHS:
        raise ReslabError(f"timm's {arch} is not one of the paper's networks (its stem or shortcuts differ); "
                          f"reslab converts timm's {', '.join(TIMM_ARCHS)}")
    model = _torchvision_layout(sd, weights, arch, "timm")
    n = model.cfg.num_classes
    pre = conf.get("pretrained_cfg", conf)  # timm's older config.json kept it all in one dict
    mean, std = pre.get("mean", IMAGENET[0]), pre.get("std", IMAGENET[1])
    if len(mean) != 3 or len(std) != 3:
        raise ReslabError(f"{weights.parent / 'config.json'}: mean/std are not three channels: {mean}, {std}")
    source = f"timm:{weights}" + (f" ({key})" if key else "")
    return weights_record(model, _channel_norm((tuple(mean), tuple(std))), _timm_classes(conf, n), source)


def _timm_classes(conf: dict, n: int) -> list[str]:
    """Class names from timm's config.json: label_names (a list, or a dict by index; "labels" in older
    files), each put in words by label_descriptions where every one has a description (ImageNet's synsets
    "n01440764" -> "tench, Tinca tinca"); else the indices."""
    names = conf.get("label_names", conf.get("labels", (conf.get("pretrained_cfg") or {}).get("label_names")))
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(n)]
    if not isinstance(names, list) or len(names) != n or any(c is None for c in names):
        return [str(i) for i in range(n)]
    words = conf.get("label_descriptions")
    if isinstance(words, dict) and all(str(c) in words for c in names):
        return [str(words[str(c)]) for c in names]
    return [str(c) for c in names]


CONVERTERS = {"torchvision": convert_torchvision, "cifar-repro": convert_cifar_repro, "timm": convert_timm}


def refuse_to_overwrite(paths, force: bool) -> None:
    """Output files that exist already are a one-line error unless `force`: an --out mistyped as a run's
    last.pt would otherwise replace months of training with converted weights, silently."""
    taken = [str(p) for p in paths if Path(p).exists()]
    if taken and not force:
        one = len(taken) == 1
        raise ReslabError(f"{', '.join(taken)} already exist{'s' if one else ''}; choose another --out, or pass "
                          f"--force to replace {'it' if one else 'them'}")


def convert(src, source: str, arch: str | None, out, force: bool = False) -> dict:
    """Convert and save; returns the record written (its model_config names the architecture). An existing
    `out` is replaced only with `force`."""
    if source not in CONVERTERS:
        raise ReslabError(f"unknown source {source!r}; valid choices: {', '.join(CONVERTERS)}")
    out = Path(out)
    if out.is_dir():
        raise ReslabError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.pt'}")
    # a .safetensors --out gets safetensors and its sidecar (a pickle under that name would be read by nothing)
    as_safetensors = out.suffix == ".safetensors"
    refuse_to_overwrite([out, out.with_suffix(".json")] if as_safetensors else [out], force)
    rec = CONVERTERS[source](src, arch)
    if as_safetensors:
        save_safetensors(rec, out)
    else:
        ckpt.save_atomic(rec, out)
    return rec
