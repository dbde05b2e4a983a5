"""The training loop. Plain functions; the contract:

  train(settings) builds the run (data, model, optimiser, schedule state), resumes it from RUN/last.pt when
  asked, then repeats: lr = lr_at(step) -> forward under one autocast context -> backward through one
  (possibly disabled) GradScaler -> optimiser step -> EMA update. Every `log_every` steps it logs one
  metrics line; every `eval_every` steps and at the end it evaluates, then (rank 0) writes RUN/last.pt
  atomically, and RUN/best.pt on a new best error. A non-finite loss stops the run before anything is saved,
  so the last good checkpoint stays intact. Resuming restores weights, optimiser, schedule state, step,
  loader position and RNG states: on the CPU the result is bitwise the uninterrupted run's.

Precision: "fp32", "bf16" (autocast), "fp16" (autocast + GradScaler). One code path for all three.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import dist
from .data import build as data_build
from .errors import ReslabError
from .evaluate import evaluate, precise_bn
from .logs import MetricsLog, Progress, environment, write_json, write_text_atomic
from .recipes import Recipe, ScheduleState, after_eval, lr_at, warmup_rule_applies
from .zoo import create_model

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainSettings:
    recipe: Recipe
    out: str
    arch: str = "resnet20"
    model_overrides: dict = field(default_factory=dict)
    data: str = "cifar10"
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool | None = None  # auto: on
    compile: bool | None = None      # auto: off (measured: H100 ResNet-50 -3%, ResNet-20 +3%; CPU within noise)
    compile_mode: str | None = None  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
    deterministic: bool = False
    sync_bn: bool = False
    precise_bn_batches: int = 0      # >0: recompute BN statistics over this many batches before each eval
    resume: bool = False
    workers: int = 4
    tensorboard: bool = False
    progress: bool = True
    stop_at: int | None = None       # stop (as if interrupted) after this step; the run stays resumable


class TrainingDiverged(ReslabError):
    pass


def resolve_auto(s: TrainSettings, device: torch.device) -> TrainSettings:
    """Fill 'auto' settings with the fast defaults for the device (see README: Performance)."""
    prec = s.precision if s.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if prec not in PRECISIONS:
        raise ValueError(f"unknown precision {prec!r}; valid choices: auto, {', '.join(PRECISIONS)}")
    cl = True if s.channels_last is None else s.channels_last
    comp = False if s.compile is None else s.compile
    return TrainSettings(**{**asdict(s), "recipe": s.recipe, "precision": prec, "channels_last": cl,
                            "compile": comp})


def autocast_for(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    # The loader's randomness is a function of (seed, epoch, batch) and needs no saving; these cover
    # anything else drawn from the global generators.
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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


@dataclass
class RunState:
    """Everything the loop mutates, saved in every checkpoint."""
    step: int = 0
    sched: ScheduleState = field(default_factory=ScheduleState)
    best_err: float = float("inf")
    elapsed: float = 0.0             # training seconds before this process (resumed runs)


def _checkpoint(model, opt, scaler, ema, data, rs: RunState, s: TrainSettings, metrics: dict) -> dict:
    m = dist.unwrap(model)
    return {
        "model": m.state_dict(), "model_config": m.metadata, "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
        "schedule": rs.sched.state_dict(), "step": rs.step, "best_err": rs.best_err, "elapsed": rs.elapsed,
        "loader": data.train.state_dict(), "rng": rng_state(), "recipe": s.recipe.to_dict(),
        "normalizer": data.normalizer.state_dict(), "classes": data.classes,
        "data": {"name": s.data, "eval_split": data.eval_split},
        "run": {k: v for k, v in asdict(s).items() if k != "recipe"}, "metrics": metrics,
    }


def _model_kwargs(s: TrainSettings, num_classes: int) -> dict:
    return {"num_classes": num_classes, **s.model_overrides}


def train(settings: TrainSettings) -> dict:
    """Run (or resume) one training run; returns the final evaluation metrics."""
    d = dist.init(settings.device)
    s = resolve_auto(settings, d.device)
    r = s.recipe
    r.validate()
    out = Path(s.out)
    if (out / ckpt.LAST).exists() and not s.resume:
        raise ReslabError(f"{out} already holds a run ({ckpt.LAST}); pass --resume to continue it or choose "
                          "another --out")
    seed_everything(s.seed + d.rank, s.deterministic)
    mem = torch.channels_last if s.channels_last else torch.contiguous_format
    data = data_build.build(s.data, s.data_dir, batch_size=r.batch_size, device=d.device, seed=s.seed,
                            rank=d.rank, world_size=d.world_size, val_split=r.val_split,
                            normalization=r.normalization, channels_last=s.channels_last, workers=s.workers)
    model = create_model(s.arch, **_model_kwargs(s, len(data.classes))).to(d.device, memory_format=mem)
    opt = make_optimizer(model, r)
    scaler = torch.amp.GradScaler(d.device.type, enabled=s.precision == "fp16")
    rs = RunState()
    rs.sched.in_warmup_rule = warmup_rule_applies(r, model.cfg.depth)
    ema = make_ema(model, r.ema_decay)
    if s.resume and (out / ckpt.LAST).exists():
        _resume(out / ckpt.LAST, model, opt, scaler, ema, data, rs, s)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**asdict(s), "recipe": r.to_dict(), "model_config": model.metadata,
                                         "world_size": d.world_size, "train_size": data.train_size,
                                         "eval_split": data.eval_split, "eval_size": data.eval_size})
        write_json(out / "env.json", environment())
    if s.sync_bn and d.device.type == "cpu":
        raise ReslabError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU)")
    if s.sync_bn and d.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores (cuDNN's default too)
    step_net = torch.compile(net, mode=s.compile_mode) if s.compile else net
    try:
        return _loop(step_net, model, opt, scaler, ema, data, rs, s, d, out)
    finally:
        dist.shutdown()


def _resume(path, model, opt, scaler, ema, data, rs: RunState, s: TrainSettings) -> None:
    ck = ckpt.load(path)
    ckpt.load_model_state(model, ck["model"], str(path))
    if ck["model_config"] != model.metadata:
        raise ReslabError(f"{path} was trained as {ck['model_config'].get('name')} with other settings; "
                          "resume with the same --arch and model options")
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    if ema is not None and ck.get("ema") is not None:
        ema.module.load_state_dict(ck["ema"])
    rs.sched.load_state_dict(ck["schedule"])
    rs.step, rs.best_err, rs.elapsed = ck["step"], ck["best_err"], ck["elapsed"]
    data.train.load_state_dict(ck["loader"])
    set_rng_state(ck["rng"])
    if int(os.environ.get("RANK", "0")) == 0:
        _truncate_metrics(Path(path).parent, rs.step)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Lines logged after the checkpoint belong to steps that will be run again: drop them."""
    p = run_dir / "metrics.jsonl"
    if p.is_file():
        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text_atomic(p, "".join(ln + "\n" for ln in keep))


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


