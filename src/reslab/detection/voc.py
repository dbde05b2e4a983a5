"""PASCAL VOC detection data and its evaluation (the paper's Table 7: Faster R-CNN on VOC 2007 test, trained
on VOC 2007 trainval + VOC 2012 trainval, "07+12").

The VOCdevkit layout, at --data-dir or at --data-dir/VOCdevkit:

    VOC2007/Annotations/000005.xml   VOC2007/ImageSets/Main/{trainval,test}.txt   VOC2007/JPEGImages/000005.jpg
    VOC2012/...

A split is YEAR-SET (`2007-test`, `2012-trainval`), several joined with "+" (`2007-trainval+2012-trainval`).
A folder that itself holds Annotations/, ImageSets/Main/ and JPEGImages/ (a dataset labelled in VOC's format)
takes the set's name alone (`train`, `val`, `train+val`).

Categories are the class names found in the training split, sorted, labelled 1..K (for VOC's 20 classes the
sorted order is the devkit's own). Boxes: VOC numbers pixels from 1, corners included, so a box
xmin..xmax covers [xmin - 1, xmax) in the continuous coordinates torchvision uses. Objects marked
`difficult` are left out of training (as Faster R-CNN's code does by default) and, in evaluation, neither
count as objects to find nor make a detection of them a false positive (the devkit's rule).

Evaluation is the devkit's: per class, detections sorted by score, each compared with the ground-truth box
of its image that it overlaps most (matched or not); above 0.5 IoU it finds that box, unless an earlier
detection found it (then it is a false positive, even if another box was free). AP is VOC 2007's 11-point
interpolated one where every part of the split is VOC2007 (how the paper's VOC 2007 numbers were computed),
else the area under the interpolated precision-recall curve (VOC 2010 on). IoU is computed on continuous
coordinates, which equals the devkit's "+1" arithmetic on its pixel indices. mAP averages the classes that have
an object to find in the evaluated images.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from ..errors import ReslabError
from .data import Categories, DetectionSet

LAYOUT = ("a VOC-format folder holds VOC2007/ (or VOC2012/, or a VOCdevkit/ with them), each with Annotations/, "
          "ImageSets/Main/ and JPEGImages/ (see docs/detection.md)")


def _is_year_folder(p: Path) -> bool:
    return (p / "Annotations").is_dir() and (p / "ImageSets" / "Main").is_dir()


def devkit_root(root) -> Path | None:
    """The folder holding VOC<year>/ folders (root or root/VOCdevkit), or root itself where it is laid out as
    one year's folder; None where neither."""
    root = Path(root)
    for cand in (root, root / "VOCdevkit"):
        if any(_is_year_folder(p) for p in cand.glob("VOC*")):
            return cand
    return root if _is_year_folder(root) else None


def is_voc(root) -> bool:
    return devkit_root(root) is not None


def _year_of(folder: Path) -> str:
    """A year folder's year from its name (VOC2007 -> "2007"; "" for a dataset's own name)."""
    m = re.fullmatch(r"VOC(\d{4})", folder.name)
    return m.group(1) if m else ""


def default_splits(root) -> tuple[str, str]:
    """The paper's 07+12 setting where the folders allow it: train on every VOC2007/VOC2012 trainval present,
    evaluate on VOC 2007 test; a folder laid out as one year's: trainval / test where it has both lists (as
    VOC2007/ itself does), else train / val."""
    base = devkit_root(root)
    if base is None:
        raise ReslabError(f"{root}: {LAYOUT}")
    if _is_year_folder(base) and not any(_is_year_folder(p) for p in base.glob("VOC*")):
        lists = base / "ImageSets" / "Main"
        return ("trainval", "test") if all((lists / f"{n}.txt").is_file() for n in ("trainval", "test")) \
            else ("train", "val")
    years = [y for y in ("2007", "2012") if (base / f"VOC{y}" / "ImageSets" / "Main" / "trainval.txt").is_file()]
    if not years:
        raise ReslabError(f"{base}: neither VOC2007 nor VOC2012 has ImageSets/Main/trainval.txt; name the splits "
                          "with --train-split and --val-split (e.g. 2012-train, 2012-val)")
    return "+".join(f"{y}-trainval" for y in years), "2007-test"


def split_parts(root, split: str) -> list[tuple[Path, str, str]]:
    """(year folder, image set, year or "") for each part of `split`."""
    base = devkit_root(root)
    if base is None:
        raise ReslabError(f"{root}: {LAYOUT}")
    flat = _is_year_folder(base) and not any(_is_year_folder(p) for p in base.glob("VOC*"))
    parts = []
    for part in split.split("+"):
        if flat:  # a year's folder given itself (VOC2007/) keeps its year: VOC 2007 test is scored 11-point
            folder, year, name = base, _year_of(base), part
        else:
            year, sep, name = part.partition("-")
            if not sep or not year or not name:
                raise ReslabError(f"--split {split!r}: a VOC split is YEAR-SET (2007-test, 2012-trainval), several "
                                  "joined with '+'")
            folder = base / f"VOC{year}"
        ids_file = folder / "ImageSets" / "Main" / f"{name}.txt"
        if not ids_file.is_file():
            raise ReslabError(f"{ids_file} not found: split {part!r} needs it ({LAYOUT})")
        parts.append((folder, name, year))
    return parts


