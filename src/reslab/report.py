"""`reslab report DIR`: plots, tables and numbers from every run folder found under DIR.

Writes into DIR: report.md (paper-vs-ours tables with budget, hardware, wall time and versions next to every
number, and the exact commands), results.json and results.csv (one row per run), degradation.png (paper
Fig. 1/6 style: dashed training error, bold test error), and layer_responses.png when
layer_responses.json is present (written by `reslab reproduce layer-responses`).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

from .errors import ReslabError
from .logs import hardware_line, read_metrics

# docs/paper.md: Table 6 (CIFAR-10 test error %) and other reproductions' numbers.
PAPER_TABLE6 = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                "resnet1202": 7.93}
PAPER_TABLE6_NOTE = {"resnet110": "6.43 best of 5; 6.61±0.16 mean±std"}
OTHERS = {"popular PyTorch reproduction (200 epochs)": {"resnet20": 8.27, "resnet32": 7.37, "resnet44": 6.90,
                                                       "resnet56": 6.61, "resnet110": 6.32},
          "fb.resnet.torch": {"resnet20": 8.29, "resnet32": 7.63, "resnet44": 7.14, "resnet56": 6.94,
                              "resnet110": 6.73}}


def find_runs(root: Path) -> list[Path]:
    """The classification run folders under root (config.json + metrics.jsonl); detection runs are left to
    `reslab detect eval`."""
    return sorted({p.parent for p in Path(root).rglob("metrics.jsonl")
                   if (p.parent / "config.json").is_file() and not _is_detection(p.parent)})


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
                "implementation": "reslab", "device": rt.get("device"), "world_size": cfg.get("world_size", 1),
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
    last_eval = evals[-1] if evals else {}
    tail = train[-5:]  # the training error of the last few logging intervals
    test_err = 100 * last_eval["top1_err"] if evals else None
    if test_err is not None and not math.isfinite(test_err) and not diverged:  # a NaN logged (control, earlier logs)
        diverged = [last_eval["step"]]
    return {
        "run": run.name, "path": str(run), "arch": cfg["arch"], "options": cfg.get("options") or {},
        "variant": _variant(cfg), "seed": cfg["seed"],
        "shortcut": cfg.get("model_config", {}).get("shortcut"), "residual": cfg.get("model_config", {}).get("residual"),
        "budget": cfg["recipe"].get("budget", 1.0), "iters": iters, "recipe_key": _recipe_key(cfg["recipe"]),
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
        "device": _device_type(cfg, env), "world_size": cfg.get("world_size", 1),
        "precise_bn": cfg.get("precise_bn", 0), "sync_bn": cfg.get("sync_bn", False),
        "precision": cfg.get("precision"), "implementation": cfg["implementation"], "data": cfg["data"],
        "data_md5": cfg.get("data_md5"), "data_dir": cfg.get("data_dir"), "data_name": cfg.get("data_name"),
        "curves": {"train": [(r["step"], 100 * r["train_err"]) for r in train],
                                                      "test": [(r["step"], 100 * r["top1_err"]) for r in evals]},
    }


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


def _depth(arch: str) -> int:
    return int("".join(c for c in arch if c.isdigit()) or 0)


def plot_degradation(runs: list[dict], path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in runs if r["implementation"] == "reslab"]  # the control has its own section, no curves
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    families = [(name, test) for name, test in (("plain", lambda r: r["residual"] is False),
                                                 ("ResNet", lambda r: bool(r["residual"])))
                if any(test(r) for r in runs)]
    if not families:
        return False
    # a row of panels per budget: curves of different schedules on one axis would read as one experiment
    fig, axes = plt.subplots(len(budgets), len(families), figsize=(6 * len(families), 4.2 * len(budgets)),
                             squeeze=False)
    groups = []
    for i, b in enumerate(budgets):
        for j, (name, test) in enumerate(families):
            rs = [r for r in runs if r["budget"] == b and test(r)]
            if rs:
                groups.append((axes[i][j], (f"{name} (x{b:g})" if len(budgets) > 1 else name), rs))
            else:
                axes[i][j].set_visible(False)
    for ax, title, rs in groups:
        rs = sorted(rs, key=lambda r: (_depth(r["arch"]), r["seed"]))
        cmap = plt.get_cmap("viridis", max(2, len(rs)))
        for i, r in enumerate(rs):
            c = cmap(i)
            tx, ty = zip(*r["curves"]["train"]) if r["curves"]["train"] else ((), ())
            ax.plot(tx, ty, "--", color=c, linewidth=1)
            if r["curves"]["test"]:
                ex, ey = zip(*r["curves"]["test"])
                # a variant (width, block design, ...) is named by its run, not passed off as the plain net
                label = r["run"] if r.get("variant") else f"{title.split()[0]}-{_depth(r['arch'])}" + (
                    f" s{r['seed']}" if r["seed"] else "")
                ax.plot(ex, ey, "-", color=c, linewidth=2.4, label=label)
        ax.set_title(f"{title} (dashed: training error, bold: test error)", fontsize=10)
        ax.set_xlabel("iterations")
        ax.set_ylabel("error (%)")
        # a diverged run logs NaN or inf: the axis fits the finite points
        top = max([y for r in rs for _, y in r["curves"]["train"] + r["curves"]["test"] if math.isfinite(y)] or [60])
        ax.set_ylim(0, min(100, 10 * (int(top) // 10 + 1)))  # fits every curve (the paper's plots clip)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_responses(resp: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(7, 6))
    for name, r in sorted(resp.items(), key=lambda kv: (not kv[1]["arch"].startswith("plain"), _depth(kv[1]["arch"]))):
        style = "--" if r["arch"].startswith("plain") else "-"
        axes[0].plot(range(1, len(r["std"]) + 1), r["std"], style, label=r["arch"])
        axes[1].plot(range(1, len(r["std"]) + 1), sorted(r["std"], reverse=True), style, label=r["arch"])
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def response_claims(resp: dict) -> list[str]:
    """Fig. 7's two observations, checked on these nets by the mean over layers of the response std (seeds
    averaged): ResNets respond less than their plain counterparts, and deeper ResNets respond less."""
    by_arch: dict[str, list[float]] = {}
    for r in resp.values():
        by_arch.setdefault(r["arch"], []).append(statistics.mean(r["std"]))
    mean = {a: statistics.mean(v) for a, v in by_arch.items()}
    res = sorted((a for a in mean if a.startswith("resnet")), key=_depth)
    pairs = [(a, "plain" + a[len("resnet"):]) for a in res if "plain" + a[len("resnet"):] in mean]
    out = []
    if pairs:
        held = [mean[a] < mean[p] for a, p in pairs]
        out.append(f"- ResNets respond less than their plain counterparts: **{_verdict(held)}** ("
                   + "; ".join(f"{a} {mean[a]:.3f} vs {p} {mean[p]:.3f}" for a, p in pairs) + ").")
    if len(res) > 1:
        held = [mean[b] < mean[a] for a, b in zip(res, res[1:])]
        out.append(f"- Deeper ResNets respond less: **{_verdict(held)}** ("
                   + " → ".join(f"{a} {mean[a]:.3f}" for a in res) + ").")
    return out + (["", "Measure: the mean over 3×3 layers of each BN output's std (the paper's Fig. 7 plots the "
                   "layers one by one)."] if out else [])


def _verdict(held: list[bool]) -> str:
    return "holds" if all(held) else "does not hold" if not any(held) else "holds in part"


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


# recipe fields that change what is logged, not what is trained
_LOGGING = {"eval_every", "log_every", "budget"}


def _recipe_key(recipe: dict) -> str:
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


def _recipe_diff(key: str, reference: str) -> str:
    a, b = json.loads(key), json.loads(reference)
    return ", ".join(f"{k}={a.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "iters")


def _finite(v) -> bool:
    """A test error that can be averaged."""
    return v is not None and math.isfinite(v)


def _paper_recipe_key(recipe: dict) -> str | None:
    """The key of the named recipe as the paper defines it, scaled to this run's budget (None: a recipe this
    version does not know)."""
    from .recipes import RECIPES
    if recipe.get("name") not in RECIPES:
        return None
    return _recipe_key(RECIPES[recipe["name"]].scaled(recipe.get("budget", 1.0)).to_dict())


def one_per_seed(runs: list[dict]) -> tuple[list[dict], int]:
    """The runs with one per seed (the first by folder): the same seed trained twice is one sample of the
    seed spread, not two. Returns the kept runs and how many were left out."""
    kept: dict = {}
    for r in sorted(runs, key=lambda r: r["path"]):
        kept.setdefault(r["seed"], r)
    return list(kept.values()), len(runs) - len(kept)


def _paper_key_of(r: dict) -> str | None:
    """The paper's recipe at run r's budget, as a key comparable to r's (None: r's recipe is not one this
    version names)."""
    return _paper_recipe_key(json.loads(r["recipe_key"]) | {"budget": r["budget"]})


def _data_key(r: dict):
    """Which data a run used: its test images' fingerprint where recorded, else its description."""
    return r.get("data_md5") or r["data"]