def _loop(net, model, opt, scaler, ema, data, rs: RunState, s: TrainSettings, d, out: Path) -> dict:
    r = s.recipe
    log = MetricsLog(out, s.tensorboard) if d.is_main else None
    bar = Progress(r.iters, rs.step, enabled=s.progress and d.is_main)
    ctx = autocast_for(d.device, s.precision)
    step = TrainStep(net, model, opt, scaler, ema, s.precision, d.device, r.label_smoothing)
    acc = step.acc
    rule = torch.zeros(2, dtype=torch.float64, device=d.device)  # warm-up rule window: wrong, seen
    t_log, imgs_log, t_start = time.time(), 0, time.time() - rs.elapsed
    final = {}
    stop = min(r.iters, s.stop_at or r.iters)
    while rs.step < stop:
        for x, y in data.train:
            lr = lr_at(rs.step, r, rs.sched)
            wrong = step(x, y, lr)
            if rs.sched.in_warmup_rule:
                rule[0] += wrong
                rule[1] += len(y)
            rs.step += 1
            imgs_log += len(y) * d.world_size
            if rs.sched.in_warmup_rule and rs.step % r.warmup_rule.check_every == 0:
                _check_warmup_rule(rule, rs, r)
            last = rs.step >= stop
            if rs.step % r.log_every == 0 or last:
                rec = _log_train(acc, rs, r, lr, imgs_log, time.time() - t_log, t_start, data, d)
                if log:
                    log.write(rec)
                bar.update(rs.step, r.log_every if not last else rs.step % r.log_every or r.log_every,
                           f"loss {rec['loss']:.3f} err {rec['train_err']:.3f} lr {lr:.3g} "
                           f"{rec['images_per_s']:.0f} img/s")
                acc.zero_()
                t_log, imgs_log = time.time(), 0
            if rs.step % r.eval_every == 0 or rs.step == r.iters:
                final = _eval_and_save(net, model, opt, scaler, ema, data, rs, s, d, out, log, t_start, ctx)
                t_log = time.time()
            if last:
                break
    bar.close()
    if log:
        log.close()
    if rs.step < r.iters and d.is_main:  # stopped early (stop_at): keep the exact position resumable
        _save(out, model, opt, scaler, ema, data, rs, s, final, best=False)
    return final


