"""`reslab detect train | eval | predict`. `register(sub)` adds the `detect` command to the main parser.

Recipe and detector flags are derived from the DetectRecipe / DetectorConfig fields (name, type, help),
so a flag is named once. Flags left out are None and dropped: they never override a default, nor the
settings of a run being resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import fields

# DetectorConfig fields a user sets from the command line (the rest come from the data and the weights)
MODEL_FLAGS = ("min_size", "max_size", "frozen_bn", "frozen_stages", "anchor_sizes", "aspect_ratios",
               "rois_per_image", "proposals_train", "proposals_test", "fpn_channels")


def _add_field_flags(p, cls, names, group: str) -> None:
    """One flag per dataclass field: --field-name, its type from the annotation, help from the metadata."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in names:
            continue
        flag, dest, t = "--" + f.name.replace("_", "-"), f"{group}__{f.name}", hints[f.name]
        text, meta = f.metadata.get("help", ""), f.name.upper()
        if t is bool:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(t) is tuple:
            default = f"; default {' '.join(map(str, f.default))}" if f.default else ""
            p.add_argument(flag, dest=dest, nargs="+", type=typing.get_args(t)[0], default=None, metavar=meta,
                           help=text + default)
        else:
            p.add_argument(flag, dest=dest, type=t, default=None, metavar=meta, help=f"{text}; default {f.default}")


def _collect(a, group: str) -> dict:
    prefix = group + "__"
    return {k[len(prefix):]: v for k, v in vars(a).items() if k.startswith(prefix) and v is not None}


def cmd_train(a) -> int:
    from .train import DetectRun, train
    model = _collect(a, "model")
    if a.width is not None:
        model["width"] = a.width
    if a.v15:
        model["stride_in_1x1"] = False
    run = DetectRun(data_dir=a.data_dir, out=a.out, arch=a.arch, head=a.head, weights=a.weights,
                    recipe=_collect(a, "recipe"), model=model, seed=a.seed, resume=a.resume, device=a.device,
                    workers=a.workers, train_split=a.train_split, val_split=a.val_split, eval_batch=a.eval_batch,
                    stop_at=a.stop_at, progress=not a.quiet, extend_to=a.extend_to, on_corrupt=a.on_corrupt)
    final = train(run)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if final:
        from .evaluate import describe
        print(f"done: {a.out} step {final['step']}: {describe(final)} on {final['n_images']} validation images")
    else:
        print(f"stopped: {a.out}/last.pt holds the run; continue it with --resume")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import describe, evaluate_run
    m = evaluate_run(a.path, a.data_dir, split=a.split, batch_size=a.batch_size, device=a.device,
                     workers=a.workers)
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['checkpoint']} ({m['arch']}, {m['head']}, step {m['step']}) on {m['n_images']} {m['split']} images: "
          f"{describe(m)}")
    return 0


def cmd_predict(a) -> int:
    from pathlib import Path

    from ..dist import pick_device
    from .data import Categories, read_rgb
    from .draw import detect, draw
    from .model import load_detector
    model = load_detector(a.path).to(pick_device(a.device))
    image = read_rgb(a.image, upright=True)
    dets = detect(model, image, a.threshold, Categories.from_coco(model.reslab["categories"]))
    out = draw(image, dets, a.out or f"{Path(a.image).stem}_boxes.png")
    if a.json:
        print(json.dumps({"image": a.image, "out": str(out), "detections": dets}, indent=2))
        return 0
    for d in dets:
        print(f"{d['class']:<16} {d['score']:.3f}  box {d['box']}")
    print(f"{len(dets)} detections at score >= {a.threshold}; drawn into {out}")
    return 0


def _register_train(dsub) -> None:
    from .config import HEADS, DetectorConfig, DetectRecipe
    p = dsub.add_parser("train", help="train Faster R-CNN on a COCO- or VOC-format folder (resumable, "
                        "torchrun-ready)")
    p.add_argument("--data-dir", required=True, help="COCO: a folder with annotations/instances_<split>.json and "
                   "<split>/; PASCAL VOC: a folder with VOC2007/, VOC2012/ (or VOCdevkit/ holding them)")
    p.add_argument("--out", required=True, help="run folder (metrics.jsonl, config.json, last.pt)")
    p.add_argument("--arch", default=None, help="ImageNet-family backbone: resnet18 .. resnet152 (default resnet101)")
    p.add_argument("--head", default=None, choices=HEADS, help="c4: the paper's design (default); fpn: a pyramid")
    p.add_argument("--weights", default=None, help="classification weights for the backbone: a reslab checkpoint "
                   "or a `reslab convert` file (strongly advised: the paper starts from ImageNet)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--train-split", default=None, help="COCO: default train2017; VOC: YEAR-SET joined with +, "
                   "default 2007-trainval+2012-trainval (those present; the paper's 07+12); a resumed run: its own")
    p.add_argument("--val-split", default=None, help="COCO: default val2017; VOC: default 2007-test")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--eval-batch", type=int, default=8, help="images per evaluation batch, per process")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step, resumable")
    p.add_argument("--on-corrupt", choices=("stop", "skip"), default="stop",
                   help="an undecodable training image: stop (the step reached is saved first), or report it once "
                        "and use the next image in its place; evaluation always stops")
    p.add_argument("--extend-to", type=int, default=None, metavar="N",
                   help="with --resume: lengthen the run to N steps, its lr steps kept at the steps they were")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    _add_field_flags(p, DetectRecipe, [f.name for f in fields(DetectRecipe)], "recipe")
    _add_field_flags(p, DetectorConfig, MODEL_FLAGS, "model")
    p.add_argument("--width", type=float, default=None, help="backbone width multiplier (small test nets)")
    p.add_argument("--v1.5", dest="v15", action="store_true",
                   help="bottleneck stride on the 3x3 (torchvision) instead of the first 1x1 (paper v1)")
    p.set_defaults(func=cmd_train)


def register(sub) -> None:
    p = sub.add_parser("detect", help="object detection with a ResNet backbone (paper §4.3): train, eval, predict")
    dsub = p.add_subparsers(dest="detect_command", required=True, metavar="SUBCOMMAND")
    _register_train(dsub)
    p = dsub.add_parser("eval", help="mAP of a trained detector: COCO's (pycocotools) or PASCAL VOC's, by the "
                        "data's format")
    p.add_argument("path", help="a run folder (its last.pt) or a detector checkpoint")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default=None, help="default: COCO val2017; VOC 2007-test")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = dsub.add_parser("predict", help="detect objects in an image and draw them into a PNG")
    p.add_argument("path", help="a run folder or a detector checkpoint")
    p.add_argument("image")
    p.add_argument("--out", default=None, help="PNG to write (default IMAGE_boxes.png here)")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score drawn")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)
