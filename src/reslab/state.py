"""A run's training state: everything the loop mutates, and the one checkpoint layout.

`TrainingState.state_dict()` IS the checkpoint (checkpoint.py documents the keys) and `load_state_dict()` is
the only way back. It holds no global state: several runs can live side by side in one process.
"""
from __future__ import annotations

import math

import torch

from . import checkpoint as ckpt
from . import dist
from .config import RunConfig
from .errors import ReslabError
from .recipes import ScheduleState


class TrainingState:
    def __init__(self, cfg: RunConfig, model, optimizer, scaler, ema, data, data_info: dict):
        self.cfg, self.model, self.optimizer, self.scaler, self.ema = cfg, model, optimizer, scaler, ema
        self.data, self.data_info = data, data_info
        self.world_sizes = [dist.world_size()]  # the engine sets the sessions' list on resume
        self.schedule = ScheduleState()
        self.step = 0
        self.best_err = math.inf
        self.elapsed = 0.0              # training seconds spent by earlier processes of this run
        self.metrics: dict = {}         # the last evaluation
        # saved at an evaluation step whose evaluation failed (a corrupt validation image): the resume
        # evaluates this step before it trains on
        self.eval_pending = False
        # Running sums on the device, between the points that read and clear them: the log line's (loss, wrong,
        # seen, non-finite steps) and the warm-up rule's window (wrong, seen). Saved, so a run stopped by SIGTERM
        # between two log lines logs on resume as it would have (--stop-at writes a line where it stops), and
        # one stopped either way between two checks of the rule decides as it would have.
        device = next(model.parameters()).device
        self.counters = {"log": torch.zeros(4, dtype=torch.float64, device=device),
                         "warmup_rule": torch.zeros(2, dtype=torch.float64, device=device)}
        # No generator state: a run's randomness is a function of its seed alone (the model is initialised
        # from it, the loaders draw from (seed, epoch, batch)), so nothing random needs saving.

    @property
    def finished(self) -> bool:
        """Trained to the end and evaluated there."""
        return self.step >= self.cfg.recipe.iters and not self.eval_pending

    def state_dict(self) -> dict:
        """The checkpoint. Under torchrun every rank calls it: the counters are summed over the ranks."""
        m = dist.unwrap(self.model)
        counters = {k: dist.all_reduce_sum(t.clone()).tolist() for k, t in self.counters.items()}
        return {
            "format": ckpt.FORMAT, "config": self.cfg.to_dict(),
            "model": m.state_dict(), "model_config": m.metadata,
            "normalizer": self.data.normalizer.state_dict(), "classes": self.data.classes, "data": self.data_info,
            "step": self.step, "finished": self.finished, "best_err": self.best_err, "metrics": self.metrics,
            "eval_pending": self.eval_pending,
            # the ranks it trained on: each rank's BN saw batch / world_size images (reslab eval --precise-bn);
            # and those of every session whose steps it holds, where they changed (the report's setting)
            "world_size": dist.world_size(), "world_sizes": list(self.world_sizes),
            "train": {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                      "ema": self.ema.module.state_dict() if self.ema is not None else None,
                      # how many updates the EMA has seen: at 0 the next update copies the weights over it
                      "ema_n": int(self.ema.n_averaged) if self.ema is not None else 0,
                      "schedule": self.schedule.state_dict(), "loader": self.data.train.state_dict(),
                      "elapsed": self.elapsed, "counters": counters},
        }

    def load_state_dict(self, ck: dict, source: str = "checkpoint") -> None:
        m = dist.unwrap(self.model)
        if ck["model_config"] != m.metadata:
            raise ReslabError(f"{source} was trained as {ck['model_config'].get('name')} with other model options; "
                              "resume with the run's own --arch and model options")
        _check_same_data(ck["data"], self.data_info, source)
        ckpt.load_model_state(m, ck["model"], source)
        t = ck["train"]
        self.optimizer.load_state_dict(t["optimizer"])
        self.scaler.load_state_dict(t["scaler"])
        if self.ema is not None and t.get("ema") is not None:
            self.ema.module.load_state_dict(t["ema"])
            self.ema.n_averaged.fill_(t["ema_n"])
        self.schedule.load_state_dict(t["schedule"])
        self.data.train.load_state_dict(t["loader"])
        self.step, self.best_err, self.elapsed = ck["step"], ck["best_err"], t["elapsed"]
        for k, v in t.get("counters", {}).items():  # the sums, on rank 0 (checkpoints before 2026-12 had none)
            self.counters[k].copy_(torch.tensor(v, dtype=torch.float64) * (dist.rank() == 0))
        self.metrics = ck.get("metrics") or {}
        self.eval_pending = bool(ck.get("eval_pending", False))


def _check_same_data(saved: dict, now: dict, source: str) -> None:
    """--data-dir may move between sessions; the data itself may not change."""
    why = data_difference(saved, now)
    if why:
        raise ReslabError(f"{source}: {why}; resume with the data the run was trained on")


def data_difference(saved: dict, now: dict) -> str | None:
    """How the data a run recorded (`saved`, RunData.info) differs from `now`, in words (None: the same, as far
    as both records tell)."""
    for k in ("name", "eval_split", "train_size", "eval_size"):
        if saved.get(k) != now.get(k):
            return f"the data differs from the run's ({k} {saved.get(k)!r} then, {now.get(k)!r} now)"
    ids = [d.get("identity") or {} for d in (saved, now)]
    # by pixels where both runs recorded them (the same data pickled again is the same data), else by file
    key = "pixels_md5" if all(i.get("pixels_md5") for i in ids) else "md5"
    a, b = (i.get(key) for i in ids)
    if a and b and a != b:
        return f"the data has checksum {b}, the run was trained on {a} ({ids[0].get('description')})"
    # the training split's own fingerprint, where both sessions recorded it (runs from 2026-12-06 on)
    a, b = (i.get("train_pixels_md5") for i in ids)
    if a and b and a != b:
        return f"the training images differ from the run's (MD5 {b} now, {a} then) though the test set is the same"
    # an image folder's file lists (runs from 2026-12-06 on): the loader's saved position indexes them
    for key, split in (("train_files_md5", "training"), ("eval_files_md5", "evaluation")):
        a, b = (i.get(key) for i in ids)
        if a and b and a != b:
            return (f"the {split} split's files differ from the run's (a file added, removed or renamed; "
                    f"file-list MD5 {b} now, {a} then)")
    return None
