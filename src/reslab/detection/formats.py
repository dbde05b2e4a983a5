"""Which format a detection folder is in, its default splits, and one way to open a split of either:
COCO (data.py: annotations/instances_<split>.json) or PASCAL VOC (voc.py: VOC<year>/Annotations/...)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ReslabError
from .data import Categories, CocoDetection, DetectionSet
from . import voc

COCO_SPLITS = ("train2017", "val2017")


def format_of(root) -> str:
    """"coco" or "voc", from the folder's layout."""
    root = Path(root)
    # COCO's instances files first: on a case-insensitive file system a VOC year folder's Annotations/ is
    # also "annotations/"
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if voc.is_voc(root):
        return "voc"
    if (root / "annotations").is_dir():
        return "coco"  # an incomplete COCO folder: its own error names the missing file
    if not root.is_dir():
        raise ReslabError(f"--data-dir {root} {'is a file' if root.exists() else 'does not exist'}: give the folder "
                          "of a COCO-format or VOC-format dataset")
    raise ReslabError(f"{root}: neither a COCO-format folder (annotations/instances_<split>.json and <split>/) nor "
                      "a VOC-format one (VOC2007/ or VOC2012/, or VOCdevkit/ holding them, each with Annotations/, "
                      "ImageSets/Main/ and JPEGImages/); see docs/detection.md")


def default_splits(root) -> tuple[str, str]:
    """(training split, validation split) where the command line names none."""
    return COCO_SPLITS if format_of(root) == "coco" else voc.default_splits(root)


def open_split(root, split: str, train: bool, categories: Categories | None = None,
               on_corrupt: str = "stop") -> DetectionSet:
    cls = CocoDetection if format_of(root) == "coco" else voc.VocDetection
    return cls(root, split, train=train, categories=categories, on_corrupt=on_corrupt)


def has_split(root, split: str) -> bool:
    """Whether `split` names a split of this folder (a run's recorded split, on the data it is evaluated on)."""
    if format_of(root) == "coco":
        return (Path(root) / "annotations" / f"instances_{split}.json").is_file()
    try:
        voc.split_parts(root, split)
    except ReslabError:
        return False
    return True
