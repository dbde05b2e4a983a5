"""What one run folder records, read into one shape: reslab's runs of every version and the control
script's (benchmarks/control_cifar.py) alike. `summarize(RUN)` is what the report's tables and figures read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .logs import hardware_line, read_metrics


def files_named(root: Path, *names: str, keep=None) -> list[Path]:
    """Files with one of `names` (or whose name `keep` accepts) under root, following symbolic links to folders
    (a report gathered from runs linked into one folder), each real folder visited once (a link to an
    ancestor does not loop)."""
    keep = keep or (lambda f: f in names)
    found, seen = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(here) / f for f in files if keep(f)]
    return found


def find_runs(root: Path) -> list[Path]:
    """The classification run folders under root (config.json + metrics.jsonl); detection runs are left to
    `reslab detect eval`."""
    return sorted({p.parent for p in files_named(root, "metrics.jsonl")
                   if (p.parent / "config.json").is_file() and not _is_detection(p.parent)})


def without_record(root: Path, runs: list[Path]) -> list[tuple[Path, str]]:
    """Folders under root holding a classification checkpoint (last.pt, best.pt) but not the record a report
    reads: (folder, what is missing). `reslab reproduce` counts such a run done from its checkpoint, so a
    report that passed it over in silence would average fewer seeds without a word."""
    from . import checkpoint as ckpt
    found = set(runs)
    out = []
    for folder in sorted({p.parent for p in files_named(root, ckpt.LAST, ckpt.BEST)} - found):
        if _is_detection(folder):
            continue
        try:
            if "detector" in ckpt.load(next(folder / n for n in (ckpt.LAST, ckpt.BEST) if (folder / n).is_file()),
                                       mmap=True):
                continue
        except Exception:  # noqa: BLE001 - unreadable: still a folder whose run the report cannot show
            pass
        missing = [n for n in ("config.json", "metrics.jsonl") if not (folder / n).is_file()]
        out.append((folder, f"holds a checkpoint but no {' or '.join(missing)}, so its run cannot be reported "
                            "(`reslab train --out FOLDER --resume` writes config.json again; the log is lost)"))
    return out


def _is_detection(run: Path) -> bool:
    try:
        return "detector" in json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _flat_config(cfg: dict) -> dict:
    """config.json as this version writes it (sections: model, recipe, data, runtime), as earlier versions
    and the control script wrote it (arch, seed, precision at the top), in one shape."""
    if "model" in cfg and "runtime" in cfg:
        info, rt = cfg.get("data_info") or {}, cfg["runtime"]
        ident = info.get("identity") or {}
        return {"arch": cfg["model"]["arch"], "options": cfg["model"].get("options") or {}, "seed": cfg["seed"],
                "recipe": cfg["recipe"],
                "model_config": cfg.get("model_config", {}), "precision": rt["precision"],
                "eval_split": info.get("eval_split"), "data": ident.get("description"),
                "data_md5": ident.get("pixels_md5") or ident.get("md5"),
                "data_name": info.get("name"), "data_dir": (cfg.get("data") or {}).get("dir"),
                "implementation": "reslab", "device": rt.get("device"), "world_size": cfg.get("world_size", 1), "world_sizes": cfg.get("world_sizes"),
                "precise_bn": rt.get("precise_bn", 0), "sync_bn": rt.get("sync_bn", False)}
    # earlier versions kept the model's switches (width, shortcut, ...) in model_overrides; the control script
    # writes its data's fingerprint as test_pixels_md5
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    return {**cfg, "options": cfg.get("options") or cfg.get("model_overrides") or {},
            "data": data.get("description"), "data_md5": data.get("test_pixels_md5"), "data_dir": data.get("dir"),
            "implementation": cfg.get("implementation", "reslab")}


def _variant(cfg: dict) -> bool:
    """Whether the run's net differs from its architecture's default (a width, a block design, option B on
    a CIFAR net): options that restate a default (`--shortcut A` on a CIFAR net) leave it the paper's net."""
    if not cfg.get("options"):
        return False
    built = cfg.get("model_config")
    if not built:  # an earlier record without the built config: its options are all there is
        return True
    from .zoo import resolve_config
    try:  # the config alone: building a resnet1202 per run only to read its options would take seconds
        return resolve_config(cfg["arch"]).metadata() != built
    except (ValueError, KeyError, TypeError):  # an architecture this version does not know
        return True


def _device_type(cfg: dict, env: dict) -> str:
    """cpu or cuda: where the run trained (fp32 on CUDA is TF32, another number than the CPU's fp32)."""
    if env.get("device"):
        return env["device"]
    dev = str(cfg.get("device") or "auto")
    return dev.split(":")[0] if dev != "auto" else "cuda" if env.get("gpus") else "cpu" if env else "?"


