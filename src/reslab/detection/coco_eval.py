"""COCO box evaluation with pycocotools (COCO + COCOeval), the protocol behind the paper's COCO numbers.

    evaluate(model, loader, categories, ann_file)  ->  {map, map50, map75, map_small, map_medium, map_large,
                                                        ar1, ar10, ar100, ar_small, ar_medium, ar_large,
                                                        n_images, n_detections}

map is mAP@[.5:.95] (the paper's "mAP@[.5, .95]"), map50 is mAP@.5. A size range with no ground-truth
object in the evaluated images has no value (None; COCOeval's -1). pycocotools is an optional extra.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as tdist

from ..errors import ReslabError
from .data import Categories, check_eval_fields

STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
         "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")   # COCOeval.stats, in its order


def require_pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ReslabError("COCO evaluation needs pycocotools: pip install 'reslab[detection]'") from None
    return COCO, COCOeval


def to_coco_results(outputs: list[dict], image_ids: list[int], categories: Categories) -> list[dict]:
    """torchvision detections (xyxy boxes, labels 1..K) -> COCO result rows (xywh boxes, category ids)."""
    rows = []
    for out, image_id in zip(outputs, image_ids):
        b = out["boxes"].detach().cpu().double()
        xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)
        for box, score, label in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist()):
            rows.append({"image_id": int(image_id), "category_id": categories.cat_id(int(label)),
                         "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return rows


def coco_metrics(ann_file, results: list[dict], image_ids: list[int]) -> dict:
    """COCOeval on the given images. pycocotools' printing is kept off stdout (`--json` prints there)."""
    COCO, COCOeval = require_pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        check_eval_fields(gt.dataset["annotations"], ann_file)
        dt = gt.loadRes(results) if results else _no_results(COCO, gt)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (float(v) if v >= 0 else None) for k, v in zip(STATS, ev.stats)}
    return {**stats, "n_images": len(image_ids), "n_detections": len(results)}


def _no_results(COCO, gt):
    """An empty result set (loadRes refuses an empty list): every image, no detection."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt


@torch.no_grad()
def detect_all(model, loader, categories: Categories, device) -> tuple[list[dict], list[int]]:
    """Run the detector over this rank's images; (COCO result rows, image ids)."""
    rows, ids = [], []
    for images, targets in loader:
        outs = model([im.to(device, non_blocking=True) for im in images])
        batch_ids = [int(t["image_id"]) for t in targets]
        rows += to_coco_results(outs, batch_ids, categories)
        ids += batch_ids
    return rows, ids


def evaluate(model, loader, categories: Categories, ann_file, device="cpu") -> dict | None:
    """COCO metrics of `model` over `loader`'s images. Under torchrun every rank detects its shard and
    rank 0 scores the union (other ranks return None). Leaves the model in the mode it found it."""
    require_pycocotools()  # fail before the (long) detection pass
    was_training = model.training
    model.eval()
    try:
        rows, ids = detect_all(model, loader, categories, device)
    finally:
        model.train(was_training)
    if tdist.is_initialized():
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, (rows, ids))
        if tdist.get_rank() != 0:
            return None
        rows = [r for p in parts for r in p[0]]
        ids = [i for p in parts for i in p[1]]
    return coco_metrics(ann_file, rows, ids)


def evaluate_run(path, data_dir, split: str = "val2017", batch_size: int = 8, device: str = "auto",
                 workers: int = 2) -> dict:
    """COCO metrics of a trained detector (checkpoint or run folder) on one split of a COCO-format folder."""
    from ..dist import pick_device
    from .data import CocoDetection, eval_loader
    from .model import load_detector
    require_pycocotools()
    model = load_detector(path)
    cats = Categories.from_coco(model.reslab["categories"])
    ds = CocoDetection(data_dir, split, train=False, categories=cats)
    dev = pick_device(device)
    m = evaluate(model.to(dev), eval_loader(ds, batch_size, workers=workers), cats, ds.ann_file, dev)
    cfg = model.config
    return {"checkpoint": model.reslab["checkpoint"], "step": model.reslab["step"],
            "arch": cfg.backbone.get("name"), "head": cfg.head, "split": split, **m}