def _check_warmup_rule(rule: torch.Tensor, rs: RunState, r: Recipe) -> None:
    dist.all_reduce_sum(rule)
    wrong, seen = rule.tolist()
    if seen and wrong / seen < r.warmup_rule.until_train_err:
        rs.sched.in_warmup_rule = False
    rule.zero_()


def _log_train(acc, rs: RunState, r: Recipe, lr, imgs, dt, t_start, data, d) -> dict:
    dist.all_reduce_sum(acc)
    loss_sum, wrong, seen, bad = acc.tolist()
    if bad > 0 or not np.isfinite(loss_sum):
        raise TrainingDiverged(
            f"the training loss became NaN/Inf before step {rs.step}; stopped without saving, so the last good "
            f"checkpoint is untouched; lower the learning rate or use --precision fp32")
    return {"kind": "train", "step": rs.step, "epoch": rs.step / max(1, len(data.train)), "lr": lr,
            "loss": loss_sum / max(1, seen), "train_err": wrong / max(1, seen), "images_per_s": imgs / max(dt, 1e-9),
            "elapsed_s": time.time() - t_start, "warmup_rule": rs.sched.in_warmup_rule}


def _eval_and_save(net, model, opt, scaler, ema, data, rs, s, d, out, log, t_start, ctx) -> dict:
    r = s.recipe
    if s.precise_bn_batches:
        # a fork: a separate, seeded pass that leaves the training loader's position untouched
        precise_bn(model, iter(data.train.fork(s.seed + 7919)), s.precise_bn_batches)
    m = evaluate(model, data.eval, ctx)
    rec = {"kind": "eval", "step": rs.step, "epoch": rs.step / max(1, len(data.train)), "split": data.eval_split,
           **m, "elapsed_s": time.time() - t_start}
    if ema is not None:
        e = evaluate(ema.module, data.eval, ctx)
        rec.update({f"ema_{k}": v for k, v in e.items() if k != "n"})
    after_eval(r, rs.sched, m["top1_err"])
    if log:
        log.write(rec)
    rs.elapsed = time.time() - t_start
    improved = m["top1_err"] < rs.best_err
    rs.best_err = min(rs.best_err, m["top1_err"])
    if d.is_main:
        _save(out, model, opt, scaler, ema, data, rs, s, rec, best=improved)
    dist.barrier()
    return rec


def _save(out, model, opt, scaler, ema, data, rs, s, metrics, best: bool) -> None:
    state = _checkpoint(model, opt, scaler, ema, data, rs, s, metrics)
    ckpt.save_atomic(state, out / ckpt.LAST)
    if best:
        ckpt.save_atomic(state, out / ckpt.BEST)
