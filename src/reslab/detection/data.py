"""Detection data: what every format's split shares (DetectionSet), COCO's format, and the loaders.

COCO's format is a folder of images and an `instances_<split>.json` (PASCAL VOC's is in voc.py):

    DIR/annotations/instances_train2017.json     DIR/train2017/*.jpg
    DIR/annotations/instances_val2017.json       DIR/val2017/*.jpg

A sample is (image, target): image float (3, H, W) in [0, 1] at its file's size (the detector's own
transform resizes the shorter side to min_size, paper: 600 px), target = {boxes (N, 4) xyxy in pixels,
labels (N,) int64 in 1..K, image_id, area, iscrowd}. COCO category ids (sparse: 1..90 for 80 classes) map
to contiguous labels 1..K in id order; 0 is the background. `Categories` maps back for evaluation.

Training skips crowd boxes and images left without a box, and flips horizontally with probability 1/2.
The flip is part of the sampler's draw, not the dataset's: a sample key is (index, flip), so an epoch's
order and flips are a pure function of (seed, epoch) and a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.build import EpochCursor
from ..errors import ReslabError
from ..interrupt import worker_options


@dataclass(frozen=True)
class Categories:
    """COCO category ids <-> contiguous labels 1..K (label = position in `ids` + 1)."""
    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, cats: list[dict]) -> "Categories":
        cats = sorted(cats, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    def to_list(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    def difference(self, other: "Categories") -> str:
        """What differs from `other`, in words: the first category one has and the other lacks or names
        otherwise."""
        mine, theirs = dict(zip(self.ids, self.names)), dict(zip(other.ids, other.names))
        for i in sorted(set(mine) | set(theirs)):
            if mine.get(i) != theirs.get(i):
                here = f"{mine[i]!r}" if i in mine else "absent"
                there = f"{theirs[i]!r}" if i in theirs else "absent"
                return f"category id {i} is {here} here and {there} in the detector"
        return "the same categories"

    @property
    def num_classes(self) -> int:
        """Foreground classes + the background: what the detector's predictor is built for."""
        return len(self.ids) + 1

    def label(self, cat_id: int) -> int:
        return self.ids.index(cat_id) + 1

    def cat_id(self, label: int) -> int:
        return self.ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1]


def split_paths(root, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of one split, with an error that shows the expected layout."""
    root = Path(root)
    ann, images = root / "annotations" / f"instances_{split}.json", root / split
    layout = (f"a COCO-format folder has annotations/instances_{split}.json and {split}/ with the images "
              "(see docs/detection.md)")
    if not ann.is_file():
        raise ReslabError(f"{ann} not found: {layout}")
    if not images.is_dir():
        raise ReslabError(f"{images} not found: {layout}")
    return ann, images


# the fields each entry needs, and their types (COCO's "instances" format)
_FIELDS = {"images": {"id": int, "file_name": str},
           "annotations": {"image_id": int, "category_id": int, "bbox": list},
           "categories": {"id": int, "name": str}}
_ONE = {"images": "image", "annotations": "annotation", "categories": "category"}


def read_annotations(path: Path, for_eval: bool = False) -> dict:
    """A COCO instances file, its structure checked up front: a malformed entry found here is a one-line error
    that names it, where found mid-run it would be a traceback. `for_eval`: also the fields COCO evaluation
    reads (checked before training, not after it)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReslabError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    missing = [k for k in _FIELDS if not isinstance(d, dict) or k not in d]
    if missing:
        raise ReslabError(f"{path}: not a COCO instances file (no {', '.join(missing)})")
    for key, fields in _FIELDS.items():
        if not isinstance(d[key], list):
            raise ReslabError(f"{path}: '{key}' must be a list, got {type(d[key]).__name__}")
        for i, entry in enumerate(d[key]):
            bad = ([f"is a {type(entry).__name__}, not an object"] if not isinstance(entry, dict) else
                   [f"has no '{f}'" if f not in entry else f"has a {type(entry[f]).__name__} '{f}' (needs {t.__name__})"
                    for f, t in fields.items() if not isinstance(entry.get(f), t) or isinstance(entry.get(f), bool)])
            if bad:
                name = f"id {entry['id']}" if isinstance(entry, dict) and "id" in entry else f"#{i}"
                raise ReslabError(f"{path}: {_ONE[key]} {name} {bad[0]}")
    if not d["categories"]:
        raise ReslabError(f"{path}: the file lists no categories")
    images = {im["id"] for im in d["images"]}
    stray = [a for a in d["annotations"] if a["image_id"] not in images]
    if stray:
        raise ReslabError(f"{path}: {len(stray)} annotations (e.g. id {stray[0].get('id')}) refer to an image_id "
                          f"the file does not list ({stray[0]['image_id']})")
    if for_eval:
        check_eval_fields(d["annotations"], path)
    return d


def check_eval_fields(annotations: list[dict], path) -> None:
    lacking = [a.get("id") for a in annotations if "area" not in a or "iscrowd" not in a]
    if lacking:
        raise ReslabError(f"{path}: {len(lacking)} annotations (e.g. id {lacking[0]}) lack 'area' or 'iscrowd', "
                          "which COCO evaluation needs")


def _target(anns: list[dict], cats: Categories, image_id: int, keep_crowd: bool) -> dict:
    boxes, labels, area, crowd = [], [], [], []
    for a in anns:
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ReslabError(f"annotation {a.get('id')} of image {image_id}: 'bbox' must be [x, y, width, height], "
                              f"got {a.get('bbox')!r}") from None
        if not all(map(math.isfinite, (x, y, w, h))):
            raise ReslabError(f"annotation {a.get('id')} of image {image_id}: 'bbox' has a non-finite value "
                              f"{a['bbox']!r}")
        if w <= 0 or h <= 0 or (a.get("iscrowd", 0) and not keep_crowd):
            continue  # degenerate boxes carry no learnable extent
        boxes.append([x, y, x + w, y + h])
        labels.append(cats.label(a["category_id"]))
        area.append(a.get("area", w * h))
        crowd.append(a.get("iscrowd", 0))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id,
            "area": torch.tensor(area, dtype=torch.float32), "iscrowd": torch.tensor(crowd, dtype=torch.int64)}


