"""Checkpoints: one layout, atomic writes, and one way back from a file to a model.

A checkpoint is a dict of tensors, numbers, strings and lists only, so `torch.load(weights_only=True)` reads
it. The layout (FORMAT) is `TrainingState.state_dict()` (state.py):

  format            FORMAT
  config            the run's RunConfig (config.py) as a dict; authoritative on --resume
  model             the unwrapped model's state dict (never module./_orig_mod. prefixes)
  model_config      ResNetConfig metadata: `build_model` rebuilds the network from it
  normalizer, classes, data     what evaluation and prediction need (data: name, split, sizes, identity)
  step, finished, best_err, metrics      the run's status, read by `read_status` without the rest
  world_size        the number of ranks it trained on (from 2026-12; earlier runs say it in config.json)
  world_sizes       the ranks of each session whose steps it holds, where they changed (from 2026-12-06)
  eval_pending      saved before an evaluation that failed: the resume evaluates `step` first (finished is
                    false until it has)
  train             what only resuming needs: optimizer, scaler, ema, schedule, loader position, elapsed,
                    counters (the sums behind the next log line and warm-up rule check)

Weights-only files (`reslab convert`, earlier reslab versions) hold model, model_config, normalizer and
classes; everything that only uses a model (`load_model`) accepts them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ReslabError

LAST, BEST = "last.pt", "best.pt"
FORMAT = 2


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target: a crash at any
    moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        usual_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def usual_mode(path, folder: bool = False) -> None:
    """Give a file (or folder) from `tempfile` the mode a plain open() (mkdir) would: tempfile makes them
    private (0600/0700), so a checkpoint or dataset cache written through one could not be read by the
    user's group, unlike every other file reslab writes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def remove_stale_temporaries(folder: Path) -> None:
    """A process killed inside save_atomic leaves its temporary file behind; the next run removes it."""
    for p in Path(folder).glob(".*.pt.*.tmp"):
        p.unlink(missing_ok=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its last checkpoint)."""
    p = Path(path)
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        best = p.with_name(BEST) if p.name == LAST and p.parent.is_dir() else None
        hint = (f"; the folder holds {BEST}, the run's best evaluation: give {best}" if best and best.is_file()
                else f" (give a .pt file or a run folder with {LAST})")
        raise FileNotFoundError(f"no checkpoint at {p}{hint}")
    return p


def load(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Read a reslab checkpoint (any format). `mmap=True` maps the tensors instead of reading them: the
    cheap way to look at the small entries of a large file."""
    p = resolve(path)
    _refuse_export(p)  # before torch.load, which warns about a TorchScript archive and may hand it to torch.jit
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many types for bad files (struct.error, UnpicklingError, ...)
        raise ReslabError(f"{p}: not a readable reslab checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ReslabError(f"{p}: not a reslab checkpoint (no 'model' and 'model_config' entries)")
    return ck


def _refuse_export(p: Path) -> None:
    """A one-line error when the file is one of `reslab export`'s network-only formats."""
    import zipfile
    kind = "an ONNX" if p.suffix == ".onnx" else None
    try:
        with zipfile.ZipFile(p) as z:  # a TorchScript archive holds the network's code beside its tensors
            kind = "a TorchScript" if any("/code/" in n for n in z.namelist()) else kind
    except zipfile.BadZipFile:
        # under another suffix, an ONNX file (a protobuf: field 1, its IR version, then the producer's name,
        # "pytorch" for torch.onnx) would reach torch.load's unpickling advice
        with open(p, "rb") as f:
            head = f.read(64)
        if head[:1] == b"\x08" and b"pytorch" in head:
            kind = "an ONNX"
    except OSError:
        pass
    if kind:
        raise ReslabError(f"{p} is {kind} export, which holds the network alone (docs/use.md says how to run it); "
                          "reslab reads checkpoints, run folders and .safetensors files")


def read_status(path: str | os.PathLike) -> dict:
    """{step, iters, finished, config, metrics} of a training checkpoint (metrics: its last evaluation's
    record); the tensors (model, optimiser) stay on disk."""
    ck = load(path, mmap=True)
    if ck.get("format") != FORMAT:
        raise ReslabError(f"{resolve(path)}: written by an earlier reslab (no run status inside); "
                          "it can be evaluated and exported, not resumed")
    return {"step": ck["step"], "iters": ck["config"]["recipe"]["iters"], "finished": ck["finished"],
            "config": ck["config"], "metrics": ck.get("metrics") or {}}


def training_state(path: str | os.PathLike) -> dict:
    """A checkpoint that can be resumed (FORMAT), or a one-line error saying why this one cannot."""
    ck = load(path)
    if "detector" in ck:
        raise ReslabError(f"{resolve(path)} is a detection run (`reslab detect train --resume` continues it); "
                          "choose another --out")
    if ck.get("format") != FORMAT or "train" not in ck:
        raise ReslabError(f"{resolve(path)}: written by an earlier reslab or by `reslab convert` (no training "
                          "state inside); it can be evaluated and exported, not resumed — start a new --out")
    return ck


def build_model(model_config: dict):
    """The one way from checkpoint metadata to a network (weights not loaded)."""
    from .resnet import ResNet, ResNetConfig
    cfg = {k: v for k, v in model_config.items() if k in ResNetConfig.__dataclass_fields__}
    cfg["layers"] = tuple(cfg["layers"])
    try:
        return ResNet(ResNetConfig(**cfg))
    except (TypeError, ValueError) as e:
        raise ReslabError(f"the checkpoint's model config does not build a reslab model ({e})") from None


def load_model(source, key: str = "model", name: str | None = None):
    """A model from a checkpoint file, run folder or already-loaded checkpoint dict (`name`: the file it came
    from, for messages), in eval mode, with `model.reslab = {classes, normalizer, config, crop_size, data}`.
    `key="ema"` takes a run's EMA weights instead."""
    from .data.normalize import Normalizer
    ck = source if isinstance(source, dict) else load(source)
    name = name or ("checkpoint" if isinstance(source, dict) else str(resolve(source)))
    if "detector" in ck:
        raise ReslabError(f"{name} is a detection run's checkpoint: use `reslab detect eval/predict` or "
                          "reslab.detection.load_detector")
    state = ck.get(key) if key != "ema" else (ck.get("train") or {}).get("ema")
    if state is None:
        raise ReslabError(f"{name} holds no {key!r} weights")
    model = build_model(ck["model_config"])
    load_model_state(model, state, name)
    model.reslab = {"classes": ck.get("classes"), "normalizer": Normalizer.from_state_dict(ck["normalizer"]),
                    "config": ck["model_config"], "crop_size": crop_size_of(ck), "data": data_of(ck)}
    return model.eval()


def data_of(ck: dict) -> str | None:
    """The dataset the weights were trained on ("cifar10", "folder", ...), which decides the test view; None
    for converted weights (their family decides)."""
    return (ck.get("data") or {}).get("name")


def crop_size_of(ck: dict) -> int | None:
    """The recipe's crop_size, for an image-folder run's test views at its proportions. Every run records
    one (224 unless set; CIFAR views ignore it); None only for files from before the field (the paper's 224
    then)."""
    return ((ck.get("config") or {}).get("recipe") or {}).get("crop_size")


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint",
                     fill_bn_counters: bool = False) -> None:
    """load_state_dict with an error a user can act on when the architecture differs.

    `fill_bn_counters`: accept files saved by PyTorch before 0.4.1, whose BatchNorm layers had no
    `num_batches_tracked` buffer (it only counts steps; BN uses it only when momentum is None)."""
    own = model.state_dict()
    if fill_bn_counters:
        state = dict(state)
        for k in own:
            if k.endswith(".num_batches_tracked") and k not in state and k.rsplit(".", 1)[0] + ".running_mean" in state:
                state[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(shape)} of another shape (e.g. {shape[:2]})")
        raise ReslabError(f"{source} does not fit {getattr(model.cfg, 'name', 'this model')}: {detail}; "
                          f"is it a checkpoint of another architecture?")
    model.load_state_dict(state)
