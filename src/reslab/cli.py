"""The `reslab` command line. Each subcommand parses its flags into plain values and calls library
functions; a user error is printed as one line (`reslab: error: ...`) with exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

EXIT_USER_ERROR = 2


def _at_least(low: int):
    """An argparse type: an integer >= low, else argparse's own one-line usage error."""
    def parse(text: str) -> int:
        v = int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _errors(m: dict) -> str:
    """An evaluation's errors as printed; top-5 only with more than 5 classes (with fewer it is always right;
    metrics from before the class count was recorded show it)."""
    top5 = f"top-5 {100 * m['top5_err']:.2f}%, " if m.get("classes") is None or m["classes"] > 5 else ""
    return f"top-1 error {100 * m['top1_err']:.2f}%, {top5}loss {m['loss']:.4f}"


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}" if unit == "G" else f"{n / div:.2f}{unit}"
    return str(int(n))


def print_table(rows: list[dict], cols: list[str]) -> None:
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# ---------------------------------------------------------------- models / info
def cmd_models(a) -> int:
    from .complexity import count_macs, count_params
    from .zoo import create_model, list_models
    rows = []
    for name in list_models():
        m = create_model(name)
        c = m.cfg
        rows.append(dict(name=name, family=c.family, depth=c.depth, block=c.block,
                         shortcut=c.shortcut if c.residual else "none",
                         stride=c.stride_variant, params=count_params(m), macs=count_macs(m)))
    if a.json:
        print_json(rows)
    else:
        for r in rows:
            r["params"], r["macs"] = _fmt_count(r["params"]), _fmt_count(r["macs"])
        print_table(rows, ["name", "family", "depth", "block", "shortcut", "stride", "params", "macs"])
        print("\nMACs: forward multiply-adds per image at 32x32 (cifar) or 224x224 (imagenet), counted by "
              "torch.utils.flop_counter. Any CIFAR depth 6n+2 also works: resnet26, plain74, ...")
    return 0


def cmd_info(a) -> int:
    from .complexity import describe
    from .flags import model_options
    from .zoo import create_model
    if a.input_size is not None and a.input_size < 8:
        raise ValueError(f"--input-size must be at least 8 pixels, got {a.input_size}")
    d = describe(create_model(a.name, num_classes=a.num_classes, **model_options(a)), a.input_size)
    if a.json:
        print_json(d)
        return 0
    print(f"{d['name']}: {d['family']} family, depth {d['depth']} ({d['layers_weighted']} weighted layers), "
          f"{d['block']} blocks {d['layers']}, shortcut {d['shortcut'] if d.get('residual', True) else 'none (plain)'}, "
          f"stride variant {d['stride_variant']}")
    shown = {"name", "family", "depth", "block", "layers", "shortcut", "stride_variant", "num_classes",
             "in_channels", "input_size", "layers_weighted", "params", "macs", "stage_shapes", "stride_in_1x1"}
    print("  " + " ".join(f"{k}={v}" for k, v in d.items() if k not in shown)
          + f" classes={d['num_classes']} in_channels={d['in_channels']}")
    print(f"  params {d['params']:,} ({_fmt_count(d['params'])})")
    print(f"  MACs   {d['macs']:,} ({_fmt_count(d['macs'])}) at {d['input_size']}x{d['input_size']}")
    print("  output shapes (C, H, W):")
    for k, v in d["stage_shapes"].items():
        print(f"    {k:<7} {tuple(v)}")
    return 0


def _register_zoo(sub) -> None:
    from .flags import add_section_flags
    p = sub.add_parser("models", help="table of the model zoo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("info", help="layers, params, MACs and stage shapes of one model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default 32 / 224)")
    p.add_argument("--num-classes", type=int, default=None)
    add_section_flags(p, "model")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------- data
