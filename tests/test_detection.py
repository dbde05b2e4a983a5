"""Detection (paper §4.3): Faster R-CNN on a reslab backbone, on a small COCO-format set made here.

The set: coloured squares, discs and triangles (COCO category ids 3, 7, 11: sparse, as COCO's are) on
textured noise, 96-128 px JPEGs with an instances json. Models are tiny (ResNet-18 at width 1/8, 128 px
inputs) so that a few hundred CPU steps learn the set.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import reslab
from reslab import checkpoint as ckpt
from reslab.cli import main
from reslab.data.normalize import Normalizer
from reslab.detection import create_detector, load_detector
from reslab.detection.coco_eval import coco_metrics, require_pycocotools
from reslab.detection.data import CocoDetection, TrainStream, hflip
from reslab.detection.model import trunk_features
from reslab.detection.train import DetectRun, train
from reslab.errors import ReslabError
from reslab.interop import weights_record

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 11, "name": "triangle"}]
COLOURS = {3: (225, 40, 40), 7: (40, 200, 60), 11: (50, 80, 235)}
# a tiny detector: anchors for 20-44 px objects, few RoIs and proposals
TINY = dict(width=0.125, min_size=128, max_size=128, anchor_sizes=(16, 32, 64), rois_per_image=32,
            proposals_train=300, proposals_test=100)
TINY_FLAGS = ["--arch", "resnet18", "--width", "0.125", "--min-size", "128", "--max-size", "128",
              "--anchor-sizes", "16", "32", "64", "--rois-per-image", "32", "--proposals-train", "300",
              "--proposals-test", "100", "--workers", "0", "--quiet"]


# ------------------------------------------------------------------ the data set
def _background(rng, h, w):
    from PIL import Image
    coarse = rng.integers(60, 200, size=(4, 4, 3)).astype(np.uint8)  # smooth colour blotches ...
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    return np.clip(img + rng.integers(-25, 26, size=(h, w, 3)), 0, 255).astype(np.uint8)  # ... plus grain


def _free(x, y, s, placed):
    return not any(x < bx + bs and bx < x + s and y < by + bs and by < y + s for bx, by, bs in placed)


def _draw_shape(draw, cat, x, y, s, colour):
    if cat == 3:
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
    elif cat == 7:
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
    else:
        draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=colour)


def make_shapes_split(root: Path, split: str, n: int, seed: int, extras: bool = False) -> None:
    """n JPEGs with 1-3 non-overlapping shapes each, and annotations/instances_<split>.json. `extras`
    adds what training must skip: an image without objects and a crowd box."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n + extras):
        h, w = int(rng.integers(96, 129)), int(rng.integers(96, 129))
        img = Image.fromarray(_background(rng, h, w))
        draw, placed = ImageDraw.Draw(img), []
        for _ in range(0 if (extras and i == n) else int(rng.integers(1, 4))):
            s = int(rng.integers(20, 45))
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            if not _free(x, y, s, placed):
                continue
            placed.append((x, y, s))
            cat = int(rng.choice([c["id"] for c in CATEGORIES]))
            colour = tuple(int(c) for c in np.clip(np.array(COLOURS[cat]) + rng.integers(-20, 21, 3), 0, 255))
            _draw_shape(draw, cat, x, y, s, colour)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, s, s],
                         "area": float(s * s), "iscrowd": 0})
        img.save(root / split / f"{i:04d}.jpg", quality=92)
        images.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "height": h, "width": w})
    if extras:
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30],
                     "area": 900.0, "iscrowd": 1})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"info": {"description": "reslab test shapes"}, "images": images, "annotations": anns,
         "categories": CATEGORIES}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_shapes_split(root, "train2017", 48, seed=0, extras=True)
    make_shapes_split(root, "val2017", 32, seed=1)
    return root


def _run(coco, out, **kw) -> DetectRun:
    kw.setdefault("recipe", {})
    kw["recipe"] = {"batch_size": 2, "lr": 0.02, "log_every": 1, **kw["recipe"]}
    return DetectRun(data_dir=str(coco), out=str(out), arch="resnet18", model={**TINY, "frozen_bn": False},
                     workers=0, progress=False, **kw)


# ------------------------------------------------------------------ data
def test_dataset_targets_categories_and_skips(coco):
    tr = CocoDetection(coco, "train2017", train=True)
    raw = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    assert len(raw["images"]) == 49 and len(tr) == 48  # the image without objects is skipped
    cats = tr.categories
    assert cats.ids == (3, 7, 11) and cats.num_classes == 4 and cats.name(2) == "disc"
    assert [cats.cat_id(cats.label(c)) for c in (3, 7, 11)] == [3, 7, 11]
    img, t = tr[0]
    assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    own = [a for a in raw["annotations"] if a["image_id"] == t["image_id"]]
    assert len(own) == len(t["boxes"]) + 1  # image 1 carries the crowd box, dropped in training
    plain = [a for a in own if not a["iscrowd"]]
    want = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in plain)])
    assert torch.equal(t["boxes"], want.float())
    assert t["labels"].tolist() == [cats.label(a["category_id"]) for a in plain]
    assert set(t) == {"boxes", "labels", "image_id", "area", "iscrowd"}
    val = CocoDetection(coco, "val2017", train=False)
    assert len(val) == 32


def test_flip_moves_boxes_with_the_image(coco):
    tr = CocoDetection(coco, "train2017", train=True)
    img, t = tr[(3, False)]
    fimg, ft = tr[(3, True)]
    assert torch.equal(fimg, img.flip(-1))
    w = img.shape[-1]
    assert torch.equal(ft["boxes"][:, [0, 2]], w - t["boxes"][:, [2, 0]])
    assert torch.equal(ft["boxes"][:, [1, 3]], t["boxes"][:, [1, 3]])
    # the pixels inside a flipped box are the mirrored pixels of the original box
    x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
    fx1, _, fx2, _ = (int(v) for v in ft["boxes"][0])
    assert torch.equal(fimg[:, y1:y2, fx1:fx2], img[:, y1:y2, x1:x2].flip(-1))
    assert torch.equal(hflip(*hflip(img, t["boxes"]))[1], t["boxes"])


def test_loader_position_restores_the_same_batches(coco):
    tr = CocoDetection(coco, "train2017", train=True)
    a = TrainStream(tr, 4, seed=5, workers=0)
    seen, state = [], None
    for epoch in range(2):
        for k, (images, targets) in enumerate(a):
            seen.append(([t["image_id"] for t in targets], [t["boxes"].sum().item() for t in targets]))
            if epoch == 1 and k == 4:
                state = a.state_dict()
    b = TrainStream(tr, 4, seed=5, workers=0)
    b.load_state_dict(state)
    rest = [([t["image_id"] for t in tg], [t["boxes"].sum().item() for t in tg]) for _, tg in b]
    assert state == {"epoch": 1, "batch": 5} and rest == seen[len(a) + 5:]
    assert seen[:len(a)] != seen[len(a):]  # each epoch draws its own order and flips
