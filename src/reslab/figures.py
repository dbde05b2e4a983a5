"""The report's figures: paper Fig. 1/6 (training and test error curves), Fig. 7 (layer responses, with the
paper's two observations checked) and the width-vs-depth scatter.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .runrecord import depth


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
        rs = sorted(rs, key=lambda r: (depth(r["arch"]), r["seed"]))
        cmap = plt.get_cmap("viridis", max(2, len(rs)))
        for i, r in enumerate(rs):
            c = cmap(i)
            tx, ty = zip(*r["curves"]["train"]) if r["curves"]["train"] else ((), ())
            ax.plot(tx, ty, "--", color=c, linewidth=1)
            if r["curves"]["test"]:
                ex, ey = zip(*r["curves"]["test"])
                # a variant (width, block design, ...) is named by its run, not passed off as the plain net
                label = r["run"] if r.get("variant") else f"{title.split()[0]}-{depth(r['arch'])}" + (
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
    for name, r in sorted(resp.items(), key=lambda kv: (not kv[1]["arch"].startswith("plain"), depth(kv[1]["arch"]))):
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
    res = sorted((a for a in mean if a.startswith("resnet")), key=depth)
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
