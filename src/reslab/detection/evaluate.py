"""Running a detector over a split and scoring it with the split's own protocol: COCO's (pycocotools,
coco_eval.py) for a COCO-format folder, PASCAL VOC's (voc.py) for a VOC one. Every metrics dict names its
`protocol`; `describe` puts one in words."""
from __future__ import annotations

import torch
import torch.distributed as tdist

from .data import DetectionSet


@torch.no_grad()
def detect_all(model, loader, device) -> tuple[list[dict], list[int]]:
    """Run the detector over this rank's images: ({image_id, boxes, scores, labels} per image, on the CPU;
    the image ids)."""
    dets, ids = [], []
    for images, targets in loader:
        outs = model([im.to(device, non_blocking=True) for im in images])
        for out, t in zip(outs, targets):
            dets.append({"image_id": int(t["image_id"]),
                         **{k: out[k].detach().cpu() for k in ("boxes", "scores", "labels")}})
            ids.append(int(t["image_id"]))
    return dets, ids


def evaluate(model, loader, dataset: DetectionSet, device="cpu") -> dict | None:
    """The metrics of `model` over `loader`'s images of `dataset`. Under torchrun every rank detects its shard
    and rank 0 scores the union (other ranks return None). Leaves the model in the mode it found it."""
    dataset.check_scorer()  # fail before the (long) detection pass
    was_training = model.training
    model.eval()
    try:
        dets, ids = detect_all(model, loader, device)
    finally:
        model.train(was_training)
    if tdist.is_initialized():
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, (dets, ids))
        if tdist.get_rank() != 0:
            return None
        dets = [r for p in parts for r in p[0]]
        ids = [i for p in parts for i in p[1]]
    return dataset.score(dets, ids)


def evaluate_run(path, data_dir, split: str | None = None, batch_size: int = 8, device: str = "auto",
                 workers: int = 2) -> dict:
    """The metrics of a trained detector (checkpoint or run folder) on one split of a COCO- or VOC-format
    folder (`split` None: the validation split its run recorded, where this folder has it, else the
    format's)."""
    import json
    from pathlib import Path

    from ..dist import pick_device
    from .data import Categories, eval_loader
    from .formats import default_splits, has_split, open_split
    from .model import load_detector
    model = load_detector(path)
    cats = Categories.from_coco(model.reslab["categories"])
    if split is None:
        try:
            rec = json.loads((Path(model.reslab["checkpoint"]).parent / "config.json").read_text())
            recorded = (rec.get("resumed_with") or rec.get("run") or {}).get("val_split")
        except (OSError, ValueError, AttributeError):
            recorded = None
        split = recorded if recorded and has_split(data_dir, recorded) else default_splits(data_dir)[1]
    ds = open_split(data_dir, split, train=False, categories=cats)
    dev = pick_device(device)
    m = evaluate(model.to(dev), eval_loader(ds, batch_size, workers=workers), ds, dev)
    cfg = model.config
    return {"checkpoint": model.reslab["checkpoint"], "step": model.reslab["step"],
            "arch": cfg.backbone.get("name"), "head": cfg.head, "split": split, **m}


def pct(v) -> str:
    """A metric in percent; "n/a" where the images hold no ground-truth box to score against."""
    return "n/a" if v is None else f"{100 * v:.1f}"


def describe(m: dict) -> str:
    """A metrics dict in words, as its protocol reports it."""
    if m.get("protocol") == "voc":
        per = ", ".join(f"{c} {pct(v)}" for c, v in m["ap50"].items())
        text = f"mAP@.5 {pct(m['map50'])} (VOC, {m['ap_metric']} AP; {per})"
    else:
        size = ", ".join(f"{k[4:]} {pct(m[k])}" for k in ("map_small", "map_medium", "map_large")
                         if m.get(k) is not None)
        text = (f"mAP@[.5,.95] {pct(m['map'])}, mAP@.5 {pct(m['map50'])}, mAP@.75 {pct(m['map75'])}"
                + (f" ({size})" if size else ""))
    return text + (" (n/a: the images hold no ground-truth box)" if m["map50"] is None else "")
