"""Checkpoints: atomic writes, plain contents, clear errors.

A checkpoint is a dict of tensors, numbers, strings and lists only, so `torch.load(weights_only=True)`
reads it. Keys: model (the unwrapped model's state dict), model_config, optimizer, schedule, step,
loader, rng, recipe, normalizer, classes, data, ema (or None), run (train settings), metrics.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ReslabError

LAST, BEST = "last.pt", "best.pt"


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target: a crash at any
    moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its last checkpoint)."""
    p = Path(path)
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (give a .pt file or a run folder with {LAST})")
    return p


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    p = resolve(path)
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for bad files (struct.error, UnpicklingError, ...)
        raise ReslabError(f"{p}: not a readable reslab checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ReslabError(f"{p}: not a reslab checkpoint (no 'model' and 'model_config' entries)")
    return ck


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """load_state_dict with an error a user can act on when the architecture differs."""
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(shape)} of another shape (e.g. {shape[:2]})")
        raise ReslabError(f"{source} does not fit {getattr(model.cfg, 'name', 'this model')}: {detail}; "
                          f"is it a checkpoint of another architecture?")
    model.load_state_dict(state)
