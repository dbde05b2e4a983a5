"""The sweep runner behind `reslab reproduce`: run an experiment's runs, skipping finished ones and resuming
interrupted ones, then write the report.

Layout: OUT/BUDGET/RUN_NAME/ is one `reslab train` run folder. Runs are shared between experiments with the
same recipe and budget (the layer-response analysis reads the checkpoints the degradation runs wrote).
OUT/BUDGET/manifest-EXPERIMENT.json records the experiment, its runs and their exact commands.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt
from .complexity import count_macs
from .engine import TrainSettings, train
from .errors import ReslabError
from .experiments import BUDGETS, Run, get_experiment
from .zoo import create_model

# Effective training throughput used only for --dry-run estimates, in FLOP/s (6 x MACs x images/s), from
# measurements in docs/results: ~600 img/s for ResNet-20 on a 2-core CPU; ~11k img/s on one H100.
EFFECTIVE_FLOPS = {"cpu": 0.15e12, "cuda": 2.7e12}


def run_status(run_dir: Path, iters: int) -> str:
    last = run_dir / ckpt.LAST
    if not last.is_file():
        return "new"
    try:
        step = ckpt.load(last)["step"]
    except ReslabError:
        return "corrupt"
    return "done" if step >= iters else f"resume@{step}"


def estimate_seconds(run: Run, device_type: str) -> float:
    macs = count_macs(create_model(run.arch, **dict(run.overrides)))
    flops = 6.0 * macs * run.recipe.iters * run.recipe.batch_size
    return flops / EFFECTIVE_FLOPS.get(device_type, EFFECTIVE_FLOPS["cpu"])


def reproduce(name: str, data_dir, out, budget: str = "quick", seeds: int | None = None, dry_run: bool = False,
              device: str = "auto", report: bool = True) -> list[Path]:
    from .dist import pick_device
    exp = get_experiment(name)
    if exp.needs and not data_dir:
        raise ReslabError(f"{name} needs {exp.needs}")
    runs = exp.runs(budget, seeds)
    root = Path(out) / budget
    dev = pick_device(device)
    total = 0.0
    print(f"{name} ({exp.paper}) at budget {budget}: {BUDGETS[budget].description}; {len(runs)} runs on {dev.type}")
    dirs = []
    for run in runs:
        d = root / run.name
        dirs.append(d)
        status = run_status(d, run.recipe.iters)
        est = 0.0 if status == "done" else estimate_seconds(run, dev.type)
        total += est
        print(f"  {run.name:<16} {status:<12} ~{est / 60:5.1f} min   reslab {' '.join(run.cli_args(exp.data, data_dir, str(d)))}")
    print(f"  estimated total: ~{total / 60:.0f} min (at {EFFECTIVE_FLOPS.get(dev.type, 0) / 1e12:.2f} effective "
          f"TFLOP/s for {dev.type})")
    if dry_run:
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"experiment": name, "paper": exp.paper, "budget": budget, "budget_description":
                BUDGETS[budget].description, "data": exp.data,
                "runs": [{"name": r.name, "arch": r.arch, "seed": r.seed, "overrides": dict(r.overrides),
                          "command": "reslab " + " ".join(r.cli_args(exp.data, data_dir, str(root / r.name)))}
                         for r in runs]}
    (root / f"manifest-{name}.json").write_text(json.dumps(manifest, indent=2))
    for run, d in zip(runs, dirs):
        status = run_status(d, run.recipe.iters)
        if status == "done":
            continue
        if status == "corrupt":
            raise ReslabError(f"{d / ckpt.LAST} is unreadable; move it away to restart that run")
        t = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {status}", file=sys.stderr, flush=True)
        train(TrainSettings(recipe=run.recipe, out=str(d), arch=run.arch, model_overrides=dict(run.overrides),
                            data=exp.data, data_dir=data_dir, seed=run.seed, device=device,
                            resume=status.startswith("resume")))
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: done in {(time.time() - t) / 60:.1f} min",
              file=sys.stderr, flush=True)
    if exp.post == "layer_responses":
        from .responses import responses_for_runs
        resp = responses_for_runs(dirs, data_dir)
        (root / "layer_responses.json").write_text(json.dumps(resp, indent=2))
        print(f"layer responses: {root / 'layer_responses.json'}")
    if report:
        from .report import write_report
        write_report(Path(out))
    return dirs
