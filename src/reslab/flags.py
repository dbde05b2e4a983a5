"""`reslab train` flags, derived from the config's fields (config.py, recipes.py, resnet.py) — never retyped.

Every field of Recipe (but its name, dataset, warm-up rule and budget), DataSpec, Runtime and the
user-settable ResNetConfig fields becomes a flag: `recipe.weight_decay` -> `--weight-decay`, booleans as
`--x/--no-x`, tuples as lists. Choices come from the modules that own them. Every flag defaults to None,
so the parsed namespace also says which fields the user gave (what `--resume` checks).

`to_cli_args(cfg)` writes the arguments that rebuild `cfg`; `config_from_args(parse(to_cli_args(cfg)))`
equals `cfg` (tested for every experiment).
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from .config import SECTIONS, DataSpec, ModelSpec, RunConfig, Runtime
from .recipes import RECIPES, get_recipe

# recipe fields that are not flags: the recipe's identity (--recipe picks it), its warm-up rule (data
# inside the recipe), and the budget (--budget scales the whole schedule)
_RECIPE_FIXED = ("name", "dataset", "warmup_rule", "budget")
# ResNetConfig fields a run does not choose: the arch sets them, or the data does (classes, channels)
_MODEL_FIXED = ("family", "block", "layers", "residual", "num_classes", "in_channels", "name")
# flag names that differ from the field's name (short, or kept from earlier versions)
_RENAME = {("data", "name"): "data", ("data", "dir"): "data-dir", ("recipe", "ema_decay"): "ema"}
_HELP = {
    ("recipe", "iters"): "total iterations (milestones keep the recipe's proportions unless --milestones is given)",
    ("recipe", "batch_size"): "GLOBAL batch (all ranks together)",
    ("recipe", "eval_every"): "iterations between evaluations (and checkpoints)",
    ("recipe", "ema_decay"): "EMA decay, e.g. 0.999 (the EMA is evaluated too)",
    ("recipe", "val_split"): "train on 45k, evaluate on the held-out 5k (CIFAR)",
    ("recipe", "no_wd_bn_bias"): "no weight decay on BN parameters and biases",
    ("data", "dir"): "dataset archive or folder (default: $RESLAB_DATA, else download)",
    ("data", "workers"): "DataLoader workers (image folders)",
    ("data", "decode"): "image folders: decode JPEGs in the workers (cpu) or batched on the run's device "
                        "(device; nvJPEG on a GPU); auto: device on a GPU",
    ("data", "on_corrupt"): "image folders: a training image that cannot be decoded stops the run (stop), or is "
                            "reported once by name and replaced by the next decodable one (skip; a run stopped by "
                            "one resumes with it); evaluation always stops",
    ("recipe", "crop"): "image folders: the paper's scale augmentation or RandomResizedCrop",
    ("recipe", "crop_size"): "image folders: training crop side (test views keep the 256/224 proportions)",
    ("runtime", "precision"): "auto: bf16 on CUDA, fp32 on the CPU",
    ("runtime", "channels_last"): "channels_last memory format (default on)",
    ("runtime", "compile"): "torch.compile the model (default off: it trained no faster, see benchmarks/results)",
    ("runtime", "graphs"): "capture the whole training step as one CUDA graph (default: where it is safe; "
                           "the reason is printed when it is not)",
    ("runtime", "precise_bn"): "recompute BN statistics over N training batches before each evaluation",
    ("model", "shortcut"): "shortcut option (paper §3.3)",
    ("model", "stride_in_1x1"): "bottleneck stride on the first 1x1 (v1, the paper) or, with --no-stride-in-1x1 "
                                "or --v1.5, on the 3x3",
}


def _choices() -> dict:
    from .blocks import SHORTCUTS
    from .data.augment import CROPS
    from .data.build import DATASETS
    from .data.folder import DECODERS, ON_CORRUPT
    from .data.normalize import MODES
    from .step import PRECISIONS
    from .recipes import SCHEDULES
    return {("recipe", "schedule"): SCHEDULES, ("recipe", "normalization"): MODES, ("data", "name"): DATASETS,
            ("runtime", "precision"): ("auto", *PRECISIONS), ("model", "shortcut"): SHORTCUTS,
            ("recipe", "crop"): CROPS, ("data", "decode"): DECODERS, ("data", "on_corrupt"): ON_CORRUPT}


def _model_fields():
    from .resnet import ResNetConfig
    return [f for f in fields(ResNetConfig) if f.name not in _MODEL_FIXED]


def _section_fields(sec: str):
    if sec == "model":
        return _model_fields()
    return [f for f in fields(SECTIONS[sec]) if not (sec == "recipe" and f.name in _RECIPE_FIXED)]


def _kind(f) -> str:
    t = str(f.type).replace(" ", "")
    return "tuple" if t.startswith("tuple") else t.split("|")[0]


def _flag(sec: str, name: str) -> str:
    return "--" + _RENAME.get((sec, name), name.replace("_", "-"))


def dest(sec: str, name: str) -> str:
    return f"{sec}.{name}"


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Every config field as a flag, grouped by section, each defaulting to None (= not given)."""
    choices = _choices()
    p.add_argument("--arch", default=None, help="a zoo model (default resnet20; `reslab models` lists them)")
    p.add_argument("--recipe", default=None, choices=list(RECIPES), help="default cifar-paper")
    p.add_argument("--budget", type=float, default=None, help="scale the schedule: 0.1 = a tenth of the iterations")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--out", default=None, help="run folder (default runs/ARCH-DATA-sSEED)")
    for sec in ("model", "recipe", "data", "runtime"):
        add_section_flags(p, sec, choices)


