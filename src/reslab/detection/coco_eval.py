"""COCO box evaluation with pycocotools (COCO + COCOeval), the protocol behind the paper's COCO numbers.

    coco_metrics(ann_file, rows, image_ids)  ->  {protocol: "coco", map, map50, map75, map_small, map_medium,
                                                  map_large, ar1, ar10, ar100, ar_small, ar_medium, ar_large,
                                                  n_images, n_detections}

map is mAP@[.5:.95] (the paper's "mAP@[.5, .95]"), map50 is mAP@.5. A size range with no ground-truth
object in the evaluated images has no value (None; COCOeval's -1). pycocotools is an optional extra.
"""
from __future__ import annotations

import contextlib
import io

import torch

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


def to_coco_results(detections: list[dict], categories: Categories) -> list[dict]:
    """Detections ({image_id, xyxy boxes, scores, labels 1..K} per image) -> COCO result rows (xywh boxes,
    category ids)."""
    rows = []
    for out in detections:
        image_id = out["image_id"]
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
    return {"protocol": "coco", **stats, "n_images": len(image_ids), "n_detections": len(results)}


def _no_results(COCO, gt):
    """An empty result set (loadRes refuses an empty list): every image, no detection."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt
