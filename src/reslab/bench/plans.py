"""What `reslab bench` runs on each device, as data, and the runner that writes the result files."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .cases import bench_cifar, bench_data, bench_fused, bench_imagenet, bench_inference, bench_runsets
from . import e2e
from .harness import Plan, Setting
from ..errors import ReslabError
from .report import markdown


# How long to measure, per device: (CIFAR nets, 224x224 nets, data pipelines). Fewer steps on the CPU,
# where one step of a 224x224 net takes seconds; more rounds where the ratio is what matters.
PLANS = {
    "quick": (Plan(steps=2, warmup=1, rounds=2), None, Plan(8, 2, 2)),
    "cpu": (Plan(4, 2, 5), Plan(2, 1, 2), Plan(40, 4, 5)),
    "cuda": (Plan(20, 10, 5), Plan(10, 5, 3), Plan(40, 4, 5)),
}
# Settings timed against the baseline, per device. The CPU adds --compile to its defaults; the GPU adds bf16.
SETTINGS = {
    "cpu": (Setting("fp32", False, False), Setting("fp32", True, False), Setting("fp32", True, True)),
    "cuda": (Setting("fp32", False, False), Setting("fp32", True, False), Setting("bf16", True, False),
             Setting("bf16", True, True), Setting("bf16", True, False, graphs=True)),
    "quick": (Setting("fp32", False, False), Setting("fp32", True, False)),
}
CIFAR_ARCHS = {"quick": ("resnet8",), "full": ("resnet20", "resnet56", "resnet110")}
# run sets (K runs in one process): the setting each run uses, and the K to time, per device. On the CPU a set
# only interleaves its runs (the check is that it costs nothing); on a GPU the runs fill each other's gaps.
# The fused rows (K runs as one model of grouped convs) use the same setting and Ks.
RUNSETS = {"quick": (Setting("fp32", True), (2,)), "cpu": (Setting("fp32", True), (3,)),
           "cuda": (Setting("bf16", True, graphs=True), (1, 5, 10))}
RUNSET_ARCHS = {"quick": ("resnet8",), "full": ("resnet20", "resnet110")}
IMAGENET_ARCHS = ("resnet18", "resnet50")
# what else the 224x224 nets try on a GPU (the target: ResNet-50 at >= 5,000 img/s): inductor's autotuned
# kernels (its own CUDA graphs left out: the `graphs` setting is the engine's GraphedStep, eager kernels).
# A group of its own ("autotune", with its own baseline): autotuning takes minutes, and the harness writes a
# group's rows only once all its candidates ran, so a time limit must not cost the other settings' rows
GROUPS = ("data", "cifar", "infer", "runsets", "imagenet", "autotune", "e2e", "eval")
EXTRA_224 = {"cuda": (Setting("bf16", True, True, compile_mode="max-autotune-no-cudagraphs"),)}
# JPEG folders end to end (bench.e2e), per device: the net, the photographs written, the batch, the plan of the
# data/e2e rows and of the evaluation rows. The drain uses up the workers' prefetch queue (2 batches each)
# before every timed segment. A 224x224 ResNet-50 step takes seconds on the CPU, so the CPU times ResNet-18.
_W = e2e.default_workers()
E2E = {"cpu": ("resnet18", 96, 16, Plan(3, 1, 2, drain=2 * _W + 1), Plan(2, 1, 2, drain=2 * _W + 1), 16),
       "cuda": ("resnet50", 4096, 256, Plan(30, 5, 3, drain=2 * _W + 2), Plan(10, 2, 3, drain=2 * _W + 2), 1000)}
E2E_SETTING = {"cpu": Setting("fp32", True), "cuda": Setting("bf16", True)}
BATCH = {"quick": (16, 16, 16), "cpu": (128, 256, 64), "cuda": (128, 256, 256)}  # CIFAR train, CIFAR infer, 224


def _with_rounds(plan: Plan | None, rounds: int | None) -> Plan | None:
    return plan if plan is None or rounds is None else Plan(plan.steps, plan.warmup, rounds, plan.drain)


def run(device: str = "auto", quick: bool = False, out: str | None = None, archs=None,
        imagenet_archs=None, rounds: int | None = None, only=None, keep_going: bool = False,
        compile: bool = True) -> dict:
    """The whole benchmark; `rounds` overrides the number of interleaved rounds of every group, `only` keeps
    the groups of those names (GROUPS); `keep_going` records a failing group's error in the result's
    `errors` and goes on with the next; `compile=False` leaves out the torch.compile settings."""
    from ..dist import pick_device
    from ..logs import environment, hardware_line
    if rounds is not None and rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    if out:  # checked before measuring: a bench takes minutes to hours, and its result must have a place
        _check_out(Path(out))
    dev = pick_device(device)
    # the switches `reslab train` sets (cuDNN autotuning, TF32 matmuls): the rows time the code as it trains,
    # and the run-set vs fused comparison that gpu_session.sh acts on must see what training will see. The
    # baselines run under them too (global switches cannot differ between interleaved candidates).
    from ..engine import configure_backends
    configure_backends(False)
    env = environment(dev)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else env["cpu"]
    gpu = dev.type == "cuda"
    kind = "quick" if quick else dev.type if dev.type in PLANS else "cpu"
    plan, plan224, plan_data = (_with_rounds(p, rounds) for p in PLANS[kind])
    settings = [s for s in SETTINGS[kind] if compile or not s.compile]
    b32, b32_infer, b224 = BATCH[kind]
    groups = [("data", "data", lambda: bench_data(dev, 128, plan_data))]  # (name, what, group): --only picks by name
    for a in archs if archs is not None else CIFAR_ARCHS["quick" if quick else "full"]:
        groups.append(("cifar", a, lambda a=a: bench_cifar(a, dev, b32, settings, plan, dev_name)))
        groups.append(("infer", a, lambda a=a: bench_inference(
            a, dev, b32_infer, 32, [s for s in settings if not s.graphs], plan, dev_name)))
    rs_setting, ks = RUNSETS[kind]
    for a in archs if archs is not None else RUNSET_ARCHS["quick" if quick else "full"]:
        groups.append(("runsets", f"{a} run sets",
                       lambda a=a: bench_runsets(a, dev, b32, rs_setting, ks, plan, dev_name)))
        # design (b) of the same question, same setting and Ks: the K runs fused into one model (fused.py)
        groups.append(("runsets", f"{a} fused", lambda a=a: bench_fused(a, dev, b32, rs_setting, ks, plan, dev_name)))
    if plan224 is not None:
        # compiling the 224x224 nets on a 2-core CPU costs more than the few steps measured there; a graphed
        # 224x224 step copies each whole batch into the graph's buffers (as image folders would with --graphs)
        s224 = [s for s in settings if gpu or not s.compile]
        infer224 = [s for s in s224 if not s.graphs]
        extra = [s for s in EXTRA_224.get(kind, ()) if compile or not s.compile]
        for a in IMAGENET_ARCHS if imagenet_archs is None else imagenet_archs:
            groups.append(("imagenet", a, lambda a=a: bench_imagenet(a, dev, b224, s224, plan224, dev_name)))
            groups.append(("infer", f"{a} 224",
                           lambda a=a: bench_inference(a, dev, b224, 224, infer224, plan224, dev_name)))
            if extra:
                groups.append(("autotune", a, lambda a=a: bench_imagenet(a, dev, b224, extra, plan224, dev_name)
                               + bench_inference(a, dev, b224, 224, extra, plan224, dev_name)))
        if kind in E2E and (imagenet_archs is None or imagenet_archs):
            arch, n, b, p_train, p_eval, n_eval = E2E[kind]
            arch, s = (imagenet_archs[0] if imagenet_archs else arch), E2E_SETTING[kind]
            groups.append(("e2e", arch, lambda arch=arch, s=s: e2e.bench_folder(
                arch, dev, b, s, _with_rounds(p_train, rounds), dev_name, images=n, workers=_W)))
            groups.append(("eval", arch, lambda arch=arch, s=s: e2e.bench_eval_views(
                arch, dev, s, _with_rounds(p_eval, rounds), dev_name, images=n_eval, workers=_W)))
    if only:
        unknown = set(only) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown bench group(s) {', '.join(sorted(unknown))}; valid: {', '.join(GROUPS)}")
        # in the order asked: `--only runsets cifar` measures the run sets first (a time limit cuts the last)
        groups = sorted((g for g in groups if g[0] in only), key=lambda g: list(only).index(g[0]))
    rows = []
    result = {"machine": hardware_line(env), "device": dev_name, "env": env,
              "date": time.strftime("%Y-%m-%d"), "quick": quick, "rows": rows}
    for name, what, group in groups:
        try:
            done = group()
        except Exception as e:  # noqa: BLE001 - one broken group must not cost a device session the others
            if not keep_going:
                raise
            print(f"bench group {name} ({what}) failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            result.setdefault("errors", []).append(f"{name} ({what}): {type(e).__name__}: {e}")
            continue
        # what the row was measured in: the group (--only's name) and its case (the run-set and fused
        # cases each measure the same one-run baseline, whose other fields are alike)
        rows += [{**r, "group": name, "case": what} for r in done]
        if out:  # after every group: a run cut short by a time limit keeps what it measured
            _write(result, out)
        for r in done:  # progress: a full CPU run takes a while
            ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] else ""
            print(f"{r['arch']} {r['kind']} {r['setting']}: {r['images_per_s']:,.0f} img/s{ratio}",
                  file=sys.stderr, flush=True)
    if out:
        _write(result, out)
    return result


def _check_out(p: Path) -> None:
    if p.is_dir():
        raise ReslabError(f"--out {p} is a folder; give the JSON file to write, e.g. {p / 'bench.json'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReslabError(f"--out {p}: its folder cannot be made ({e.strerror})") from None


def _write(result: dict, out) -> None:
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    p.with_suffix(".md").write_text(markdown(result))
