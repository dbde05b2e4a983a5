"""The sweep runner behind `reslab reproduce`: run an experiment's runs, skipping finished ones and resuming
interrupted ones, then write the report.

Layout: OUT/BUDGET/RUN_NAME/ is one `reslab train` run folder. Runs are shared between experiments with the
same recipe and budget (the layer-response analysis reads the checkpoints the degradation runs wrote).
OUT/BUDGET/manifest-EXPERIMENT.json records the experiment, and for each run its config and the exact
`reslab train` command that rebuilds that config.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import checkpoint as ckpt
from . import interrupt
from .complexity import count_macs
from .config import ConfigConflict, RunConfig, resume_config
from .errors import ReslabError
from .experiments import BUDGETS, get_experiment
from .logs import last_evaluation, read_metrics, truncate_metrics
from .flags import to_cli_args
from .fusedset import fusion_key, train_fused
from .runset import train_set
from .state import data_difference
from .step import resolve_runtime
from .zoo import create_model

# Effective training throughput used only for --dry-run estimates, in FLOP/s (6 x MACs x images/s), from
# runs in docs/results: the quick cifar-degradation runs' median logged speeds on the 2-core CPU (330 img/s
# at depth 20, 105-117 at depth 56: 0.08 TFLOP/s each; an earlier 0.15 came from ~600 img/s in a bench loop
# and gave half the wall time the runs took); ~11k img/s for ResNet-20 on one H100 (bf16, eager).
EFFECTIVE_FLOPS = {"cpu": 0.08e12, "cuda": 2.7e12}


def run_status(run_dir: Path) -> str:
    """new | done | resume@STEP | diverged@STEP | unusable, read from the run's last checkpoint without loading
    its tensors (diverged: its log's last line says so, and its last good checkpoint is kept);
    without one, from its log: logged (finished, only its record is here: the report needs no more) or
    lost@STEP (evaluated up to STEP, checkpoint missing: it cannot be continued)."""
    rows = read_metrics(run_dir)
    if rows and rows[-1].get("kind") == "diverged":  # it would diverge again, the same way: not retrained
        return f"diverged@{rows[-1]['step']}"
    if not (Path(run_dir) / ckpt.LAST).is_file():
        ev = last_evaluation(run_dir)
        if ev is None:  # nothing, or an attempt killed before its first checkpoint: trained from the start
            return "new"
        return "logged" if ev["step"] == _recorded_config(Path(run_dir)).recipe.iters else f"lost@{ev['step']}"
    try:
        st = ckpt.read_status(run_dir)
    except ReslabError:
        return "unusable"
    return "done" if st["finished"] else f"resume@{st['step']}"


def estimate_seconds(cfg: RunConfig, device_type: str) -> float:
    macs = count_macs(create_model(cfg.model.arch, **cfg.model.kwargs()))
    flops = 6.0 * macs * cfg.recipe.iters * cfg.recipe.batch_size
    return flops / EFFECTIVE_FLOPS.get(device_type, EFFECTIVE_FLOPS["cpu"])


def resolved(cfg: RunConfig) -> RunConfig:
    """The config with its automatic runtime choices made, as a run records it."""
    from .dist import pick_device
    return replace(cfg, runtime=resolve_runtime(cfg.runtime, pick_device(cfg.runtime.device)))


def command(cfg: RunConfig) -> str:
    return shlex.join(["reslab", *to_cli_args(cfg)])  # quoted: paths may hold spaces


def groups_of(pending: list[RunConfig], k: int, fused: bool) -> list[list[RunConfig]]:
    """The runs trained together, `k` at a time in order; with `fused`, runs that differ only in seed and
    folder go together (a fused set), each architecture's seeds in the order they come."""
    if not fused:
        return [pending[i:i + k] for i in range(0, len(pending), k)]
    by_kind: dict[str, list[RunConfig]] = {}
    for c in pending:
        by_kind.setdefault(fusion_key(c), []).append(c)
    return [runs[i:i + k] for runs in by_kind.values() for i in range(0, len(runs), k)]


def budget_text(budget: str, configs: list[RunConfig]) -> str:
    """What a budget means for this experiment's recipe (BUDGETS' descriptions are the CIFAR recipe's):
    its iterations, batch and lr schedule."""
    if not configs:
        return BUDGETS[budget].description
    r = configs[0].recipe
    lr = {"step": f"lr x{r.gamma:g} at {'/'.join(f'{m:,}' for m in r.milestones)}" if r.milestones else "constant lr",
          "plateau": f"lr x{r.gamma:g} when the validation error plateaus", "cosine": "cosine lr"}.get(r.schedule, r.schedule)
    return f"x{BUDGETS[budget].scale:g} of the {r.name} recipe's schedule: {r.iters:,} iterations at batch {r.batch_size}, {lr}"


def _recorded_config(run: Path) -> RunConfig:
    """The config a run folder's config.json records (a run logged without its checkpoint has no other)."""
    try:
        return RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReslabError(f"{run} holds a run's log without its checkpoint, and a config.json this reslab cannot "
                          f"read (missing or from an earlier version: {e!r}); move that folder away, or give "
                          "reproduce another --out") from None


def _check_is_ours(cfg: RunConfig, experiment: str) -> None:
    saved = (RunConfig.from_dict(ckpt.read_status(cfg.out)["config"]) if (Path(cfg.out) / ckpt.LAST).is_file()
             else _recorded_config(Path(cfg.out)))
    try:
        resume_config(saved, resolved(cfg), None)
    except ConfigConflict as e:
        raise ReslabError(f"{cfg.out} holds another run than {experiment}'s: its {e.field} is {e.saved!r} where the "
                          f"experiment trains with {e.asked!r}; move that folder away, or give reproduce another "
                          "--out") from None


def _other_data(cfg: RunConfig, identify) -> str | None:
    """Why the run in cfg.out was trained on other data than cfg's --data-dir holds (None: the same, or no
    record to tell: runs from before data was recorded, or data that cannot be read now). The data folder is
    a free field of a run's config, so without this a run trained on a subset counted as done for the full
    data, and the manifest said it was trained on it."""
    try:
        saved = json.loads((Path(cfg.out) / "config.json").read_text()).get("data_info")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(saved, dict) or not saved:
        return None
    try:
        now = identify(cfg)
    except (ReslabError, OSError):
        return None
    why = data_difference(saved, now)
    return why and (f"{cfg.out} was trained on other data than --data-dir {cfg.data.dir} holds ({why}); give "
                    "reproduce the data it was trained on, or another --out")


def _identifier():
    """identify(cfg): the data a config names, as a run records it; each data folder read once."""
    from .data.build import identify
    seen: dict = {}

    def of(cfg: RunConfig) -> dict:
        key = (cfg.data.name, cfg.data.dir, cfg.recipe.val_split)
        if key not in seen:
            seen[key] = identify(*key)
        return seen[key]
    return of


def _obstacle(cfg: RunConfig, name: str, status: str, post: str | None, identify=None) -> str | None:
    """Why the run folder of `cfg` would stop `reproduce name` before anything trains (None: it would not):
    shown by --dry-run, raised by the real run."""
    if status == "unusable":
        try:
            ckpt.read_status(cfg.out)
        except ReslabError as e:  # unreadable, or from an earlier reslab: say which, and what to do
            return f"{e}; move {Path(cfg.out) / ckpt.LAST} away to restart that run"
    if status != "new":  # a run found on disk, finished or to resume, must be this experiment's run, on this data
        try:
            _check_is_ours(cfg, name)
        except ReslabError as e:
            return str(e)
        if identify is not None and (why := _other_data(cfg, identify)):
            return why
    if status.startswith("lost@"):
        return (f"{cfg.out} holds the log of a run evaluated up to step {status[5:]} of {cfg.recipe.iters} but not "
                f"its checkpoint ({ckpt.LAST}), so it cannot be continued; bring that checkpoint back, or move the "
                "folder away to train the run again")
    if status == "logged" and post == "layer_responses":
        return (f"{name} reads each run's weights, and {cfg.out} holds only the record of its finished run (no "
                f"{ckpt.LAST}); bring that checkpoint back, or move the folder away to train the run again")
    return None


def reproduce(name: str, data_dir, out, budget: str = "quick", seeds: int | None = None, dry_run: bool = False,
              device: str = "auto", report: bool = True, concurrent: int = 1, fused: bool = False,
              graphs: bool | None = None) -> list[Path]:
    """Train what is missing of experiment `name` at `budget` (`concurrent` runs at a time in one process, as a
    RunSet, or with `fused` as fused sets of runs that differ only in seed), then the analysis and the
    report."""
    from .dist import pick_device
    exp = get_experiment(name)
    if concurrent < 1:
        raise ReslabError(f"--concurrent must be at least 1, got {concurrent}")
    if seeds is not None and seeds < 1:  # 0 would train nothing and report success
        raise ReslabError(f"--seeds must be at least 1, got {seeds}")
    if fused and concurrent < 2:
        raise ReslabError("--fused trains --concurrent K runs as one model: give K of 2 or more")
    if exp.needs and not data_dir:
        raise ReslabError(f"{name} needs {exp.needs}")
    configs = [replace(c, runtime=replace(c.runtime, device=device, graphs=graphs))
               for c in exp.configs(budget, out, data_dir, seeds)]
    root = Path(out) / budget
    dev = pick_device(device)
    total = 0.0
    print(f"{name} ({exp.paper}) at budget {budget}: {budget_text(budget, configs)}; {len(configs)} runs on {dev.type}")
    refused, identify = 0, _identifier()
    for cfg in configs:
        status = run_status(Path(cfg.out))
        why = _obstacle(cfg, name, status, exp.post, identify)
        refused += why is not None
        est = 0.0 if why or status in ("done", "logged") or status.startswith("diverged@") \
            else estimate_seconds(cfg, dev.type)
        total += est
        print(f"  {Path(cfg.out).name:<16} {'refused' if why else status:<12} ~{est / 60:5.1f} min   {command(cfg)}")
        if why:  # what the real run would stop on, before it trains anything
            print(f"    {why}")
    print(f"  estimated total: ~{total / 60:.0f} min (at {EFFECTIVE_FLOPS.get(dev.type, 0) / 1e12:.2f} effective "
          f"TFLOP/s for {dev.type})")
    dirs = [Path(c.out) for c in configs]
    if dry_run:
        if refused:
            print(f"  {refused} run folder{'s' if refused > 1 else ''} would stop the run before it trains anything "
                  "(the reason is under each)")
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"experiment": name, "paper": exp.paper, "budget": budget,
                "budget_description": budget_text(budget, configs), "data": exp.data,
                "runs": [{"name": Path(c.out).name, "config": c.to_dict(), "command": command(c)} for c in configs]}
    (root / f"manifest-{name}.json").write_text(json.dumps(manifest, indent=2))
    pending = []
    for cfg in configs:
        status = run_status(Path(cfg.out))
        # every folder checked before any run trains: a stranger in the last one would stop the sweep hours in
        if why := _obstacle(cfg, name, status, exp.post, identify):
            raise ReslabError(why)
        if status == "done":  # a kill between its final save and log write lost the line the report reads
            st = ckpt.read_status(cfg.out)
            truncate_metrics(cfg.out, st["step"], st["metrics"])
        if status.startswith("diverged@"):  # deterministic: trained again it diverges again; the report names it
            print(f"reslab: {cfg.out} diverged at step {status[9:]} (its log says so) and is not trained again; "
                  "move the folder away to train it afresh", file=sys.stderr)
        elif status not in ("done", "logged"):
            pending.append(cfg)
    groups, finished = groups_of(pending, concurrent, fused), []
    with interrupt.stop_on_sigterm():  # one that lands in a group's last step stops the sweep before the next
        for k, group in enumerate(groups):  # runs not yet finished, `concurrent` at a time
            if interrupt.requested():
                left = sum(len(g) for g in groups[k:])
                done = f"{', '.join(finished)} finished; " if finished else ""
                raise interrupt.Interrupted(f"{done}{left} runs not started", "the same command")
            names = ", ".join(Path(c.out).name for c in group)
            t = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {names}: training", file=sys.stderr, flush=True)
            # resume=True also starts a run that has no checkpoint yet; a resumed run must be the experiment's
            # run (every field but the free ones: data folder, device, ...), else a one-line error says which
            (train_fused if fused and len(group) > 1 else train_set)(group, resume=True)
            finished += [Path(c.out).name for c in group]
            print(f"[{time.strftime('%H:%M:%S')}] {names}: done in {(time.time() - t) / 60:.1f} min",
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