def summarize(run: Path) -> dict:
    cfg = _flat_config(json.loads((run / "config.json").read_text()))
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
    env = env if isinstance(env, dict) else {}
    rows = read_metrics(run)
    # in step order (a log merged or copied by hand may not be); of one step's lines the last one written
    train = sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: r["step"])
    # the engine logs a "diverged" line before it stops; a resume from the last good checkpoint drops it
    diverged = [r["step"] for r in rows if r["kind"] == "diverged"]
    iters = cfg["recipe"]["iters"]
    _agrees_with_checkpoint(run, cfg)
    last_eval = evals[-1] if evals else {}
    tail = train[-5:]  # the training error of the last few logging intervals
    test_err = 100 * last_eval["top1_err"] if evals else None
    if test_err is not None and not math.isfinite(test_err) and not diverged:  # a NaN logged (control, earlier logs)
        diverged = [last_eval["step"]]
    return {
        "run": run.name, "path": str(run), "arch": cfg["arch"], "options": cfg.get("options") or {},
        "variant": _variant(cfg), "seed": cfg["seed"],
        "shortcut": cfg.get("model_config", {}).get("shortcut"), "residual": cfg.get("model_config", {}).get("residual"),
        "budget": budget_of(cfg["recipe"]), "iters": iters, "recipe_key": recipe_key(cfg["recipe"]),
        "step": last_eval.get("step", train[-1]["step"] if train else 0),
        "complete": bool(evals) and last_eval.get("step") == iters and not diverged,
        "diverged_at": diverged[-1] if diverged else None,
        "test_err": test_err,
        # the minimum over evaluations chooses on the test set: a column of the runs table, never a result
        "min_test_err": 100 * min(e["top1_err"] for e in evals if math.isfinite(e["top1_err"]))
        if any(math.isfinite(e["top1_err"]) for e in evals) else None,
        "train_err": 100 * sum(r["train_err"] for r in tail) / len(tail) if tail else None,
        "eval_split": cfg.get("eval_split"), "wall_min": (last_eval or (train[-1] if train else {})).get("elapsed_s", 0) / 60,
        "hardware": _hardware(env), "torch": env.get("torch"), "git": env.get("git"),
        "device": _device_type(cfg, env), "world_size": cfg.get("world_size", 1), "world_sizes": cfg.get("world_sizes"),
        "precise_bn": cfg.get("precise_bn", 0), "sync_bn": cfg.get("sync_bn", False),
        "precision": cfg.get("precision"), "implementation": cfg["implementation"], "data": cfg["data"],
        "data_md5": cfg.get("data_md5"), "data_dir": cfg.get("data_dir"), "data_name": cfg.get("data_name"),
        "curves": {"train": [(r["step"], 100 * r["train_err"]) for r in train],
                                                      "test": [(r["step"], 100 * r["top1_err"]) for r in evals]},
    }


def _agrees_with_checkpoint(run: Path, cfg: dict) -> None:
    """config.json against the run's last.pt, where both are there: the table row comes from the one and
    `reproduce` reads the other, so a record edited by hand (or copied from another run) would file a
    result under another net without a word. Read with the tensors left on disk."""
    from . import checkpoint as ckpt
    from .errors import ReslabError
    if cfg.get("implementation") != "reslab" or not (run / ckpt.LAST).is_file():
        return
    try:
        ck = ckpt.load(run / ckpt.LAST, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reproduce's to name; the record stands
        return
    saved = ck.get("config") or {}
    have = {"arch": (saved.get("model") or {}).get("arch"), "seed": saved.get("seed"),
            "iters": (saved.get("recipe") or {}).get("iters")}
    said = {"arch": cfg["arch"], "seed": cfg["seed"], "iters": cfg["recipe"].get("iters")}
    # more iterations in config.json than in last.pt: `--resume --extend-to` stopped before its first save
    # (config.json is written when a session starts); the run is that extension, in progress
    extending = isinstance(said["iters"], int) and isinstance(have["iters"], int) and said["iters"] > have["iters"]
    wrong = [f"{k} {said[k]!r} in config.json, {have[k]!r} in {ckpt.LAST}" for k in have
             if have[k] is not None and said[k] != have[k] and not (k == "iters" and extending)]
    if wrong:
        raise ReslabError(f"its record and its checkpoint disagree ({'; '.join(wrong)})")


def _hardware(env: dict) -> str:
    """The hardware line, and that of earlier sessions of a resumed run where they differ."""
    try:
        lines = [hardware_line(env)]
        for e in env.get("earlier", []):
            if hardware_line(e) not in lines:
                lines.append(hardware_line(e))
    except (KeyError, TypeError, AttributeError, IndexError):  # an env.json edited or written by something else
        return "?"
    return lines[0] + (f" (earlier sessions: {', '.join(lines[1:])})" if len(lines) > 1 else "")


def depth(arch: str) -> int:
    return int("".join(c for c in arch if c.isdigit()) or 0)


def budget_of(recipe: dict) -> float:
    """The fraction of its named recipe's schedule a run trained: its --budget, or for a run given --iters
    (which keeps the recipe's proportions) iters over the recipe's; "x1" for `--iters 40` misled."""
    from .recipes import RECIPES
    b = recipe.get("budget", 1.0)
    full = RECIPES.get(recipe.get("name"))
    try:
        if full is None or full.scaled(b).iters == recipe.get("iters"):
            return b
    except ValueError:  # a budget this version refuses: as recorded
        return b
    return recipe["iters"] / full.iters if recipe.get("iters") else b


# recipe fields that change what is logged, not what is trained
_LOGGING = {"eval_every", "log_every", "budget"}


def recipe_key(recipe: dict) -> str:
    """The recipe as this version reads it (fields an earlier version did not write take their defaults,
    which is what that version trained with), less its logging fields."""
    from .recipes import Recipe
    try:
        recipe = Recipe.from_dict(recipe).to_dict()
    except (TypeError, ValueError):  # a field this version does not know: compared as written
        pass
    # the plateau schedule divides the lr after evaluations: there the evaluation interval is training
    logging = _LOGGING - {"eval_every"} if recipe.get("schedule") == "plateau" else _LOGGING
    return json.dumps({k: v for k, v in recipe.items() if k not in logging}, sort_keys=True, default=str)
