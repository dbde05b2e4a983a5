"""Training a detector: one recipe (data), one run state (one checkpoint layout), one plain loop.

The loop contract: train(run) builds (or resumes from RUN/last.pt) the state — detector, SGD optimiser,
step, loader position (epoch, batch), RNG — then repeats: lr = lr_at(step) -> torchvision's Faster R-CNN
losses -> backward -> SGD step. Every `log_every` steps one "train" line goes to RUN/metrics.jsonl; every
`save_every` steps, at each evaluation and at the end, rank 0 writes RUN/last.pt atomically — but only
after checking that every step's loss since the last save was finite, so a checkpoint on disk never holds
weights that a NaN/Inf step touched. Every `eval_every` steps (0: only at the end) the validation split's
metrics (COCO's or PASCAL VOC's, by the data's format) are logged as an "eval" line. Resuming restores all
of it: on the CPU a resumed run equals the uninterrupted one bit for bit.

One process, or several under torchrun (DistributedDataParallel; the batch is the global batch):
    reslab detect train --data-dir /data/coco --arch resnet101 --head c4 --out runs/det-r101 --weights r101.pt
    torchrun --standalone --nproc_per_node=8 -m reslab detect train --data-dir /data/coco ... --out runs/det-r101
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import dist
from ..errors import ReslabError, bad_batch_advice, described
from ..logs import MetricsLog, Progress, environment, truncate_metrics, write_json
from .config import DetectorConfig, DetectRecipe, lr_at
from .data import Categories, DetectionSet, TrainStream, eval_loader
from .evaluate import evaluate
from .formats import default_splits, open_split
from .model import build_detector, create_detector


# torchvision's RPN and RoI heads sample anchors and proposals from the global generators, so a detection run
# seeds them and its checkpoints save them (classification runs draw from their own seeds instead).
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])

LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")  # torchvision's names


@dataclass
class DetectRun:
    """What `reslab detect train` was asked. None means: the default, or the resumed run's value."""
    data_dir: str
    out: str
    arch: str | None = None                  # default resnet101
    head: str | None = None                  # default c4
    weights: str | None = None               # classification weights for the backbone (fresh runs)
    recipe: dict = field(default_factory=dict)   # DetectRecipe overrides
    model: dict = field(default_factory=dict)    # create_detector overrides (min_size, width, ...)
    seed: int | None = None
    resume: bool = False
    device: str = "auto"
    workers: int = 2
    train_split: str | None = None           # default: the format's (COCO train2017; VOC 07+12 trainval)
    val_split: str | None = None             # default: COCO val2017; VOC 2007 test
    eval_batch: int = 8
    stop_at: int | None = None               # stop (resumable) after this step: budgets and tests
    progress: bool = True
    extend_to: int | None = None             # a resumed run's new length; its lr steps stay where they were
    on_corrupt: str = "stop"                 # an undecodable training image: stop, or skip it (data.py)


class TrainState:
    """A run's mutable state and its one checkpoint layout. `model` is the bare detector (not DDP)."""

    def __init__(self, model: nn.Module, recipe: DetectRecipe, categories: Categories, stream: TrainStream,
                 seed: int):
        self.model, self.recipe, self.categories, self.stream, self.seed = model, recipe, categories, stream, seed
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                   weight_decay=recipe.weight_decay)
        self.step = 0
        self.metrics: dict = {}

    def state_dict(self) -> dict:
        cfg: DetectorConfig = self.model.config
        return {"model": self.model.state_dict(), "model_config": cfg.backbone, "detector": cfg.to_dict(),
                "optimizer": self.opt.state_dict(), "step": self.step, "loader": self.stream.state_dict(),
                "rng": rng_state(), "recipe": {**asdict(self.recipe), "lr_steps": list(self.recipe.lr_steps)},
                "categories": self.categories.to_list(), "classes": list(self.categories.names),
                "seed": self.seed, "metrics": self.metrics}

    def load_state_dict(self, ck: dict) -> None:
        ckpt.load_model_state(self.model, ck["model"], "the checkpoint")
        self.opt.load_state_dict(ck["optimizer"])
        self.stream.load_state_dict(ck["loader"])
        set_rng_state(ck["rng"])
        self.step, self.metrics = int(ck["step"]), ck.get("metrics") or {}