def cmd_data_info(a) -> int:
    if a.data == "folder":
        from .data.folder import info
        if not a.data_dir:
            raise ValueError("--data folder needs --data-dir pointing at a folder with train/ and val/")
        d = info(a.data_dir)
    else:
        from .data.cifar import info
        d = info(a.data, a.data_dir)
    if a.json:
        print_json(d)
        return 0
    print(f"{d['dataset']} from {d['source']}")
    shape = ("first image" if a.data == "folder" else "image") + f" {tuple(d['image_shape'])}"
    print(f"  train {d['train']:,}  {d.get('eval_split', 'test')} {d['test']:,}  classes {len(d['classes'])}  {shape}")
    sampled = f" (over {d['mean_pixel_images']:,} images at the 224 centre view)" if "mean_pixel_images" in d else ""
    print(f"  mean pixel (RGB, [0,1]) {d['mean_pixel']}{sampled}")
    per = d["train_per_class"]
    print(f"  train per class: min {min(per):,} max {max(per):,}")
    ok = d["checksum_official"]
    print("  checksum: " + ("official" if ok else "n/a (folder)" if ok is None else "differs from the official files"
                            + (f": {d['copy']}" if d.get("copy") else "")))
    return 0


def _register_data(sub) -> None:
    from .data.build import DATASETS
    p = sub.add_parser("data", help="datasets: sizes, classes, checksums")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("info", help="sizes of each split, per-class counts, shape, mean pixel, checksum")
    q.add_argument("--data", choices=DATASETS, default="cifar10")
    q.add_argument("--data-dir", default=None, help="archive, extracted folder, or ImageNet-style root "
                   "(default: $RESLAB_DATA, else download)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_data_info)


# ---------------------------------------------------------------- train / eval
def cmd_train(a) -> int:
    from .engine import train
    from .flags import config_from_args
    if a.extend_to is not None and not a.resume:
        raise ValueError("--extend-to lengthens an existing run: use it with --resume")
    cfg, explicit = config_from_args(a)
    if a.seeds:
        from dataclasses import replace
        from .fusedset import train_fused
        from .runset import train_set
        if a.seed is not None or a.extend_to is not None:
            raise ValueError("--seeds trains one run per seed: it does not combine with --seed or --extend-to")
        base = a.out or f"runs/{cfg.model.arch}-{cfg.data.name}"
        configs = [replace(cfg, seed=s, out=f"{base}-s{s}") for s in a.seeds]
        together = train_fused if a.fused else train_set
        finals = together(configs, resume=a.resume, explicit=explicit | {("", "seed")}, stop_at=a.stop_at)
    else:
        if a.fused:
            raise ValueError("--fused trains several seeds as one model: use it with --seeds")
        configs = [cfg]
        finals = [train(cfg, resume=a.resume, explicit=explicit, extend_to=a.extend_to, stop_at=a.stop_at)]
    for c, final in zip(configs, finals):
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        from . import checkpoint as ckpt
        from .errors import ReslabError
        try:
            st = ckpt.read_status(c.out)
        except (FileNotFoundError, ReslabError):  # stopped before its first save: nothing to continue
            continue
        errs = f"{final['split']} {_errors(final)}, n={final['n']}" if final else ""
        if st["finished"] and final:
            print(f"done: {c.out} step {final['step']} {errs}")
        elif not st["finished"]:  # --stop-at: the evaluation shown is the last one made, not the step stopped at
            print(f"stopped: {c.out} at step {st['step']} of {st['iters']} (--resume continues it)"
                  + (f"; last evaluation at step {final['step']}: {errs}" if final else "; not evaluated yet"))
    return 0


def cmd_eval(a) -> int:
    from .predict import evaluate_checkpoint
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one evaluation (and one JSON document)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        print("reslab: eval runs in one process; under torchrun rank 0 evaluates alone", file=sys.stderr)
    m = evaluate_checkpoint(a.path, data_dir=a.data_dir, view=a.views, device=a.device,
                            precise_bn_batches=a.precise_bn, batch_size=a.batch_size, workers=a.workers,
                            decode=a.decode)
    if a.json:
        print_json(m)
    else:
        print(f"{m['checkpoint']}: {m['arch']} on {m['data']} {m['split']} ({m['view']} view, n={m['n']}): "
              f"{_errors(m)}")
    return 0


def _register_train(sub) -> None:
    from .data.folder import DECODERS, VIEWS
    from .flags import add_run_flags
    p = sub.add_parser("train", help="train a zoo model with a paper recipe (no arguments: resnet20 on CIFAR-10)")
    add_run_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                   "its recorded config wins, and a flag that contradicts it is an error")
    p.add_argument("--extend-to", type=int, default=None, metavar="N",
                   help="with --resume: lengthen the run to N iterations, keeping every lr milestone where it was")
    p.add_argument("--stop-at", type=_at_least(1), default=None,
                   help="stop after this step, resumable (for budgets/tests)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train one run per seed at once, in one process (folders OUT-sSEED, OUT default "
                        "runs/ARCH-DATA); each equals the run trained alone")
    p.add_argument("--fused", action="store_true",
                   help="with --seeds: train the seeds as one fused model (grouped convolutions; each run still "
                        "has its own folder and checkpoints); falls back to a run set where it cannot, saying why")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint or run folder with the paper's protocols")
    p.add_argument("path", help="a checkpoint file, or a run folder (its last.pt)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--views", default="center", choices=VIEWS)
    p.add_argument("--precise-bn", type=_at_least(0), default=0, metavar="N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--decode", default="auto", choices=DECODERS,
                   help="image folders: decode in the workers (cpu) or batched on the device; auto: device on a GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------- bench
def cmd_bench(a) -> int:
    from .bench import markdown, run
    out = a.out or f"benchmarks/results/{'quick' if a.quick else 'latest'}.json"
    result = run(device=a.device, quick=a.quick, out=out, archs=a.arch, imagenet_archs=a.imagenet_arch,
                 rounds=a.rounds, only=a.only, keep_going=a.keep_going, compile=not a.no_compile)
    print(markdown(result))
    for e in result.get("errors", []):
        print(f"failed group: {e}", file=sys.stderr)
    from pathlib import Path
    print(f"written: {out} and {Path(out).with_suffix('.md')}")
    return 1 if result.get("errors") else 0


def _register_bench(sub) -> None:
    from .bench.plans import GROUPS
    p = sub.add_parser("bench", help="training/inference throughput against baselines measured in the same run")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (CI)")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", nargs="*", default=None, help="CIFAR nets to bench (default resnet20/56/110)")
    p.add_argument("--imagenet-arch", nargs="*", default=None, help="224x224 nets (default resnet18/50)")
    p.add_argument("--only", nargs="+", default=None, choices=GROUPS, metavar="GROUP",
                   help=f"run only these groups ({', '.join(GROUPS)})")
    p.add_argument("--out", default=None, help="result JSON (a Markdown table is written beside it)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per group (default: per group and device, docs/benchmarks.md; more "
                        "narrows the ratio on a noisy machine)")
    p.add_argument("--keep-going", action="store_true",
                   help="a group that fails is reported (result's `errors`, exit status 1) and the others still run")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile settings (their warm-up compiles for a minute or more)")
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------- reproduce / report
def cmd_reproduce(a) -> int:
    from .experiments import BUDGETS, EXPERIMENTS
    if a.list or not a.name:
        for e in EXPERIMENTS.values():
            print(f"{e.name:<22} {e.paper}" + (f"  [needs {e.needs}]" if e.needs else "")
                  + (f"\n{'':<22} report: {e.analysis}" if e.analysis else ""))
        print("\nbudgets: " + "; ".join(f"{b.name} = {b.description}" for b in BUDGETS.values()))
        return 0
    from .interrupt import Interrupted
    from .reproduce import reproduce
    try:
        reproduce(a.name, a.data_dir, a.out, a.budget, a.seeds, a.dry_run, a.device, report=not a.no_report,
                  concurrent=a.concurrent, fused=a.fused, graphs=False if a.no_graphs else None)
    except Interrupted as e:  # its runs continue where they stopped when the same command runs again
        raise e.continued_by("the same `reslab reproduce` command") from None
    return 0


