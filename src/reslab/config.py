"""A run, described once: what to train (`ModelSpec`), how (`Recipe`), on what (`DataSpec`), and where and
how fast (`Runtime`), plus the seed and the run folder.

`RunConfig` is plain data: `to_dict()`/`from_dict()` round-trip it, config.json and every checkpoint hold
it, and experiments build it. The `reslab train` flags are derived from these fields (flags.py: `add_run_flags`), so
a field is named once; `to_cli_args` writes the command line that rebuilds a config, and a test checks that
every experiment's recorded command rebuilds its config exactly.

Resuming: the checkpoint's config is authoritative. Fields marked `free` (where the data lives, the device,
workers, display, compilation, CUDA graphs) may change between sessions; any other field given on the command line with
another value than the run's is an error (`resume_config`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ReslabError
from .recipes import RECIPES, Recipe, get_recipe

FREE = {"free": True}   # field metadata: may differ when a run is resumed


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "resnet20"
    # ResNetConfig fields set for this run (over the arch's own defaults), as sorted (name, value) pairs
    options: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict:
        return dict(self.options)

    @staticmethod
    def make(arch: str, **options) -> "ModelSpec":
        return ModelSpec(arch, tuple(sorted((k, v) for k, v in options.items() if v is not None)))


@dataclass(frozen=True)
class DataSpec:
    name: str = "cifar10"                                  # cifar10 | cifar100 | folder
    dir: str | None = field(default=None, metadata=FREE)   # archive or folder; None: $RESLAB_DATA, else download
    workers: int = field(default=4, metadata=FREE)         # DataLoader workers (image folders)
    decode: str = field(default="auto", metadata=FREE)     # image folders: cpu | device | auto (device on a GPU)
    # image folders: a training image that cannot be decoded stops the run, or is skipped (free: a run stopped
    # by one resumes with skip)
    on_corrupt: str = field(default="stop", metadata=FREE)


@dataclass(frozen=True)
class Runtime:
    device: str = field(default="auto", metadata=FREE)
    precision: str = "auto"              # auto: bf16 on CUDA, fp32 on the CPU
    channels_last: bool | None = None    # None: on (it changes rounding, so a resumed run keeps it)
    compile: bool | None = field(default=None, metadata=FREE)      # None: off (see README: Performance)
    compile_mode: str | None = field(default=None, metadata=FREE)  # torch.compile mode, e.g. reduce-overhead
    graphs: bool | None = field(default=None, metadata=FREE)  # None: capture the step as a CUDA graph where safe
    deterministic: bool = False
    sync_bn: bool = False
    precise_bn: int = 0                  # >0: recompute BN statistics over this many batches before each eval
    tensorboard: bool = field(default=False, metadata=FREE)
    progress: bool = field(default=True, metadata=FREE)


SECTIONS = {"model": ModelSpec, "recipe": Recipe, "data": DataSpec, "runtime": Runtime}


@dataclass(frozen=True)
class RunConfig:
    out: str
    model: ModelSpec = ModelSpec()
    recipe: Recipe = RECIPES["cifar-paper"]
    data: DataSpec = DataSpec()
    runtime: Runtime = Runtime()
    seed: int = 0

    @staticmethod
    def build(out, arch: str = "resnet20", recipe: Recipe | str = "cifar-paper", data: str = "cifar10",
              data_dir=None, seed: int = 0, model: dict | None = None, workers: int = 4, **runtime) -> "RunConfig":
        """The short way to write a config in Python: `RunConfig.build("runs/r20", "resnet20", data_dir=D)`."""
        r = get_recipe(recipe) if isinstance(recipe, str) else recipe
        return RunConfig(str(out), ModelSpec.make(arch, **(model or {})), r,
                         DataSpec(data, None if data_dir is None else str(data_dir), workers), Runtime(**runtime), seed)

    def to_dict(self) -> dict:
        return {"out": self.out, "seed": self.seed, "model": {"arch": self.model.arch, "options": self.model.kwargs()},
                "recipe": self.recipe.to_dict(), "data": dataclasses.asdict(self.data),
                "runtime": dataclasses.asdict(self.runtime)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(d["out"], ModelSpec.make(d["model"]["arch"], **d["model"].get("options", {})),
                   Recipe.from_dict(d["recipe"]), DataSpec(**d["data"]), Runtime(**d["runtime"]), d["seed"])


# ------------------------------------------------------------------ resume
def resume_config(saved: RunConfig, asked: RunConfig, explicit: set[tuple[str, str]] | None) -> RunConfig:
    """The config a resumed run continues with: the saved one, with the free fields the new command sets.

    `explicit`: the (section, field) pairs the user actually gave (None: every field of `asked` counts).
    A non-free field whose asked value differs from the saved one is a one-line error naming both values."""
    def given(sec, name):
        return explicit is None or (sec, name) in explicit

    for sec in ("recipe", "data", "runtime"):
        s, a = getattr(saved, sec), getattr(asked, sec)
        for f in fields(s):
            if f.metadata.get("free") or not given(sec, f.name):
                continue
            if getattr(s, f.name) != getattr(a, f.name):
                _conflict(f"{sec}.{f.name}", getattr(s, f.name), getattr(a, f.name), asked.out)
    if given("model", "arch") and saved.model.arch != asked.model.arch:
        _conflict("model.arch", saved.model.arch, asked.model.arch, asked.out)
    saved_opts, asked_opts = saved.model.kwargs(), asked.model.kwargs()
    # compared as the model they build: `--shortcut A` on a run that took the CIFAR default (A) asks for
    # the same net, so it is no conflict
    from .zoo import resolve_config
    try:
        built = resolve_config(saved.model.arch, **saved_opts), resolve_config(saved.model.arch, **asked_opts)
    except (TypeError, ValueError):
        built = None
    for k in sorted(set(saved_opts) | set(asked_opts)):
        same = (getattr(built[0], k, None) == getattr(built[1], k, None)) if built else \
            saved_opts.get(k) == asked_opts.get(k)
        if given("model", k) and not same:
            _conflict(f"model.{k}", saved_opts.get(k, "default"), asked_opts.get(k, "default"), asked.out)
    if given("", "seed") and saved.seed != asked.seed:
        _conflict("seed", saved.seed, asked.seed, asked.out)
    free = lambda sec: {f.name: getattr(getattr(asked, sec), f.name)  # noqa: E731
                        for f in fields(getattr(asked, sec)) if f.metadata.get("free") and given(sec, f.name)}
    return replace(saved, out=asked.out, data=replace(saved.data, **free("data")),
                   runtime=replace(saved.runtime, **free("runtime")))


class ConfigConflict(ReslabError):
    """A resumed run's saved config and the asked one differ in `field` (a sweep words it its own way)."""

    def __init__(self, field: str, saved, asked, out):
        self.field, self.saved, self.asked, self.out = field, saved, asked, out
        super().__init__(f"--resume: {field} is {saved!r} in the run at {out}, but this command asks for "
                         f"{asked!r}; a resumed run keeps its config (drop the flag, or start a new run in another "
                         "--out" + ("; --extend-to N lengthens a run)" if field == "recipe.iters" else ")"))


def _conflict(name: str, saved, asked, out) -> None:
    raise ConfigConflict(name, saved, asked, out)


def extend(cfg: RunConfig, iters: int) -> RunConfig:
    """Lengthen a run to `iters` iterations. Only the total changes: every milestone stays where it was
    (those already passed and those to come), so the first part of the run is exactly what it was, and a
    run extended from N to M equals a run started with M iterations and the same milestones."""
    r = cfg.recipe
    if iters <= r.iters:
        raise ReslabError(f"--extend-to {iters} must be more than the run's {r.iters} iterations")
    if r.schedule != "step":
        why = ("a cosine schedule's lr depends on the total number of iterations, so the part already trained "
               "would not belong to the longer run" if r.schedule == "cosine" else
               f"lengthening a {r.schedule} schedule (its lr follows the evaluations made) is not supported yet")
        raise ReslabError(f"--extend-to lengthens step schedules only: {why}")
    return replace(cfg, recipe=replace(r, iters=iters))