def _setting(r: dict) -> str:
    """How a run trained beyond recipe and precision, where that changes its number: the device type (fp32
    on CUDA is TF32), the ranks (BN sees a rank's share of the batch), synchronised and precise BN."""
    parts = [r.get("device") or "?"]
    if (r.get("world_size") or 1) > 1:
        parts.append(f"{r['world_size']} ranks" + (", sync BN" if r.get("sync_bn") else ""))
    if r.get("precise_bn"):
        parts.append(f"precise BN {r['precise_bn']}")
    return ", ".join(parts)


def _sample(runs: list[dict]) -> dict:
    """The numbers a row reports for its runs: finished runs only (a run stopped mid-schedule has a higher
    error that would pass for seed spread; a diverged one has none), one per seed."""
    diverged = [r for r in runs if r.get("diverged_at") is not None]
    unfinished = [r for r in runs if not r["complete"] and r.get("diverged_at") is None]
    done, dup = one_per_seed([r for r in runs if r["complete"] and _finite(r["test_err"])])
    errs = [r["test_err"] for r in done]
    # a duplicate seed kept out is named; where its result differs from the one kept, the report says so
    kept = {r["seed"]: r["test_err"] for r in done}
    disagree = sum(1 for r in runs if r["complete"] and _finite(r["test_err"]) and r not in done
                   and abs(r["test_err"] - kept[r["seed"]]) > 1e-9)
    return {"n": len(errs), "diverged": len(diverged), "unfinished": len(unfinished),
            "duplicates": dup, "disagree": disagree,
            "mean": statistics.mean(errs) if errs else None,
            "std": statistics.stdev(errs) if len(errs) > 1 else None,  # the sample std (n - 1)
            "best": min(errs) if errs else None}