def cmd_report(a) -> int:
    from .report import write_report
    path = write_report(a.dir)
    print(f"written: {path}")
    return 0


def _register_reproduce(sub) -> None:
    from .experiments import BUDGETS
    p = sub.add_parser("reproduce", help="run one of the paper's experiments (--list shows them)")
    p.add_argument("name", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--budget", default="quick", choices=list(BUDGETS))
    p.add_argument("--seeds", type=_at_least(1), default=None, metavar="N",
                   help="seeds per net (default: the experiment's, at this budget)")
    p.add_argument("--dry-run", action="store_true", help="print the runs, their status and estimated cost")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-graphs", action="store_true",
                   help="train with the eager step, never capturing it as a CUDA graph (a free setting of each run)")
    p.add_argument("--concurrent", type=int, default=1, metavar="K",
                   help="train K runs at a time in one process (a run set; for GPUs, where one small net leaves "
                        "the device mostly idle)")
    p.add_argument("--fused", action="store_true",
                   help="with --concurrent: runs that differ only in seed train as one fused model, K at a time "
                        "(others, and runs that cannot be fused, as run sets)")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("report", help="plots, tables and numbers from a reproduce folder")
    p.add_argument("dir", help="the folder holding the run folders (reproduce's --out, or docs/results/NAME); "
                               "report.md, results.json/.csv and the figures are written into it")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------- predict / export / convert
