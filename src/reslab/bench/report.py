"""The Markdown table written beside each result JSON."""
from __future__ import annotations


def markdown(result: dict) -> str:
    lines = [f"# Benchmark: {result['machine']} ({result['date']})", "",
             f"torch {result['env']['torch']}, torchvision {result['env']['torchvision']}. "
             "Training step = forward + backward + SGD; TFLOP/s = 6 x MACs x images/s. Each candidate ran "
             "interleaved with its baseline: images/s is the median over rounds (range in brackets), the "
             "ratio the median of per-round ratios. Warm-up includes compilation.", "",
             *(["**--quick: a smoke run (a few steps, 2 rounds), not a measurement.** With two rounds the median "
                "is their mean, and one round disturbed by other work moves it far; measure without --quick.", ""]
               if result.get("quick") else []),
             "| model | setting | batch | images/s | vs baseline | TFLOP/s | of peak | warm-up | peak mem |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] else "-"
        mem = f"{r['peak_mem_bytes'] / 2**30:.1f} GiB" if r.get("peak_mem_bytes") else "-"
        what = f"{r['arch']} ({r['kind']})" if r["kind"] != "train" else r["arch"]
        lo, hi = min(r["images_per_s_rounds"]), max(r["images_per_s_rounds"])
        fmt = ",.0f" if r["images_per_s"] >= 100 else ".1f"
        lines.append(f"| {what} | {r['setting']} | {r['batch']} | {r['images_per_s']:{fmt}} ({lo:{fmt}}-{hi:{fmt}}) "
                     f"| {ratio} | {r['tflops']:.2f} | {frac} | {r['warmup_s']:.1f} s | {mem} |")
    return "\n".join(lines) + "\n"