def _sample_notes(t: dict) -> str:
    notes = []
    if t["unfinished"]:
        notes.append(f"{t['unfinished']} unfinished not counted")
    if t["diverged"]:
        notes.append(f"{t['diverged']} diverged not counted")
    if t["duplicates"]:
        notes.append(f"{t['duplicates']} repeated seed{'s' if t['duplicates'] > 1 else ''} not counted"
                     + (f" ({t['disagree']} with another result)" if t["disagree"] else ""))
    return ", ".join(notes)


def table6(runs: list[dict]) -> list[dict]:
    """Per residual architecture (option A): our CIFAR-10 test error over seeds next to the paper and others.
    A row is one architecture trained one way: the same iterations, recipe (all but logging fields),
    precision, data, device type, ranks and BN statistics, evaluated on the test set. Runs trained another
    way are other rows, never averaged together, and a seed trained twice counts once. A recipe other than
    the paper's (scaled to the row's budget) is named in the row."""
    out = []
    runs = [r for r in runs if r["implementation"] == "reslab" and not r.get("variant") and r["residual"]
            and r["arch"] in PAPER_TABLE6 and r["shortcut"] == "A"
            and r.get("eval_split") in (None, "test")]  # Table 6 is test error; a val5k run is not in it

    def key(r):
        return (r["arch"], r["budget"], r["iters"], r["recipe_key"], r["precision"], _data_key(r), _setting(r),
                reference[id(r)])
    # the reference a row's recipe is described against: the paper's, scaled to the row's budget; for a
    # recipe this version cannot name (an earlier record), the one most runs of that schedule used
    common = {}
    for group in {(r["arch"], r["budget"], r["iters"]) for r in runs}:
        keys = [r["recipe_key"] for r in runs if (r["arch"], r["budget"], r["iters"]) == group]
        common[group] = max(sorted(set(keys)), key=keys.count)
    reference = {id(r): _paper_key_of(r) or common[r["arch"], r["budget"], r["iters"]] for r in runs}
    for k in sorted({key(r) for r in runs}, key=lambda k: (_depth(k[0]), -k[1], -k[2], k[3], str(k[4]), str(k[5]),
                                                          k[6])):
        arch, budget, iters, recipe, precision, data, setting, paper_key = k
        rs = [r for r in runs if key(r) == k]
        sample = _sample(rs)
        hardware = sorted({r["hardware"] for r in rs})
        if sample["n"]:
            numbers = sample
        else:
            # no finished run: the unfinished ones, labelled so (no std: they stopped at different steps)
            part, _ = one_per_seed([r for r in rs if r.get("diverged_at") is None and _finite(r["test_err"])])
            steps = sorted({r["step"] for r in part})
            numbers = {"mean": statistics.mean(r["test_err"] for r in part) if part else None, "std": None,
                       "best": None, "n": len(part), "steps": steps}
        out.append({"arch": arch, "budget": budget, "iters": iters, "precision": precision,
                    "data": rs[0]["data"], "data_md5": rs[0].get("data_md5"), "setting": setting,
                    "hardware": hardware,
                    "recipe": _recipe_diff(recipe, paper_key) if recipe != paper_key else "",
                    "n": numbers["n"], "mean": numbers["mean"], "std": numbers["std"], "best": numbers["best"],
                    "complete": bool(sample["n"]), "steps": numbers.get("steps"),
                    "unfinished": sample["unfinished"], "diverged": sample["diverged"],
                    "duplicates": sample["duplicates"], "disagree": sample["disagree"],
                    "runs": sorted(r["path"] for r in rs),
                    "paper": PAPER_TABLE6[arch], **{k: v.get(arch) for k, v in OTHERS.items()}})
    return out


