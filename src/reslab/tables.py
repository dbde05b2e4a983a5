"""The report's tables: Table 6 (ours over seeds beside the paper and two public reproductions), the
accuracy control beside reslab, and the comparison experiments (width vs depth, block designs, ...). A row
is one way of training; runs trained another way are other rows, never averaged together.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .figures import plot_width_vs_depth
from .runrecord import depth, recipe_key

# docs/paper.md: Table 6 (CIFAR-10 test error %) and other reproductions' numbers.
PAPER_TABLE6 = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                "resnet1202": 7.93}
PAPER_TABLE6_NOTE = {"resnet110": "6.43 best of 5; 6.61±0.16 mean±std"}
OTHERS = {"popular PyTorch reproduction (200 epochs)": {"resnet20": 8.27, "resnet32": 7.37, "resnet44": 6.90,
                                                       "resnet56": 6.61, "resnet110": 6.32},
          "fb.resnet.torch": {"resnet20": 8.29, "resnet32": 7.63, "resnet44": 7.14, "resnet56": 6.94,
                              "resnet110": 6.73}}


def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


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
    return recipe_key(RECIPES[recipe["name"]].scaled(recipe.get("budget", 1.0)).to_dict())


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
    sessions = r.get("world_sizes") or [r.get("world_size") or 1]
    if len(sessions) > 1:  # resumed on another number of ranks: trained two ways, a row of its own
        parts.append(f"ranks {' then '.join(map(str, sessions))}" + (", sync BN" if r.get("sync_bn") else ""))
    elif sessions[0] > 1:
        parts.append(f"{sessions[0]} ranks" + (", sync BN" if r.get("sync_bn") else ""))
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
            and r.get("eval_split") in (None, "test")  # Table 6 is test error; a val5k run is not in it
            and r.get("data_name") in (None, "cifar10")]  # and CIFAR-10's (records before names: CIFAR-10 only)

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
    for k in sorted({key(r) for r in runs}, key=lambda k: (depth(k[0]), -k[1], -k[2], k[3], str(k[4]), str(k[5]),
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


def table6_section(t6: list[dict]) -> list[str]:
    """Table 6 as Markdown: a row per way of training, beside the paper's and the other reproductions' numbers."""
    if not t6:
        return []
    lines = []
    # runs on more than one copy of the data: each row names its copy
    several = len({(t["data_md5"] or t["data"]) for t in t6}) > 1
    lines += ["", "## Table 6: CIFAR-10 test error (%)", "",
              "| model | budget | iterations | precision | device | hardware | ours: mean ± std (n) | "
              "ours: best of n | paper | " + " | ".join(f"{o}, best checkpoint" for o in OTHERS) + " |",
              "|---|---|---|---|---|---|---|---|---|" + "---|" * len(OTHERS)]
    for t in t6:
        if t["complete"]:
            ours = f"{fmt(t['mean'])} ± {fmt(t['std'])} ({t['n']})"
            notes = _sample_notes(t)
            ours += f", {notes}" if notes else ""
        else:
            st = t["steps"] or ["?"]
            at = f"{st[0]}" if st[0] == st[-1] else f"{st[0]}–{st[-1]}"
            ours = (f"incomplete: {fmt(t['mean'])} ({t['n']}) at step {at} of {t['iters']}" if t["n"] else "-") \
                + (f", {t['diverged']} diverged" if t["diverged"] else "")
        data = (t["data"] or "data not recorded") + (f", MD5 {t['data_md5'][:8]}" if t["data_md5"] else "")
        notes = [n for n in (data if several else "", t["recipe"]) if n]
        model = t["arch"] + (f" ({'; '.join(notes)})" if notes else "")
        lines.append(f"| {model} | x{t['budget']:g} | {t['iters']} | {t['precision']} | {t['setting']} | "
                     f"{'; '.join(t['hardware'])} | {ours} | {fmt(t['best'])} | "
                     f"{PAPER_TABLE6_NOTE.get(t['arch'], t['paper'])} | " + " | ".join(fmt(t[k]) for k in OTHERS) + " |")
    lines += ["", "Paper: trained and tested on the original CIFAR-10 files, full schedule (x1, docs/paper.md), "
              "its final error; the other reproductions report their best checkpoint, chosen on the test set. "
              "Ours: the final test error of finished runs, mean ± sample std (n - 1) over seeds. A row is one "
              "way of training (iterations, recipe, precision, data copy, device type, ranks, BN statistics); "
              "a recipe other than the paper's, scaled to the row's budget, is named in the row; a seed "
              "trained twice counts once."]
    return lines


def _mean_std(runs: list[dict]) -> str:
    """Mean ± std (n) of the finished runs' test errors; unfinished and diverged runs are named, never
    averaged in."""
    t = _sample(runs)
    out = f"{t['mean']:.2f} ± {fmt(t['std'])} ({t['n']})" if t["n"] else "-"
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
            row += f" {fmt(GROSS_WILBER.get(label.rsplit('-', 1)[-1]))} |"
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