def cmd_predict(a) -> int:
    from .predict import predict
    res = predict(a.path, a.images, top=a.top, batch_size=a.batch_size, device=a.device)
    if a.json:
        print_json(res)
        return 0
    for r in res:
        print(r["image"] + ":  " + ",  ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]))
    return 0


def cmd_export(a) -> int:
    from .export import export
    r = export(a.path, a.format, a.out, with_normalizer=a.with_normalizer, force=a.force)
    size = r["view_size"]
    print(f"exported {a.format}: {', '.join(r['files'])} (checked: max |diff| {r['max_abs_diff']:.2e} "
          f"against the PyTorch model; input: {r['input']}; its test view is {size}x{size}, any size is accepted)")
    return 0


def cmd_convert(a) -> int:
    from .interop import convert
    rec = convert(a.src, getattr(a, "from"), a.arch, a.out, force=a.force)
    print(f"converted {rec['source']} -> {a.out} ({rec['model_config']['name']}); use it with reslab "
          f"eval/predict/export or reslab.load()")
    return 0


def _register_use(sub) -> None:
    from .export import FORMATS
    from .interop import CONVERTERS
    p = sub.add_parser("predict", help="top-5 classes for images, with the checkpoint's classes and normalisation")
    p.add_argument("path", help="checkpoint, run folder, converted .pt or .safetensors")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top", type=_at_least(1), default=5, help="classes shown per image")
    p.add_argument("--batch-size", type=_at_least(1), default=64, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON (image, top classes, probabilities)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="TorchScript, ONNX or safetensors, checked against PyTorch")
    p.add_argument("path", help="checkpoint, run folder (its last.pt) or converted .pt")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True)
    p.add_argument("--with-normalizer", action="store_true",
                   help="torchscript/onnx: the graph takes uint8 RGB images and applies the run's normalisation")
    p.add_argument("--force", action="store_true", help="replace --out (and its sidecar) if it exists")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("convert", help="import torchvision, timm or CIFAR-reproduction weights")
    p.add_argument("src", help="weights file (.pth, .pt, .bin, .safetensors), or a timm hub folder")
    p.add_argument("--from", required=True, choices=list(CONVERTERS))
    p.add_argument("--arch", help="the reslab architecture; timm's files name their own")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_convert)


from .detection.cli import register as _register_detect  # noqa: E402

REGISTER = [_register_zoo, _register_data, _register_train, _register_bench, _register_reproduce, _register_use,
            _register_detect]


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other reslab error (`--help` shows usage)."""

    def error(self, message: str):
        where = self.prog.removeprefix("reslab").strip()
        print(f"reslab: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="reslab", description="ResNets as the paper defines them: build, train, evaluate, reproduce.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return p


def _message(e: Exception) -> str:
    from .errors import one_line
    return one_line(e)


def main(argv: list[str] | None = None) -> int:
    from .errors import ReslabError
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    from .interrupt import Interrupted, ctrl_c_saves
    try:
        # as a program (arguments from sys.argv) Ctrl-C saves the run like SIGTERM; called from Python, the
        # caller's Ctrl-C stays a KeyboardInterrupt
        with ctrl_c_saves() if argv is None else contextlib.nullcontext():
            return int(a.func(a) or 0)
    except Interrupted as e:  # SIGTERM or Ctrl-C: saved, and the exit status says which signal ended it
        print(f"reslab: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ReslabError, ValueError, FileNotFoundError) as e:
        print(f"reslab: error: {' '.join(_message(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reslab info ... | head`: the reader has what it wanted; no traceback
        if argv is None:  # stdout is the pipe: point it at /dev/null so the interpreter's final flush is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell tool killed by the signal reports it


if __name__ == "__main__":
    sys.exit(main())