def _mean_std(runs: list[dict]) -> str:
    """Mean ± std (n) of the finished runs' test errors; unfinished and diverged runs are named, never
    averaged in."""
    t = _sample(runs)
    out = f"{t['mean']:.2f} ± {_fmt(t['std'])} ({t['n']})" if t["n"] else "-"
    notes = _sample_notes(t)
    return out + (f", {notes}" if notes else "")


def control_section(runs: list[dict]) -> list[str]:
    """The accuracy control (benchmarks/control_cifar.py, an independent textbook implementation) next to
    reslab's runs of the same net trained the same way: the paper's recipe at the control's iterations and
    precision, on the same data. It fixes the error level the data allows."""
    ctl = [r for r in runs if r["implementation"] == "control" and r["test_err"] is not None]
    if not ctl:
        return []
    out = ["", "## Accuracy control (an independent textbook implementation)", "",
           "| model | budget | iterations | precision | data | control: mean ± std (n) | reslab: mean ± std (n) |",
           "|---|---|---|---|---|---|---|"]
    ours = [r for r in runs if r["implementation"] == "reslab" and not r.get("variant")
            and r.get("eval_split") in (None, "test")
            and r["recipe_key"] == (_paper_key_of(r) or r["recipe_key"])]  # a recipe not named here: as recorded
    for arch, budget, iters, precision in sorted({(r["arch"], r["budget"], r["iters"], r["precision"]) for r in ctl}):
        c = [r for r in ctl if (r["arch"], r["budget"], r["iters"], r["precision"]) == (arch, budget, iters, precision)]
        same = [r for r in ours if (r["arch"], r["budget"], r["iters"], r["precision"]) == (arch, budget, iters, precision)]
        md5s = {r["data_md5"] for r in c}
        if None not in md5s:  # the control fingerprinted its data: the reslab runs of that data
            o, data = [r for r in same if r.get("data_md5") in md5s], "same test images (by MD5)"
        else:  # earlier control records name only the --data-dir they were given
            dirs = {r["data_dir"] for r in c}
            o, data = [r for r in same if r.get("data_dir") in dirs], "same --data-dir (not checked by MD5)"
        out.append(f"| {arch} | x{budget:g} | {iters} | {precision} | {data} | {_mean_std(c)} | {_mean_std(o)} |")
    out += ["", "Both sides: finished runs, the final test error, the sample std (n - 1); reslab's runs use the "
            "paper's recipe at the control's iterations and precision."]
    return out