def add_section_flags(p: argparse.ArgumentParser, sec: str, choices: dict | None = None) -> None:
    """One section's fields as flags (`reslab info` uses the model section alone)."""
    choices = choices if choices is not None else _choices()
    g = p.add_argument_group(f"{sec} ({'ResNetConfig' if sec == 'model' else SECTIONS[sec].__name__} fields)")
    for f in _section_fields(sec):
        kind, kw = _kind(f), {"dest": dest(sec, f.name), "default": None, "help": _HELP.get((sec, f.name))}
        if kind != "bool":
            kw["metavar"] = "N" if kind == "tuple" else f.name.upper()
        if kind == "bool":
            g.add_argument(_flag(sec, f.name), action=argparse.BooleanOptionalAction, **kw)
        elif kind == "tuple":
            g.add_argument(_flag(sec, f.name), nargs="*", type=int, **kw)
        else:
            g.add_argument(_flag(sec, f.name), type={"int": int, "float": float}.get(kind, str),
                           choices=choices.get((sec, f.name)), **kw)
    if sec == "model":
        g.add_argument("--v1.5", dest=dest("model", "stride_in_1x1"), action="store_const", const=False,
                       help="torchvision's v1.5 bottleneck (the same as --no-stride-in-1x1)")


def model_options(a) -> dict:
    """The model flags the user gave, as ResNetConfig overrides."""
    return _given(a, "model")


def _given(a, sec: str) -> dict:
    return {f.name: getattr(a, dest(sec, f.name)) for f in _section_fields(sec)
            if getattr(a, dest(sec, f.name)) is not None}


def config_from_args(a) -> tuple[RunConfig, set[tuple[str, str]]]:
    """The run the flags describe, and the (section, field) pairs the user gave explicitly."""
    explicit = set()
    r = get_recipe(a.recipe or "cifar-paper")
    if a.recipe is not None:
        explicit.add(("recipe", "name"))
    if a.budget is not None:
        r = r.scaled(a.budget)
        explicit |= {("recipe", k) for k in ("iters", "milestones", "warmup_iters", "eval_every", "log_every",
                                             "budget")}
    rk = _given(a, "recipe")
    r = r.with_overrides(**rk)
    if "iters" in rk and "milestones" not in rk:
        explicit.add(("recipe", "milestones"))  # derived from --iters
    mk, dk, tk = _given(a, "model"), _given(a, "data"), _given(a, "runtime")
    explicit |= {("recipe", k) for k in rk} | {("model", k) for k in mk} | {("data", k) for k in dk} \
        | {("runtime", k) for k in tk}
    if a.arch is not None:
        explicit.add(("model", "arch"))
    if a.seed is not None:
        explicit.add(("", "seed"))
    arch, seed = a.arch or "resnet20", a.seed if a.seed is not None else 0
    data = DataSpec(**dk)
    out = a.out or f"runs/{arch}-{data.name}-s{seed}"
    return RunConfig(out, ModelSpec.make(arch, **mk), r, data, Runtime(**tk), seed), explicit


def _arg(sec: str, name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [_flag(sec, name) if value else "--no-" + _flag(sec, name)[2:]]
    if isinstance(value, (tuple, list)):
        return [_flag(sec, name), *map(str, value)]
    return [_flag(sec, name), repr(value) if isinstance(value, float) else str(value)]


def to_cli_args(cfg: RunConfig) -> list[str]:
    """`reslab train` arguments that rebuild `cfg` exactly."""
    r = cfg.recipe
    base = get_recipe(r.name)
    args = ["train", "--arch", cfg.model.arch, "--recipe", r.name, "--seed", str(cfg.seed), "--out", cfg.out]
    if r.budget != base.budget:
        base = base.scaled(r.budget / base.budget)
        args += ["--budget", repr(r.budget / get_recipe(r.name).budget)]
    for f in _section_fields("recipe"):
        v = getattr(r, f.name)
        if v != getattr(base, f.name) or (f.name == "milestones" and r.iters != base.iters):
            args += _arg("recipe", f.name, v)  # milestones spelled out whenever iters changed
    for k, v in cfg.model.options:
        args += _arg("model", k, v)
    for sec, default in (("data", DataSpec()), ("runtime", Runtime())):
        obj = getattr(cfg, sec)
        for f in fields(obj):
            if getattr(obj, f.name) != getattr(default, f.name):
                args += _arg(sec, f.name, getattr(obj, f.name))
    return args


def parse_train_args(argv: list[str]) -> RunConfig:
    """The config a `reslab train` argument list describes (the inverse of to_cli_args)."""
    p = argparse.ArgumentParser(add_help=False)
    add_run_flags(p)
    return config_from_args(p.parse_args(argv[1:] if argv and argv[0] == "train" else argv))[0]