class LossWindow:
    """Per-step losses summed on the device (no host sync per step). `read()` gives the means since the
    last read; `bad` counts non-finite steps since the last save."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(LOSSES) + 1, dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, losses: dict) -> None:
        with torch.no_grad():
            parts = torch.stack([losses[k].detach().double() for k in LOSSES])
            self.sums += torch.cat([parts.sum()[None], parts])
            self.bad += (~torch.isfinite(parts)).any().double()
        self.steps += 1

    def read(self) -> dict:
        sums = dist.all_reduce_sum(self.sums.clone()).tolist()
        n = max(1, self.steps) * (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        self.sums.zero_()
        self.steps = 0
        return dict(zip(("loss", *LOSSES), (v / n for v in sums)))

    def any_bad(self) -> bool:
        return dist.all_reduce_sum(self.bad.clone()).item() > 0


def _diverged(out: Path, saved_step: int | None, step: int) -> ReslabError:
    since = saved_step or 0
    intact = (f"{out / ckpt.LAST} (step {saved_step}) is intact" if saved_step is not None
              else "no checkpoint had been written yet")
    return ReslabError(f"the training loss became NaN/Inf between steps {since + 1} and {step}; stopped without "
                       f"saving, so {intact}; lower --lr or add --warmup-iters")


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


# ------------------------------------------------------------------ building a run
def _listless(v):
    return tuple(v) if isinstance(v, list) else v


def _fresh_model(run: DetectRun, cats: Categories) -> nn.Module:
    return create_detector(run.arch or "resnet101", head=run.head or "c4", num_classes=cats.num_classes,
                           weights=run.weights, **run.model)


def _resumed_model(ck: dict, run: DetectRun, cats: Categories, path: Path) -> nn.Module:
    """The checkpoint's detector; options given again must agree with it (a conflict is an error)."""
    cfg = DetectorConfig.from_dict(ck["detector"])
    detector_fields = {f.name for f in fields(DetectorConfig)}
    given = {"arch": run.arch, "head": run.head, **run.model}
    have = {"arch": cfg.backbone.get("name"), "head": cfg.head,
            **{k: getattr(cfg, k) if k in detector_fields else cfg.backbone.get(k) for k in run.model}}
    wrong = [f"{k}={_listless(v)!r} (the run has {_listless(have[k])!r})" for k, v in given.items()
             if v is not None and _listless(v) != _listless(have[k])]
    saved = Categories.from_coco(ck["categories"])
    if saved != cats:
        wrong.append(f"the data's {len(cats.ids)} categories (the run has num_classes={cfg.num_classes}: "
                     f"{', '.join(saved.names[:5])}{', ...' if len(saved.names) > 5 else ''})")
    if wrong:
        raise ReslabError(f"{path} was trained with other settings: {'; '.join(wrong)}; resume with the run's "
                          "options (or leave them out), or start a new run with another --out")
    return build_detector(cfg, ckpt.build_model(cfg.backbone))


def _resume_checkpoint(run: DetectRun, out: Path) -> dict | None:
    last = out / ckpt.LAST
    if last.exists() and not run.resume:
        raise ReslabError(f"{out} already holds a run ({ckpt.LAST}); pass --resume to continue it or choose "
                          "another --out")
    if not (run.resume and last.exists()):
        return None
    ck = ckpt.load(last)
    if "detector" not in ck:
        raise ReslabError(f"{last} is not a detection run's checkpoint (it was written by `reslab train`); "
                          "choose another --out")
    return ck


# recipe fields a resumed run may change: when it logs, saves and evaluates, not what it trains
FREE_ON_RESUME = ("log_every", "save_every", "eval_every")


def _resumed_recipe(base: DetectRecipe, seed: int, run: DetectRun, path: Path) -> DetectRecipe:
    """The checkpoint's recipe, with the free fields given again; a training field given with another value
    is an error (the run would go on under a schedule its record and its first steps do not share), and
    --extend-to lengthens the run with its lr steps kept at the same steps."""
    wrong = [f"--{k.replace('_', '-')} {_listless(v)!r} (the run has {_listless(getattr(base, k))!r})"
             for k, v in run.recipe.items() if k not in FREE_ON_RESUME and _listless(v) != _listless(getattr(base, k))]
    if run.seed is not None and run.seed != seed:
        wrong.append(f"--seed {run.seed} (the run has {seed})")
    if wrong:
        raise ReslabError(f"{path}: a resumed run keeps its recipe and seed, and this command gives "
                          f"{'; '.join(wrong)}; leave them out (--extend-to N lengthens the run), or start a new "
                          "run with another --out")
    recipe = base.with_overrides(**{k: v for k, v in run.recipe.items() if k in FREE_ON_RESUME})
    if run.extend_to is None:
        return recipe
    if run.extend_to < base.iters:
        raise ReslabError(f"--extend-to {run.extend_to} is shorter than the run's {base.iters} iterations")
    # lr steps are fractions of iters: rescaled so that each still falls at the step it did
    steps = [round(f * base.iters) for f in base.lr_steps]
    fractions = tuple(st / run.extend_to for st in steps)
    if [round(f * run.extend_to) for f in fractions] != steps or not all(0 < f < 1 for f in fractions):
        raise ReslabError(f"--extend-to {run.extend_to} cannot keep the lr steps at {steps}; choose a longer run")
    return replace(recipe, iters=run.extend_to, lr_steps=fractions)