# Gross & Wilber (2016), ResNet-110 on CIFAR-10 (original data), test error %: the variants of `gross-wilber`
GROSS_WILBER = {"paper": 6.97, "norelu": 6.32, "bnadd": 13.56}
# experiments whose every run is one variant of a comparison (the others are covered by the tables above)
COMPARISONS = ("gross-wilber", "width-vs-depth", "block-design", "shortcut-options")


def experiment_section(manifest: dict, runs: list[dict], root: Path, where: Path | None = None) -> list[str]:
    """One comparison experiment: each net (all seeds together) with its params, MACs and test error. A run
    is looked for beside the manifest (`where`, as in a copied results folder), then where it was trained."""
    if manifest["experiment"] not in COMPARISONS:
        return []
    from .complexity import count_macs, count_params
    from .zoo import create_model
    by_path = {Path(r["path"]).resolve(): r for r in runs}
    groups: dict[str, list] = {}
    for entry in manifest["runs"]:
        label = entry["name"].rsplit("-s", 1)[0]
        here = by_path.get((where / entry["name"]).resolve()) if where is not None else None
        groups.setdefault(label, []).append((entry, here or by_path.get(Path(entry["config"]["out"]).resolve())))
    ref = "Gross & Wilber (ResNet-110) %" if manifest["experiment"] == "gross-wilber" else None
    out = ["", f"## {manifest['experiment']}: {manifest['paper']} ({manifest['budget']} budget)", "",
           "| net | arch and options | params | MACs | test err %: mean ± std (n) |" + (f" {ref} |" if ref else ""),
           "|---|---|---|---|---|" + ("---|" if ref else "")]
    points = []
    for label, members in groups.items():
        model = members[0][0]["config"]["model"]
        net = create_model(model["arch"], **model.get("options", {}))
        params, macs = count_params(net), count_macs(net)
        runs_of = [r for _, r in members if r and r["test_err"] is not None]
        errs = [r["test_err"] for r in one_per_seed([r for r in runs_of if r["complete"] and _finite(r["test_err"])])[0]]
        opts = " ".join(f"{k}={v}" for k, v in model.get("options", {}).items())
        row = f"| {label} | {model['arch']} {opts} | {params / 1e6:.3f}M | {macs / 1e6:.1f}M | {_mean_std(runs_of)} |"
        if ref:
            row += f" {_fmt(GROSS_WILBER.get(label.rsplit('-', 1)[-1]))} |"
        out.append(row)
        if errs:
            points.append((label, params, macs, statistics.mean(errs)))
    out.append("")
    out.append("Complete runs only; a net without any shows '-'.")
    if manifest["experiment"] == "width-vs-depth" and points:
        name = f"width_vs_depth_{manifest['budget']}.png"
        plot_width_vs_depth(points, root / name)
        out += ["", f"![width vs depth]({name})"]
    return out