def read_objects(xml_path: Path) -> list[dict]:
    """The objects of one annotation file: {name, difficult, box (xmin - 1, ymin - 1, xmax, ymax)}."""
    try:
        tree = ET.parse(xml_path)
    except (OSError, ET.ParseError) as e:
        raise ReslabError(f"{xml_path}: not a readable VOC annotation ({e})") from None
    objs = []
    for i, o in enumerate(tree.getroot().iter("object")):
        name, box = (o.findtext("name") or "").strip(), o.find("bndbox")
        try:
            if not name or box is None:
                raise ValueError
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if not np.isfinite([x1, y1, x2, y2]).all():
                raise ValueError
        except (TypeError, ValueError):
            raise ReslabError(f"{xml_path}: object #{i + 1} needs a <name> and a <bndbox> with numeric xmin, ymin, "
                              "xmax, ymax") from None
        objs.append({"name": name, "difficult": (o.findtext("difficult") or "0").strip() == "1",
                     "box": (x1 - 1, y1 - 1, x2, y2)})
    return objs


class VocDetection(DetectionSet):
    """One split (possibly several image sets joined) of a VOC-format folder."""

    def __init__(self, root, split: str, train: bool, categories: Categories | None = None,
                 on_corrupt: str = "stop"):
        super().__init__(train, on_corrupt)
        parts = split_parts(root, split)
        self.split, self.eleven_point = split, all(year == "2007" for _, _, year in parts)
        entries = []  # (year folder, image id, objects)
        for folder, name, _ in parts:
            ids = (folder / "ImageSets" / "Main" / f"{name}.txt").read_text().split()
            for i in ids:
                xml = folder / "Annotations" / f"{i}.xml"
                if not xml.is_file():
                    raise ReslabError(f"{xml} not found: {folder / 'ImageSets' / 'Main' / (name + '.txt')} lists "
                                      f"image {i}")
                entries.append((folder, i, read_objects(xml)))
        if not entries:
            raise ReslabError(f"split {split!r} of {root}: its image sets list no images")
        names = sorted({o["name"] for _, _, objs in entries for o in objs})
        if categories is None:
            if not names:
                raise ReslabError(f"split {split!r} of {root}: its annotations hold no object")
            categories = Categories(tuple(range(1, len(names) + 1)), tuple(names))
        unknown = sorted(set(names) - set(categories.names))
        if unknown:
            raise ReslabError(f"split {split!r} of {root}: class {unknown[0]!r} is not among the detector's "
                              f"{len(categories.names)} classes ({', '.join(categories.names[:5])}"
                              f"{', ...' if len(categories.names) > 5 else ''}); use data with the same classes")
        self.categories = categories
        label = {n: i + 1 for i, n in enumerate(categories.names)}
        self.images, self.targets = [], {}
        for k, (folder, i, objs) in enumerate(entries):
            keep = [o for o in objs if not (train and o["difficult"]) and o["box"][2] > o["box"][0]
                    and o["box"][3] > o["box"][1]]
            if train and not keep:
                continue
            self.images.append({"id": k, "name": i, "path": folder / "JPEGImages" / f"{i}.jpg"})
            self.targets[k] = {"boxes": torch.tensor([o["box"] for o in keep], dtype=torch.float32).reshape(-1, 4),
                               "labels": torch.tensor([label[o["name"]] for o in keep], dtype=torch.int64),
                               "difficult": torch.tensor([o["difficult"] for o in keep], dtype=torch.bool),
                               "image_id": k}
        if not self.images:
            raise ReslabError(f"split {split!r} of {root}: no image with a (non-difficult) object to train on")
        self.check_files(f"split {split!r}")

    def path_of(self, im: dict) -> Path:
        return im["path"]

    def score(self, detections: list[dict], image_ids: list[int]) -> dict:
        gt = {i: self.targets[i] for i in image_ids}
        ap = voc_ap50(detections, gt, len(self.categories.names), self.eleven_point)
        per = {n: a for n, a in zip(self.categories.names, ap)}
        scored = [a for a in ap if a is not None]
        return {"protocol": "voc", "ap_metric": "11-point" if self.eleven_point else "area",
                "map50": float(np.mean(scored)) if scored else None, "ap50": per,
                "n_images": len(image_ids), "n_detections": sum(len(d["scores"]) for d in detections)}


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `boxes`, in continuous coordinates."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / union


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool) -> float:
    """VOC 2007's 11-point interpolated AP, or the area under the interpolated curve (VOC 2010 on)."""
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the precision envelope: best precision at this recall or more
    step = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[step + 1] - r[step]) * p[step + 1]))


def voc_ap50(detections: list[dict], gt: dict[int, dict], num_classes: int, eleven_point: bool) -> list[float | None]:
    """AP at IoU > 0.5 of each class 1..num_classes (None: no non-difficult object of it in `gt`)."""
    out = []
    for c in range(1, num_classes + 1):
        boxes = {i: t["boxes"][t["labels"] == c].double().numpy() for i, t in gt.items()}
        hard = {i: t["difficult"][t["labels"] == c].numpy() for i, t in gt.items()}
        npos = sum(int((~h).sum()) for h in hard.values())
        if npos == 0:
            out.append(None)
            continue
        found = {i: np.zeros(len(b), dtype=bool) for i, b in boxes.items()}
        cand = [(float(s), d["image_id"], b) for d in detections if d["image_id"] in gt
                for s, b, lab in zip(d["scores"].tolist(), d["boxes"].double().numpy(), d["labels"].tolist())
                if lab == c]
        cand.sort(key=lambda x: -x[0])  # stable: ties keep image order
        tp, fp = np.zeros(len(cand)), np.zeros(len(cand))
        for k, (_, i, b) in enumerate(cand):
            if len(boxes[i]):
                iou = box_iou(b, boxes[i])
                j = int(iou.argmax())
                if iou[j] > 0.5:
                    if hard[i][j]:
                        continue  # a difficult object: neither found nor missed
                    if not found[i][j]:
                        tp[k], found[i][j] = 1, True
                    else:
                        fp[k] = 1
                    continue
            fp[k] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out.append(average_precision(recall, precision, eleven_point))
    return out
