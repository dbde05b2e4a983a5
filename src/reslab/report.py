"""`reslab report DIR`: plots, tables and numbers from every run folder found under DIR.

Writes into DIR: report.md (paper-vs-ours tables with budget, hardware, wall time and versions next to every
number, and the exact commands), results.json and results.csv (one row per run), degradation.png (paper
Fig. 1/6 style: dashed training error, bold test error), and layer_responses.png when
layer_responses.json is present (written by `reslab reproduce layer-responses`). What a run folder says is
read by runrecord.py, the tables are tables.py's and the figures figures.py's; this module puts them together.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

from .errors import ReslabError, described
from .figures import plot_degradation, plot_responses, response_claims
from .runrecord import depth, files_named, find_runs, summarize, without_record
from .tables import control_section, experiment_section, fmt, table6, table6_section


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
        raise FileNotFoundError(f"{root}: {'a file, not' if root.exists() else 'no such'} folder (give the folder "
                                "that holds the run folders, e.g. the --out of reproduce)")
    runs, unread = [], []
    found = find_runs(root)
    for p in found:
        try:
            runs.append(summarize(p))
        except (ReslabError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # one damaged folder (a log line cut by hand, a config.json of another shape) is named and left
            # out; the others are still reported
            why = described(e)
            unread.append({"path": _name(p, root), "reason": why})
    unread += [{"path": _name(p, root), "reason": why} for p, why in without_record(root, found)]
    for u in unread:
        print(f"reslab report: {u['path']} left out: {u['reason']}", file=sys.stderr)
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
    for r in sorted(runs, key=lambda r: (not r["residual"], depth(r["arch"]), r["path"])):
        steps = f"{r['step']}/{r['iters']}" + (
            f" (diverged at {r['diverged_at']})" if r["diverged_at"] is not None else
            "" if r["complete"] else " (incomplete)")
        name = _name(Path(r["path"]), root)
        name += "" if r["implementation"] == "reslab" else f" ({r['implementation']})"
        split = "" if r["eval_split"] in (None, "test") else f" ({r['eval_split']})"  # the split it evaluated
        lines.append(f"| {name} | x{r['budget']:g} | {steps} | {fmt(r['train_err'])} | {fmt(r['test_err'])}{split} | "
                     f"{fmt(r['min_test_err'])}{split} | {r['wall_min']:.1f} | {r['hardware']} | {r['torch']} | "
                     f"{r['precision']} |")
    if unread:
        lines += ["", f"Left out, unreadable ({len(unread)}): "
                  + "; ".join(f"`{u['path']}`: {u['reason']}" for u in unread) + "."]
    lines += table6_section(t6)
    lines += control_section(runs)
    resp_files = sorted(files_named(root, "layer_responses.json"))
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
    manifests = sorted(files_named(root, keep=lambda f: f.startswith("manifest-") and f.endswith(".json")))
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