def plot_width_vs_depth(points, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, idx, xlabel in ((axes[0], 1, "parameters (M)"), (axes[1], 2, "forward MACs (M)")):
        for p in points:
            ax.scatter(p[idx] / 1e6, p[3])
            ax.annotate(p[0], (p[idx] / 1e6, p[3]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("deeper-and-thin vs shallower-and-wide at matched parameters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _no_nan(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def _name(run: Path, root: Path) -> str:
    """A run as the report names it: its path under the report's folder."""
    return run.relative_to(root).as_posix() if run.is_relative_to(root) else run.name


def write_report(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    runs, unread = [], []
    for p in find_runs(root):
        try:
            runs.append(summarize(p))
        except (ReslabError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # one damaged folder (a log line cut by hand, a config.json of another shape) is named and left
            # out; the others are still reported
            why = str(e) if isinstance(e, ReslabError) else f"{type(e).__name__}: {e}"
            unread.append({"path": _name(p, root), "reason": why})
            print(f"reslab report: {_name(p, root)} left out: {why}", file=sys.stderr)
    if not runs:
        raise (ReslabError(f"no run under {root} could be read ({len(unread)} left out: first, {unread[0]['path']}: "
                           f"{unread[0]['reason']})") if unread else
               FileNotFoundError(f"no classification run folders (config.json + metrics.jsonl) under {root}"))
    t6 = table6(runs)
    flat = [{k: v for k, v in r.items() if k != "curves"} for r in runs]
    # strict JSON: a diverged run's NaN is written null (jq, JavaScript and strict parsers refuse NaN)
    (root / "results.json").write_text(json.dumps(_no_nan({"runs": flat, "table6": t6, "left_out": unread}), indent=2,
                                                  allow_nan=False))
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in flat)
    datas = sorted({r["data"] for r in runs if r["data"]})
    if any(r["data_name"] == "folder" for r in runs):
        datas.append("image folders (not identified by checksum)")
    for impl in sorted({r["implementation"] for r in runs if not r["data"] and r["data_name"] != "folder"}):
        datas.append("not recorded (runs from an earlier reslab)" if impl == "reslab" else
                     f"not recorded by the {impl} runs")
    lines = [f"# reslab report: {root.name}", "",
             "Data: " + "; ".join(datas) + ". Numbers on any copy other than the official files are not "
             "comparable to the paper's.", ""]
    if plot_degradation(runs, root / "degradation.png"):
        lines += ["## Training and test error (paper Fig. 1 / Fig. 6)", "", "![degradation](degradation.png)", ""]
    lines += ["## Runs", "",
              "| run | budget | steps | train err % (last 5 logs) | test err % (final) | min test % over evaluations "
              "(chosen on the test set) | wall min | hardware | torch | precision |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (not r["residual"], _depth(r["arch"]), r["path"])):
        steps = f"{r['step']}/{r['iters']}" + (
            f" (diverged at {r['diverged_at']})" if r["diverged_at"] is not None else
            "" if r["complete"] else " (incomplete)")
        name = _name(Path(r["path"]), root)
        name += "" if r["implementation"] == "reslab" else f" ({r['implementation']})"
        split = "" if r["eval_split"] in (None, "test") else f" ({r['eval_split']})"  # the split it evaluated
        lines.append(f"| {name} | x{r['budget']:g} | {steps} | {_fmt(r['train_err'])} | {_fmt(r['test_err'])}{split} | "
                     f"{_fmt(r['min_test_err'])}{split} | {r['wall_min']:.1f} | {r['hardware']} | {r['torch']} | "
                     f"{r['precision']} |")
    if unread:
        lines += ["", f"Left out, unreadable ({len(unread)}): "
                  + "; ".join(f"`{u['path']}`: {u['reason']}" for u in unread) + "."]
    if t6:
        # runs on more than one copy of the data: each row names its copy
        several = len({(t["data_md5"] or t["data"]) for t in t6}) > 1
        lines += ["", "## Table 6: CIFAR-10 test error (%)", "",
                  "| model | budget | iterations | precision | device | hardware | ours: mean ± std (n) | "
                  "ours: best of n | paper | " + " | ".join(f"{o}, best checkpoint" for o in OTHERS) + " |",
                  "|---|---|---|---|---|---|---|---|---|" + "---|" * len(OTHERS)]
        for t in t6:
            if t["complete"]:
                ours = f"{_fmt(t['mean'])} ± {_fmt(t['std'])} ({t['n']})"
                notes = _sample_notes(t)
                ours += f", {notes}" if notes else ""
            else:
                st = t["steps"] or ["?"]
                at = f"{st[0]}" if st[0] == st[-1] else f"{st[0]}–{st[-1]}"
                ours = (f"incomplete: {_fmt(t['mean'])} ({t['n']}) at step {at} of {t['iters']}" if t["n"] else "-") \
                    + (f", {t['diverged']} diverged" if t["diverged"] else "")
            data = (t["data"] or "data not recorded") + (f", MD5 {t['data_md5'][:8]}" if t["data_md5"] else "")
            notes = [n for n in (data if several else "", t["recipe"]) if n]
            model = t["arch"] + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(f"| {model} | x{t['budget']:g} | {t['iters']} | {t['precision']} | {t['setting']} | "
                         f"{'; '.join(t['hardware'])} | {ours} | {_fmt(t['best'])} | "
                         f"{PAPER_TABLE6_NOTE.get(t['arch'], t['paper'])} | " + " | ".join(_fmt(t[k]) for k in OTHERS) + " |")
        lines += ["", "Paper: trained and tested on the original CIFAR-10 files, full schedule (x1, docs/paper.md), "
                  "its final error; the other reproductions report their best checkpoint, chosen on the test set. "
                  "Ours: the final test error of finished runs, mean ± sample std (n - 1) over seeds. A row is one "
                  "way of training (iterations, recipe, precision, data copy, device type, ranks, BN statistics); "
                  "a recipe other than the paper's, scaled to the row's budget, is named in the row; a seed "
                  "trained twice counts once."]
    lines += control_section(runs)
    resp_files = sorted(root.rglob("layer_responses.json"))
    for resp_file in resp_files:  # one per budget folder (reproduce writes ROOT/BUDGET/layer_responses.json)
        resp = json.loads(resp_file.read_text())
        where = resp_file.parent.relative_to(root)
        png = "layer_responses.png" if len(resp_files) == 1 else \
            f"layer_responses-{'-'.join(where.parts) or 'top'}.png"
        plot_responses(resp, root / png)
        lines += ["", "## Layer responses (paper Fig. 7)" + (f": {where.as_posix()}" if len(resp_files) > 1 else ""),
                  "", f"![layer responses]({png})", "", "| model | layers | mean std | max std |", "|---|---|---|---|"]
        for name, r in resp.items():
            lines.append(f"| {name} (step {r['step']}) | {len(r['std'])} | {statistics.mean(r['std']):.3f} | "
                         f"{max(r['std']):.3f} |")
        lines += [""] + response_claims(resp)
    manifests = sorted(root.rglob("manifest-*.json"))
    for m in manifests:
        lines += experiment_section(json.loads(m.read_text()), runs, root, m.parent)
    if manifests:
        lines += ["", "## Commands", ""]
        for m in manifests:
            d = json.loads(m.read_text())
            lines += [f"`reslab reproduce {d['experiment']} --budget {d['budget']}` ({d['budget_description']}) ran:",
                      "", "```"] + [r["command"] for r in d["runs"]] + ["```", ""]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return root / "report.md"