class DetectionSet(Dataset):
    """What every detection split shares: images in a fixed order (each a dict with an int "id"), their
    targets by id, the categories, and reading with `on_corrupt`. Subclasses (COCO here, VOC in voc.py) fill
    `images`, `targets`, `categories`, say where an image's file is (`path_of`) and score detections
    (`score`)."""
    images: list[dict]
    targets: dict[int, dict]
    categories: Categories

    def __init__(self, train: bool, on_corrupt: str):
        """on_corrupt="skip" (training only): an undecodable image is reported once on stderr and the next
        decodable one in order (with its own boxes) takes its place, so an epoch keeps its length and a run its
        batches; evaluation always stops, as a skipped image would change what is measured."""
        if on_corrupt not in ("stop", "skip"):
            raise ReslabError(f"on_corrupt must be 'stop' or 'skip', got {on_corrupt!r}")
        self.on_corrupt, self.skipped = on_corrupt if train else "stop", []

    def path_of(self, im: dict) -> Path:
        raise NotImplementedError

    def score(self, detections: list[dict], image_ids: list[int]) -> dict:
        """Metrics of `detections` ({image_id, boxes xyxy, scores, labels 1..K} per image) on `image_ids`."""
        raise NotImplementedError

    def check_scorer(self) -> None:
        """Fail now, not after a long detection pass, where scoring needs what is not installed."""

    def check_files(self, source: str) -> None:
        """A missing file found now is a clear error; found by a loader worker it would come wrapped in a
        traceback."""
        missing = [self.path_of(im) for im in self.images if not self.path_of(im).is_file()]
        if missing:
            raise ReslabError(f"{len(missing)} of the {len(self.images)} images that {source} lists are missing "
                              f"(e.g. {missing[0]})")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        """key: an index, or (index, flip) as the training sampler draws it."""
        i, flip = key if isinstance(key, tuple) else (key, False)
        for k in range(len(self.images)):
            im = self.images[(i + k) % len(self.images)]
            path = self.path_of(im)
            try:
                img = read_rgb(path)
                break
            except ReslabError as e:
                if self.on_corrupt == "stop":
                    raise
                if str(path) not in self.skipped:  # once per process (a worker's copy, with workers)
                    self.skipped.append(str(path))
                    print(f"reslab: skipping corrupt image: {e}", file=sys.stderr)
        else:
            raise ReslabError(f"none of the {len(self.images)} images of this split could be decoded")
        target = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.targets[im["id"]].items()}
        if flip:
            img, target["boxes"] = hflip(img, target["boxes"])
        return img.float().div_(255), target


