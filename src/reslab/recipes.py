"""Training recipes are data. The engine reads these fields and never branches on a model's or dataset's name.

cifar-paper (paper §4.2): global batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
  32k and 48k iterations, stop at 64k (~164 epochs of 50k); single 32x32 test view. Nets of depth >= 110
  warm up by a RULE: lr 0.01 until the training error falls below 80% (about 400 iterations), then 0.1.
imagenet-paper (paper §3.4): global batch 256, lr 0.1 divided by 10 when the validation error plateaus,
  up to 600k iterations, weight decay 1e-4, momentum 0.9; the per-pixel mean subtracted, as in AlexNet
  (its [21]) and the mean image released with the paper's Caffe models.

`scaled(f)` multiplies iterations, milestones, warm-up and evaluation interval by f (the --budget flag):
budget 0.1 of cifar-paper is 6.4k iterations with steps at 3.2k and 4.8k. A schedule shortened this way
evaluates at most SCALED_MAX_EVALS times: a full test-set evaluation costs as much as dozens of steps, and
on a CPU the paper's 32 evaluations would take a third of a short run (measured: README, the first command).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


SCHEDULES = ("step", "cosine", "plateau")
SCALED_MAX_EVALS = 10


@dataclass(frozen=True)
class WarmupRule:
    lr: float = 0.01                 # lr while warming up
    until_train_err: float = 0.80    # leave warm-up once the running training error is below this
    min_depth: int = 110             # applies to nets at least this deep (paper: ResNet-110, 1202)
    check_every: int = 20            # iterations between checks of the running training error


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str                     # "cifar" | "imagenet": which data pipeline the recipe expects
    batch_size: int                  # GLOBAL batch (images per step, all ranks together)
    lr: float                        # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    iters: int = 64_000              # total optimisation steps
    schedule: str = "step"           # "step" | "cosine" | "plateau"
    milestones: tuple[int, ...] = () # "step": lr x gamma at each of these iterations
    gamma: float = 0.1
    plateau_patience: int = 3        # "plateau": evaluations without improvement before lr x gamma
    plateau_max_drops: int = 3
    warmup_iters: int = 0            # linear warm-up from 0 to lr (opt-in modern option)
    warmup_rule: WarmupRule | None = None
    label_smoothing: float = 0.0
    no_wd_bn_bias: bool = False      # exclude BN parameters and biases from weight decay
    ema_decay: float = 0.0           # 0 = off; else evaluate an exponential moving average too
    val_split: bool = False          # train on 45k, evaluate on the held-out 5k (CIFAR)
    eval_every: int = 2_000          # iterations between evaluations (and checkpoints)
    log_every: int = 100             # iterations between metric lines
    normalization: str = "pixel"     # "pixel" (paper) | "channel"
    crop: str = "scale"              # image folders: "scale" (paper §3.4: shorter side in [256, 480]) | "rrc"
    crop_size: int = 224             # image folders: the training crop; the test views keep the proportions
    budget: float = 1.0              # fraction of the paper's schedule this recipe runs

    def scaled(self, f: float) -> "Recipe":
        if f <= 0:
            raise ValueError(f"--budget must be positive, got {f}")
        s = lambda n: max(1, int(round(n * f)))  # noqa: E731
        iters, every = s(self.iters), s(self.eval_every)
        if f < 1:
            every = max(every, -(-iters // SCALED_MAX_EVALS))
        return replace(self, iters=iters, milestones=tuple(s(m) for m in self.milestones),
                       warmup_iters=int(round(self.warmup_iters * f)), eval_every=every,
                       log_every=min(self.log_every, s(self.eval_every)), budget=self.budget * f)

    def with_overrides(self, **kw) -> "Recipe":
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(self.__dataclass_fields__)}")
        if "milestones" in kw:
            kw["milestones"] = tuple(kw["milestones"])
        if "iters" in kw and "milestones" not in kw and self.schedule == "step":
            # a shorter run keeps the paper's proportions (steps at 50% and 75%)
            kw["milestones"] = tuple(int(round(m * kw["iters"] / self.iters)) for m in self.milestones)
        r = replace(self, **kw)
        r.validate()
        return r

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if self.batch_size < 1 or self.iters < 1 or self.lr <= 0:
            raise ValueError("batch_size, iters and lr must be positive")
        if self.eval_every < 1 or self.log_every < 1:
            raise ValueError(f"eval_every and log_every must be at least 1 step, got {self.eval_every} and "
                             f"{self.log_every}")
        # values SGD or the loss would refuse only at the first step, or take for another experiment
        for name, low in (("weight_decay", 0.0), ("momentum", 0.0), ("warmup_iters", 0), ("ema_decay", 0.0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0 or self.ema_decay >= 1.0 or self.gamma <= 0:
            raise ValueError(f"label_smoothing and ema_decay must be in [0, 1) and gamma positive, got "
                             f"{self.label_smoothing}, {self.ema_decay} and {self.gamma}")
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be steps (0 or more) in increasing order, got {list(self.milestones)}")
        from .data.augment import CROPS
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; valid choices: {', '.join(CROPS)}")
        if self.crop_size < 8:
            raise ValueError(f"crop_size must be at least 8 pixels, got {self.crop_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["milestones"] = tuple(d.get("milestones", ()))
        if d.get("warmup_rule"):
            d["warmup_rule"] = WarmupRule(**d["warmup_rule"])
        return cls(**d)


RECIPES: dict[str, Recipe] = {
    "cifar-paper": Recipe(
        name="cifar-paper", dataset="cifar", batch_size=128, lr=0.1, iters=64_000, schedule="step",
        milestones=(32_000, 48_000), warmup_rule=WarmupRule(), eval_every=2_000),
    "imagenet-paper": Recipe(
        name="imagenet-paper", dataset="imagenet", batch_size=256, lr=0.1, iters=600_000, schedule="plateau",
        eval_every=5_000),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid choices: {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass
class ScheduleState:
    """The part of the learning rate that depends on training, not only on the step."""
    in_warmup_rule: bool = False     # still at the warm-up rule's lr
    drops: int = 0                   # plateau schedule: how many times lr was divided
    best_err: float = math.inf
    bad_evals: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def lr_at(step: int, r: Recipe, st: ScheduleState) -> float:
    """The learning rate for optimisation step `step` (0-based): a function of the step and the schedule
    state only."""
    if st.in_warmup_rule:
        return r.warmup_rule.lr
    if r.schedule == "step":
        lr = r.lr * r.gamma ** sum(step >= m for m in r.milestones)
    elif r.schedule == "cosine":
        t = min(1.0, max(0, step - r.warmup_iters) / max(1, r.iters - r.warmup_iters))
        lr = 0.5 * r.lr * (1 + math.cos(math.pi * t))
    else:  # plateau
        lr = r.lr * r.gamma ** st.drops
    if r.warmup_iters and step < r.warmup_iters:
        lr *= (step + 1) / r.warmup_iters
    return lr


def after_eval(r: Recipe, st: ScheduleState, err: float) -> None:
    """Plateau bookkeeping after an evaluation: divide the lr once `plateau_patience` evaluations in a row
    fail to improve on the best error."""
    if r.schedule != "plateau":
        return
    if err < st.best_err - 1e-4:
        st.best_err, st.bad_evals = err, 0
    else:
        st.bad_evals += 1
        if st.bad_evals >= r.plateau_patience and st.drops < r.plateau_max_drops:
            st.drops, st.bad_evals = st.drops + 1, 0


def warmup_rule_applies(r: Recipe, depth: int) -> bool:
    return r.warmup_rule is not None and depth >= r.warmup_rule.min_depth