def build_state(run: DetectRun, d: dist.DistInfo) -> tuple[TrainState, DetectionSet, dict | None]:
    """(state, validation set, checkpoint resumed from or None), everything on d.device."""
    out = Path(run.out)
    ck = _resume_checkpoint(run, out)
    if run.extend_to is not None and ck is None:
        raise ReslabError(f"--extend-to needs a run to extend, and {out} holds none ({ckpt.LAST} is missing; "
                          "--resume continues the run there)")
    base = DetectRecipe(**{k: _listless(v) for k, v in ck["recipe"].items()}) if ck else DetectRecipe()
    recipe = _resumed_recipe(base, ck["seed"], run, out / ckpt.LAST) if ck else base.with_overrides(**run.recipe)
    seed = ck["seed"] if ck else run.seed if run.seed is not None else 0
    seed_everything(seed + d.rank)
    train_ds = open_split(run.data_dir, run.train_split, train=True, on_corrupt=run.on_corrupt)
    cats = train_ds.categories
    val_ds = open_split(run.data_dir, run.val_split, train=False, categories=cats)
    val_ds.check_scorer()  # the run ends with an evaluation: fail now, not after hours of training
    if recipe.batch_size % d.world_size:
        raise ReslabError(f"the global batch ({recipe.batch_size}) must be a multiple of the number of processes "
                          f"({d.world_size})")
    model = _resumed_model(ck, run, cats, out / ckpt.LAST) if ck else _fresh_model(run, cats)
    model.to(d.device).train()
    stream = TrainStream(train_ds, recipe.batch_size // d.world_size, seed, d.rank, d.world_size, run.workers)
    state = TrainState(model, recipe, cats, stream, seed)
    if ck:
        state.load_state_dict(ck)
    return state, val_ds, ck


def train(run: DetectRun) -> dict:
    """Train (or resume) one detector; returns the metrics of the evaluation at the step it ends on ({} if none)."""
    run = _with_splits(run)
    d = dist.init(run.device)
    try:
        state, val_ds, ck = build_state(run, d)
        out = Path(run.out)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if ck:
                truncate_metrics(out, state.step, state.metrics)
            # the request that started the run stays its record; a resume adds the latest session's
            first = _recorded_request(out) if ck else None
            write_json(out / "config.json", {
                "run": first or asdict(run), **({"resumed_with": asdict(run)} if ck else {}),
                "recipe": asdict(state.recipe), "detector": state.model.config.to_dict(),
                "categories": state.categories.to_list(), "world_size": d.world_size,
                "train_images": len(state.stream.loader.dataset), "val_images": len(val_ds)})
            write_json(out / "env.json", environment(d.device, d.world_size))
        net = state.model
        if d.enabled:
            net = nn.parallel.DistributedDataParallel(
                state.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        return _loop(state, net, val_ds, run, d, out, saved_step=state.step if ck else None)
    finally:
        dist.shutdown()


def _with_splits(run: DetectRun) -> DetectRun:
    """Splits not named: a resumed run's own (as its config.json recorded them), else the format's defaults."""
    if run.train_split and run.val_split:
        return run
    first = (_recorded_request(Path(run.out)) or {}) if run.resume else {}
    train_split, val_split = run.train_split or first.get("train_split"), run.val_split or first.get("val_split")
    if not (train_split and val_split):
        train_default, val_default = default_splits(run.data_dir)
        train_split, val_split = train_split or train_default, val_split or val_default
    return replace(run, train_split=train_split, val_split=val_split)


def _recorded_request(out: Path) -> dict | None:
    """The "run" record of the command that started the run in `out` (None: unreadable or absent)."""
    import json
    try:
        rec = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return rec.get("run") if isinstance(rec, dict) and isinstance(rec.get("run"), dict) else None


# ------------------------------------------------------------------ the loop
def _loop(state: TrainState, net: nn.Module, val_ds: DetectionSet, run: DetectRun, d, out: Path,
          saved_step: int | None) -> dict:
    r = state.recipe
    log = MetricsLog(out) if d.is_main else None
    bar = Progress(r.iters, state.step, enabled=run.progress and d.is_main)
    window = LossWindow(d.device)
    stop = min(r.iters, run.stop_at or r.iters)
    t_start = t_log = time.time()
    steps_per_epoch = max(1, len(state.stream))
    if saved_step is not None and _eval_due(state.step, r) and state.metrics.get("step") != state.step:
        _evaluate_and_save(state, val_ds, run, d, log, t_start, out)  # one a failure ended after the save
    while state.step < stop:
        batches = iter(state.stream)
        while True:
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            except Exception as e:  # a training image that cannot be read: the step reached is kept
                raise _saved_before_batch(e, state, window, d, out, saved_step) from e
            lr = lr_at(state.step, r)
            for g in state.opt.param_groups:
                g["lr"] = lr
            losses = net(*_to_device(images, targets, d.device))
            state.opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            state.opt.step()
            state.step += 1
            window.add(losses)
            done = state.step >= stop
            if state.step % r.log_every == 0 or done:
                if window.any_bad():
                    raise _diverged(out, saved_step, state.step)
                dt, n = time.time() - t_log, window.steps
                rec = {"kind": "train", "step": state.step, "epoch": state.step / steps_per_epoch, "lr": lr,
                       **window.read(), "images_per_s": n * r.batch_size / max(dt, 1e-9),
                       "elapsed_s": time.time() - t_start}
                if log:
                    log.write(rec)
                bar.update(state.step, n, f"loss {rec['loss']:.3f} lr {lr:.3g} {rec['images_per_s']:.1f} img/s")
                t_log = time.time()
            due_eval = _eval_due(state.step, r)
            if due_eval or done or state.step % r.save_every == 0:
                if window.any_bad():  # every step since the last save, not just this log window
                    raise _diverged(out, saved_step, state.step)
                if d.is_main:
                    ckpt.save_atomic(state.state_dict(), out / ckpt.LAST)
                saved_step = state.step
                if due_eval:  # after the save: an evaluation that fails (its data, pycocotools) loses no training
                    _evaluate_and_save(state, val_ds, run, d, log, t_start, out)
                window.bad.zero_()
                dist.barrier()
                t_log = time.time()
            if done:
                break
    bar.close()
    return state.metrics if state.metrics.get("step") == state.step else {}


def _saved_before_batch(e: Exception, state: TrainState, window: LossWindow, d, out: Path,
                        saved_step: int | None) -> ReslabError:
    """The error for a training batch that could not be read, once the step reached is saved (the loader's
    position still points at that batch): the steps since the last checkpoint, up to --save-every of them,
    are not lost. Not under torchrun (the other ranks would wait in collectives), not after a non-finite
    step (that is a divergence), and not at step 0."""
    why = described(e)
    if d.enabled or state.step == 0 or saved_step == state.step or window.any_bad():
        kept = f"{out / ckpt.LAST} holds step {saved_step}" if saved_step is not None else "no checkpoint was written"
        return ReslabError(f"{why}; {kept}")
    ckpt.save_atomic(state.state_dict(), out / ckpt.LAST)
    return ReslabError(f"{why}; {out / ckpt.LAST} now holds step {state.step}, saved before that batch: "
                       f"{bad_batch_advice(e)}, then --resume")


def _eval_due(step: int, r: DetectRecipe) -> bool:
    return step == r.iters or bool(r.eval_every and step % r.eval_every == 0)


def _evaluate_and_save(state: TrainState, val_ds: DetectionSet, run: DetectRun, d, log, t_start: float,
                       out: Path) -> None:
    """Evaluate, save again with the metrics (the checkpoint records them: a resume that finds a due
    evaluation without them, one that failed on its data or pycocotools, runs it before training on), then
    log it: a kill between the save and the log write has its line written back on resume."""
    loader = eval_loader(val_ds, run.eval_batch, d.rank, d.world_size, run.workers)
    m = evaluate(state.model, loader, val_ds, d.device)
    if m is None:  # not rank 0
        return
    state.metrics = {"kind": "eval", "step": state.step, **m, "elapsed_s": time.time() - t_start}
    ckpt.save_atomic(state.state_dict(), out / ckpt.LAST)
    if log:
        log.write(state.metrics)
