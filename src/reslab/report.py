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
from pathlib import Path

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
        info = cfg.get("data_info") or {}
        return {"arch": cfg["model"]["arch"], "options": cfg["model"].get("options") or {}, "seed": cfg["seed"],
                "recipe": cfg["recipe"],
                "model_config": cfg.get("model_config", {}), "precision": cfg["runtime"]["precision"],
                "eval_split": info.get("eval_split"), "data": (info.get("identity") or {}).get("description"),
                "data_name": info.get("name"), "implementation": "reslab"}
    # earlier versions kept the model's switches (width, shortcut, ...) in model_overrides
    return {**cfg, "options": cfg.get("options") or cfg.get("model_overrides") or {},
            "data": (cfg.get("data") or {}).get("description") if isinstance(cfg.get("data"), dict) else None,
            "implementation": cfg.get("implementation", "reslab")}


def summarize(run: Path) -> dict:
    cfg = _flat_config(json.loads((run / "config.json").read_text()))
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
    rows = read_metrics(run)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    iters = cfg["recipe"]["iters"]
    last_eval = evals[-1] if evals else {}
    tail = train[-5:]  # the training error of the last few logging intervals
    return {
        "run": run.name, "path": str(run), "arch": cfg["arch"], "options": cfg.get("options") or {}, "seed": cfg["seed"],
        "shortcut": cfg.get("model_config", {}).get("shortcut"), "residual": cfg.get("model_config", {}).get("residual"),
        "budget": cfg["recipe"].get("budget", 1.0), "iters": iters, "recipe_key": _recipe_key(cfg["recipe"]),
        "step": last_eval.get("step", train[-1]["step"] if train else 0),
        "complete": bool(evals) and last_eval.get("step") == iters,
        "test_err": 100 * last_eval["top1_err"] if evals else None,
        "best_test_err": 100 * min(e["top1_err"] for e in evals) if evals else None,
        "train_err": 100 * sum(r["train_err"] for r in tail) / len(tail) if tail else None,
        "eval_split": cfg.get("eval_split"), "wall_min": (last_eval or (train[-1] if train else {})).get("elapsed_s", 0) / 60,
        "hardware": hardware_line(env) if env else "?", "torch": env.get("torch"), "git": env.get("git"),
        "precision": cfg.get("precision"), "implementation": cfg["implementation"], "data": cfg["data"],
        "data_name": cfg.get("data_name"),
        "curves": {"train": [(r["step"], 100 * r["train_err"]) for r in train],
                                                      "test": [(r["step"], 100 * r["top1_err"]) for r in evals]},
    }


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
                label = r["run"] if r.get("options") else f"{title.split()[0]}-{_depth(r['arch'])}" + (
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
    return json.dumps({k: v for k, v in recipe.items() if k not in _LOGGING}, sort_keys=True, default=str)


def _recipe_diff(key: str, reference: str) -> str:
    a, b = json.loads(key), json.loads(reference)
    return ", ".join(f"{k}={a.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "iters")


def _finite(v) -> bool:
    """A test error that can be averaged: a diverged run's NaN is a row of the runs table, not a sample."""
    return v is not None and math.isfinite(v)


def one_per_seed(runs: list[dict]) -> tuple[list[dict], int]:
    """The runs with one per seed (the first by folder): the same seed trained twice is one sample of the
    seed spread, not two. Returns the kept runs and how many were left out."""
    kept: dict = {}
    for r in sorted(runs, key=lambda r: r["path"]):
        kept.setdefault(r["seed"], r)
    return list(kept.values()), len(runs) - len(kept)


def table6(runs: list[dict]) -> list[dict]:
    """Per residual architecture (option A): our CIFAR-10 test error over seeds next to the paper and others.
    A row is one architecture trained one way: the same iterations, recipe (all but logging fields),
    precision and data, evaluated on the test set. Runs trained another way are other rows, never averaged
    together, and a seed trained twice counts once."""
    out = []
    runs = [r for r in runs if r["implementation"] == "reslab" and not r.get("options") and r["residual"]
            and r["arch"] in PAPER_TABLE6 and r["shortcut"] == "A" and _finite(r["test_err"])
            and r.get("eval_split") in (None, "test")]  # Table 6 is test error; a val5k run is not in it

    def key(r):
        return r["arch"], r["budget"], r["iters"], r["recipe_key"], r["precision"], r["data"]
    # per architecture and schedule, the recipe most of its runs used is the reference the others are
    # described against
    common = {}
    for group in {key(r)[:3] for r in runs}:
        keys = [r["recipe_key"] for r in runs if key(r)[:3] == group]
        common[group] = max(sorted(set(keys)), key=keys.count)
    for k in sorted({key(r) for r in runs}, key=lambda k: (_depth(k[0]), -k[1], -k[2], k[3], str(k[4]), str(k[5]))):
        arch, budget, iters, recipe, precision, data = k
        rs = [r for r in runs if key(r) == k]
        done, dup = one_per_seed([r for r in rs if r["complete"]])
        # finished runs only, where there are any (a mid-schedule error would pass for seed spread);
        # otherwise the unfinished ones, and the row says "incomplete"
        unfinished = [r for r in rs if not r["complete"]]
        errs = [r["test_err"] for r in done or one_per_seed(unfinished)[0]]
        out.append({"arch": arch, "budget": budget, "iters": iters, "precision": precision, "data": data,
                    "recipe": _recipe_diff(recipe, common[k[:3]]) if recipe != common[k[:3]] else "",
                    "n": len(errs), "mean": statistics.mean(errs), "std": statistics.stdev(errs) if len(errs) > 1 else None,
                    "best": min(errs), "complete": bool(done), "unfinished": len(unfinished) if done else 0,
                    "duplicates": dup, "paper": PAPER_TABLE6[arch], **{k: v.get(arch) for k, v in OTHERS.items()}})
    return out


def _mean_std(runs: list[dict]) -> str:
    """Mean ± std (n) of the finished runs' test errors; unfinished runs are named, never averaged in (a
    run stopped mid-schedule has a higher error that would pass for seed spread)."""
    done, dup = one_per_seed([r for r in runs if r["complete"] and _finite(r["test_err"])])
    errs = [r["test_err"] for r in done]
    left = sum(not r["complete"] for r in runs)
    out = f"{statistics.mean(errs):.2f} ± {_fmt(statistics.stdev(errs) if len(errs) > 1 else None)} ({len(errs)})" \
        if errs else "-"
    return out + (f", {left} unfinished not counted" if left else "") + (
        f", {dup} repeated seed{'s' if dup > 1 else ''} not counted" if dup else "")


def control_section(runs: list[dict]) -> list[str]:
    """The accuracy control (benchmarks/control_cifar.py, an independent textbook implementation) next to
    reslab's runs of the same net at the same budget: it fixes the error level the data allows."""
    ctl = [r for r in runs if r["implementation"] == "control" and r["test_err"] is not None]
    if not ctl:
        return []
    out = ["", "## Accuracy control (an independent textbook implementation, same data)", "",
           "| model | budget | control: mean ± std (n) | reslab: mean ± std (n) | control precision | reslab precision |",
           "|---|---|---|---|---|---|"]
    for arch, budget in sorted({(r["arch"], r["budget"]) for r in ctl}):
        c = [r for r in ctl if (r["arch"], r["budget"]) == (arch, budget)]
        datas = {r["data"] for r in c if r["data"]}  # the control's copy, where it recorded one
        o = [r for r in runs if r["implementation"] == "reslab" and (r["arch"], r["budget"]) == (arch, budget)
             and r["test_err"] is not None and not r.get("options") and r.get("eval_split") in (None, "test")
             and (not datas or r["data"] in datas)]
        out.append(f"| {arch} | x{budget:g} | {_mean_std(c)} | {_mean_std(o)} | {c[0]['precision']} | "
                   f"{', '.join(sorted({str(r['precision']) for r in o})) or '-'} |")
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


def write_report(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    runs = [summarize(p) for p in find_runs(root)]
    if not runs:
        raise FileNotFoundError(f"no classification run folders (config.json + metrics.jsonl) under {root}")
    flat = [{k: v for k, v in r.items() if k != "curves"} for r in runs]
    (root / "results.json").write_text(json.dumps({"runs": flat, "table6": table6(runs)}, indent=2))
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
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
              "| run | budget | steps | train err % (last 5 logs) | test err % (final) | best test % | wall min | hardware | torch | precision |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (not r["residual"], _depth(r["arch"]), r["run"])):
        steps = f"{r['step']}/{r['iters']}" + ("" if r["complete"] else " (incomplete)")
        name = r["run"] + ("" if r["implementation"] == "reslab" else f" ({r['implementation']})")
        split = "" if r["eval_split"] in (None, "test") else f" ({r['eval_split']})"  # the split it evaluated
        lines.append(f"| {name} | x{r['budget']:g} | {steps} | {_fmt(r['train_err'])} | {_fmt(r['test_err'])}{split} | "
                     f"{_fmt(r['best_test_err'])}{split} | {r['wall_min']:.1f} | {r['hardware']} | {r['torch']} | "
                     f"{r['precision']} |")
    t6 = table6(runs)
    if t6:
        # runs on more than one copy of the data: each row names its copy
        several = len({t["data"] for t in t6}) > 1
        lines += ["", "## Table 6: CIFAR-10 test error (%)", "",
                  "| model | budget | iterations | precision | ours: mean ± std (n) | ours: best | paper | "
                  + " | ".join(OTHERS) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(OTHERS)]
        for t in t6:
            ours = f"{_fmt(t['mean'])} ± {_fmt(t['std'])} ({t['n']})" + (
                " incomplete" if not t["complete"] else
                f", {t['unfinished']} unfinished not counted" if t["unfinished"] else "")
            ours += f", {t['duplicates']} repeated seed{'s' if t['duplicates'] > 1 else ''} not counted" \
                if t["duplicates"] else ""
            notes = [n for n in (t["data"] or "data not recorded" if several else "", t["recipe"]) if n]
            model = t["arch"] + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(f"| {model} | x{t['budget']:g} | {t['iters']} | {t['precision']} | {ours} | {_fmt(t['best'])} | "
                         f"{PAPER_TABLE6_NOTE.get(t['arch'], t['paper'])} | " + " | ".join(_fmt(t[k]) for k in OTHERS) + " |")
        lines += ["", "Paper and other reproductions: trained and tested on the original CIFAR-10 files, full "
                  "schedules (x1, docs/paper.md). A row is one way of training (iterations, recipe, precision, data copy; "
                  "a recipe other than the net's most common one is named in the row) on the test set; a seed "
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