class CocoDetection(DetectionSet):
    """One split of a COCO-format folder. `train=True` drops crowd boxes and images without a box."""

    def __init__(self, root, split: str, train: bool, categories: Categories | None = None,
                 on_corrupt: str = "stop"):
        super().__init__(train, on_corrupt)
        self.ann_file, self.folder = split_paths(root, split)
        d = read_annotations(self.ann_file, for_eval=not train)
        found = Categories.from_coco(d["categories"])
        if categories is not None and categories != found:
            raise ReslabError(f"{self.ann_file}: its categories differ from the ones the detector was trained on "
                              f"({len(found.ids)} vs {len(categories.ids)}; {found.difference(categories)}); use "
                              "data with the same categories")
        self.categories = found
        known = set(found.ids)
        by_image: dict[int, list[dict]] = {}
        for a in d["annotations"]:
            if a["category_id"] not in known:
                raise ReslabError(f"{self.ann_file}: annotation {a.get('id')} has category_id {a['category_id']}, "
                                  "which is not among the file's categories")
            by_image.setdefault(a["image_id"], []).append(a)
        self.images = sorted(d["images"], key=lambda im: im["id"])
        try:
            self.targets = {im["id"]: _target(by_image.get(im["id"], []), found, im["id"], keep_crowd=not train)
                            for im in self.images}
        except ReslabError as e:  # a box that cannot be read: named with its file
            raise ReslabError(f"{self.ann_file}: {e}") from None
        if train:
            self.images = [im for im in self.images if len(self.targets[im["id"]]["boxes"])]
        if not self.images:
            raise ReslabError(f"{self.ann_file}: no images" + (" with a (non-crowd) box" if train else ""))
        self.check_files(f"{self.ann_file.name} (in {self.folder})")

    def path_of(self, im: dict) -> Path:
        return self.folder / im["file_name"]

    def check_scorer(self) -> None:
        from .coco_eval import require_pycocotools
        require_pycocotools()

    def score(self, detections: list[dict], image_ids: list[int]) -> dict:
        from .coco_eval import coco_metrics, to_coco_results
        return coco_metrics(self.ann_file, to_coco_results(detections, self.categories), image_ids)


def read_rgb(path, upright: bool = False) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB. `upright`: turned as its EXIF orientation says, for a photo to
    predict on (training reads files as stored: COCO's boxes are on the stored pixels)."""
    from ..data.images import decode
    if not Path(path).is_file():
        raise ReslabError(f"{path}: a folder, not an image file (give one image)" if Path(path).is_dir()
                          else f"{path}: no such image file")
    return decode(str(path), upright=upright)


def hflip(img: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image (C, H, W) and its xyxy boxes: x -> W - x, so x1' = W - x2 and x2' = W - x1."""
    w = img.shape[-1]
    return img.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)


def collate(batch):
    """Detection images differ in size: a batch is (list of images, list of targets)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class FlipSampler(Sampler):
    """This rank's share of a seeded shuffle (DistributedSampler), each index paired with a flip bit drawn
    per (seed, epoch, image). `skip` leaves out the first items of the epoch (resuming mid-epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, flip: bool = True):
        self.order = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.n, self.seed, self.flip = n, seed, flip
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        flips = (torch.rand(self.n, generator=g) < 0.5) if self.flip else torch.zeros(self.n, dtype=torch.bool)
        for i in islice(iter(self.order), self.skip, None):
            yield i, bool(flips[i])


class TrainStream(EpochCursor):
    """Training batches one epoch per iteration, resumable: state = {epoch, batch within the epoch}.
    Resuming asks the sampler to skip the used items, so they are not even decoded again."""

    def __init__(self, dataset: DetectionSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 2):
        self.sampler = FlipSampler(len(dataset), seed, rank, world_size)
        if len(self.sampler) < batch_size:
            raise ReslabError(f"{len(dataset)} training images cannot fill a batch of {batch_size} per process; "
                              "lower --batch-size")
        # own generator: creating an iterator must not draw from the global RNG (the RPN's sampler does)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate, drop_last=True, persistent_workers=False, **worker_options(workers),
                                 generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size
        self.epoch, self.batch = 0, 0

    def __iter__(self):
        self.sampler.set_position(self.epoch, self.batch * self.batch_size)
        for images, targets in self.loader:
            self.batch += 1
            yield images, targets
        self.epoch, self.batch = self.epoch + 1, 0


def eval_loader(dataset: DetectionSet, batch_size: int, rank: int = 0, world_size: int = 1,
                workers: int = 2) -> DataLoader:
    """Every image once, in id order; rank r gets the contiguous r-th slice (no padding, no duplicates)."""
    from ..data.folder import ShardSampler
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, collate_fn=collate, **worker_options(workers))
