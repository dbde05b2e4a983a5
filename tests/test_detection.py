"""Detection (paper §4.3): Faster R-CNN on a reslab backbone, on a small COCO-format set made here.

The set: coloured squares, discs and triangles (COCO category ids 3, 7, 11: sparse, as COCO's are) on
textured noise, 96-128 px JPEGs with an instances json. Models are tiny (ResNet-18 at width 1/8, 128 px
inputs at 160 px) so that a few hundred CPU steps learn the set.
"""
import json
import re
import shutil
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
from reslab.detection.data import Categories, CocoDetection, TrainStream, hflip
from reslab.detection.model import trunk_features
from reslab.detection.train import DetectRun, train
from reslab.errors import ReslabError
from reslab.interop import weights_record
from reslab.logs import read_metrics

from conftest import kill_on_eval_line

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 11, "name": "triangle"}]
COLOURS = {3: (225, 40, 40), 7: (40, 200, 60), 11: (50, 80, 235)}
# a tiny detector: anchors for 20-44 px objects, few RoIs and proposals
TINY = dict(width=0.125, min_size=160, max_size=160, anchor_sizes=(16, 32, 64), rois_per_image=32,
            proposals_train=300, proposals_test=100)
TINY_FLAGS = ["--arch", "resnet18", "--width", "0.125", "--min-size", "160", "--max-size", "160",
              "--anchor-sizes", "16", "32", "64", "--rois-per-image", "32", "--proposals-train", "300",
              "--proposals-test", "100", "--workers", "0", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Detection runs many small ops: on cores shared with other jobs one thread was 8x faster than two
    (measured). conftest asks for two before every test; this runs after it."""
    torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def coco_small(tmp_path_factory) -> Path:
    """Three batches of two per epoch: short runs still cross epochs."""
    root = tmp_path_factory.mktemp("coco_small")
    make_shapes_split(root, "train2017", 6, seed=2)
    make_shapes_split(root, "val2017", 4, seed=3)
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


# ------------------------------------------------------------------ models
def _classifier_file(path: Path, arch="resnet18", width=0.25, **kw) -> nn.Module:
    """A reslab classification checkpoint with non-trivial BN (some negative scales, so that max-pooling
    before the BN would give another answer) and a custom channel normalisation."""
    torch.manual_seed(0)
    net = reslab.create_model(arch, width=width, num_classes=5, **kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    norm = Normalizer("channel", torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
    ckpt.save_atomic(weights_record(net, norm, [f"c{i}" for i in range(5)], "test"), path)
    return net.eval()


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_backbone_features_equal_the_classifiers(tmp_path, head):
    net = _classifier_file(tmp_path / "cls.pt")
    det = create_detector("resnet18", head=head, num_classes=4, weights=tmp_path / "cls.pt", min_size=128,
                          max_size=128).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))   # forward order, the classifier's own
        c4 = net.layer3(net.layer2(net.layer1(stem)))
        got = trunk_features(det, x)
        if head == "c4":  # trunk = conv1..conv4_x; region head = conv5_x + global average pooling
            torch.testing.assert_close(got, c4, rtol=1e-5, atol=1e-5)
            pooled = det.roi_heads.box_head(got)
            torch.testing.assert_close(pooled, net.forward_head(net.forward_features(x), pre_logits=True),
                                       rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, net.forward_features(x), rtol=1e-5, atol=1e-5)
    assert det.transform.image_mean == pytest.approx([0.4, 0.5, 0.6])
    assert det.transform.image_std == pytest.approx([0.2, 0.25, 0.3])
    assert det.config.backbone["width"] == 0.25 and det.config.backbone["stride_in_1x1"] is True


def test_classification_weights_land_in_the_backbone(tmp_path):
    net = _classifier_file(tmp_path / "cls.pt", arch="resnet50", width=0.125)
    det = create_detector("resnet50", num_classes=4, weights=tmp_path / "cls.pt")
    body, head = det.backbone, det.roi_heads.box_head
    assert torch.equal(body.conv1.weight, net.conv1.weight)
    assert torch.equal(body.layer3[5].conv2.weight, net.layer3[5].conv2.weight)
    assert torch.equal(head.layer4[0].downsample[0].weight, net.layer4[0].downsample[0].weight)
    bn, frozen = net.layer2[0].bn1, body.layer2[0].bn1
    assert isinstance(frozen, FrozenBatchNorm2d)
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen, k), getattr(bn, k))
    # options not given are the file's; options given against it are an error
    with pytest.raises(ReslabError, match="stride_in_1x1"):
        create_detector("resnet50", num_classes=4, weights=tmp_path / "cls.pt", stride_in_1x1=False)
    with pytest.raises(ReslabError, match="layers"):
        create_detector("resnet101", num_classes=4, weights=tmp_path / "cls.pt")


def _batch(n=2, size=112):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size - 8 * i, generator=g) for i in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 90.0, 44.0]]),
                "labels": torch.tensor([1, 3])} for _ in range(n)]
    return images, targets


def test_c4_defaults_are_the_papers_frozen_bn_and_stem(tmp_path):
    torch.manual_seed(0)
    det = create_detector("resnet18", num_classes=4, **TINY).train()
    cfg = det.config
    assert (cfg.head, cfg.frozen_bn, cfg.frozen_stages, cfg.backbone["shortcut"]) == ("c4", True, 2, "B")
    assert cfg.backbone["stride_in_1x1"] is True
    assert not any(isinstance(m, nn.BatchNorm2d) for m in det.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in reslab.create_model("resnet18", width=0.125).modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in det.modules()) == n_bn  # every BN, none left
    before = {k: v.clone() for k, v in det.state_dict().items() if "running" in k}
    losses = det(*_batch())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    body = det.backbone
    for m in (body.conv1, body.layer1):
        assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    trainable = [(n, p) for n, p in det.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), \
        [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert any(n.startswith("roi_heads.box_head.layer4") for n, _ in trainable)  # conv5_x is the region head
    after = det.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # statistics did not move


def test_fpn_builds_trains_and_detects():
    torch.manual_seed(0)
    det = create_detector("resnet18", head="fpn", num_classes=4, width=0.125, min_size=128, max_size=128,
                          anchor_sizes=(8, 16, 32, 64, 128), rois_per_image=32, proposals_train=200)
    det.train()
    losses = det(*_batch())
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert det.backbone.body.layer4[0].conv1.weight.grad is not None
    assert det.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    assert det.backbone.body.layer1[0].conv1.weight.grad is None
    det.eval()
    with torch.no_grad():
        out = det(_batch()[0])
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    with pytest.raises(ReslabError, match="5 anchor sizes"):
        create_detector("resnet18", head="fpn", num_classes=4, anchor_sizes=(16, 32, 64))


# ------------------------------------------------------------------ training, evaluation, prediction
LEARN = ["--no-frozen-bn", "--iters", "300", "--batch-size", "2", "--lr", "0.02", "--log-every", "50",
         "--save-every", "100", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory) -> Path:
    """300 steps from random weights. BN trains here (--no-frozen-bn): frozen BN presumes ImageNet
    statistics, and frozen at its initial values it is an identity that leaves a thin net hard to train."""
    out = tmp_path_factory.mktemp("det") / "run"
    torch.set_num_threads(1)  # a module fixture is set up before the function-scoped _one_thread
    assert main(["detect", "train", "--data-dir", str(coco), "--out", str(out), *TINY_FLAGS, *LEARN]) == 0
    return out


def test_training_raises_map_far_above_an_untrained_model(trained, coco, capsys):
    from reslab.detection.evaluate import evaluate
    from reslab.detection.data import eval_loader
    lines = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in lines if r["kind"] == "train"]
    ev = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in tr] == [50, 100, 150, 200, 250, 300] and tr[-1]["loss"] < tr[0]["loss"]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(tr[0])
    assert len(ev) == 1 and ev[0]["step"] == 300
    assert json.loads((trained / "config.json").read_text())["detector"]["head"] == "c4"

    capsys.readouterr()
    assert main(["detect", "eval", str(trained), "--data-dir", str(coco), "--json", "--workers", "0"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"map", "map50", "map75", "map_small", "map_medium", "map_large", "n_images"} <= set(m)
    assert m["n_images"] == 32 and m["step"] == 300 and m["head"] == "c4"
    assert m["map"] == pytest.approx(ev[0]["map"]) and m["map50"] == pytest.approx(ev[0]["map50"])
    print(f"\nlearned: mAP@[.5,.95] {m['map']:.3f}  mAP@.5 {m['map50']:.3f}")
    assert m["map50"] > 0.5 and m["map"] > 0.15

    torch.manual_seed(0)  # the same detector untrained scores about zero: the bar above is far from chance
    untrained = create_detector("resnet18", num_classes=4, frozen_bn=False, **TINY)
    val = CocoDetection(coco, "val2017", train=False)
    base = evaluate(untrained, eval_loader(val, 8, workers=0), val)
    assert base["map50"] < 0.05


def test_predict_draws_named_boxes_into_a_png(trained, coco, tmp_path, capsys):
    from PIL import Image
    image = coco / "val2017" / "0000.jpg"
    out = tmp_path / "boxes.png"
    capsys.readouterr()
    assert main(["detect", "predict", str(trained), str(image), "--out", str(out), "--threshold", "0.5",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    dets = res["detections"]
    assert dets and all(d["class"] in {"square", "disc", "triangle"} and d["score"] >= 0.5 for d in dets)
    det = load_detector(trained)
    assert not det.training and det.config.head == "c4" and det.reslab["step"] == 300
    assert det.reslab["categories"] == CATEGORIES
    drawn, src = Image.open(out), Image.open(image)
    assert drawn.format == "PNG" and drawn.size == src.size
    assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(src.convert("RGB")))


def _train_lines(run: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("loss") or k in ("step", "lr")} for r in lines
            if r["kind"] == "train"]


def test_resume_equals_uninterrupted(coco_small, tmp_path, capsys):
    recipe = {"iters": 5, "save_every": 2}
    train(_run(coco_small, tmp_path / "full", recipe=recipe))
    train(_run(coco_small, tmp_path / "part", recipe=recipe, stop_at=4))
    assert ckpt.load(tmp_path / "part")["loader"] == {"epoch": 1, "batch": 1}  # stopped inside epoch 2
    train(_run(coco_small, tmp_path / "part", recipe=recipe, resume=True))
    a, b = ckpt.load(tmp_path / "full"), ckpt.load(tmp_path / "part")
    assert a["step"] == b["step"] == 5 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moms = lambda ck: [s["momentum_buffer"] for s in ck["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moms(a), moms(b)))
    assert _train_lines(tmp_path / "full") == _train_lines(tmp_path / "part")

    # a conflicting resume, or a second run into the same folder, is a one-line error
    base = ["detect", "train", "--data-dir", str(coco_small), "--out", str(tmp_path / "part")]
    capsys.readouterr()
    assert main([*base, "--resume", "--arch", "resnet34"]) == 2
    err = capsys.readouterr().err
    assert "arch='resnet34' (the run has 'resnet18')" in err and err.strip().count("\n") == 0
    assert main([*base, "--resume", "--head", "fpn", "--min-size", "200"]) == 2
    assert "head='fpn'" in (err := capsys.readouterr().err) and "min_size=200" in err
    assert main(base) == 2 and "--resume" in capsys.readouterr().err


def test_a_resume_keeps_its_recipe_and_seed_and_extends_by_request(coco_small, tmp_path, capsys):
    """A resume that gives another lr, seed or length is refused (it trained on silently, a larger --iters
    moving the lr drop so the lr went back up 10x); --extend-to lengthens the run with the drop kept at its
    step; the logging fields are free; config.json keeps the request that started the run."""
    out = tmp_path / "r"
    train(_run(coco_small, out, recipe={"iters": 4, "lr_steps": [0.5], "save_every": 100}, seed=3))
    base = ["detect", "train", "--data-dir", str(coco_small), "--out", str(out), "--resume", "--workers", "0",
            "--quiet"]
    capsys.readouterr()
    for flags, said in ((["--lr", "0.5"], "--lr 0.5 (the run has 0.02)"), (["--seed", "7"], "--seed 7 (the run has 3)"),
                        (["--iters", "8"], "--iters 8 (the run has 4)")):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "--extend-to N lengthens the run" in err and "\n" not in err, err
    assert main([*base, "--extend-to", "3"]) == 2 and "shorter than" in capsys.readouterr().err
    assert main([*base, "--extend-to", "8", "--log-every", "2"]) == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if r["kind"] == "train"}
    assert lrs[2] == 0.02 and lrs[4] == pytest.approx(0.002) and lrs[6] == lrs[8] == pytest.approx(0.002)
    assert 5 not in lrs  # --log-every 2 took effect
    rec = json.loads((out / "config.json").read_text())
    assert rec["recipe"]["iters"] == 8 and rec["recipe"]["lr_steps"] == [0.25]
    assert rec["run"]["seed"] == 3 and rec["run"]["extend_to"] is None and rec["resumed_with"]["extend_to"] == 8
    assert main(["detect", "train", "--data-dir", str(coco_small), "--out", str(tmp_path / "new"),
                 "--extend-to", "8"]) == 2
    assert "needs a run to extend" in capsys.readouterr().err


def test_nonfinite_loss_stops_before_saving(coco_small, tmp_path, monkeypatch):
    """Step 4's loss is NaN: the check before step 4's save catches it (the log line would come at 5)."""
    from torchvision.models.detection import roi_heads
    real, calls = roi_heads.fastrcnn_loss, []

    def poisoned(*args):
        calls.append(1)
        cls, box = real(*args)
        return (cls * float("nan"), box) if len(calls) == 4 else (cls, box)

    monkeypatch.setattr(roi_heads, "fastrcnn_loss", poisoned)
    run = _run(coco_small, tmp_path / "nan", recipe={"iters": 8, "save_every": 2, "log_every": 5})
    with pytest.raises(ReslabError, match=r"between steps 3 and 4; .*last\.pt \(step 2\) is intact"):
        train(run)
    ck = ckpt.load(tmp_path / "nan")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------ bad input
def test_a_failing_evaluation_keeps_the_training(coco_small, tmp_path, monkeypatch):
    """The checkpoint is written before the evaluation: an evaluation that fails loses no step."""
    import reslab.detection.train as det_train

    def broken(*a, **k):
        raise ReslabError("pycocotools broke")
    monkeypatch.setattr(det_train, "evaluate", broken)
    with pytest.raises(ReslabError, match="pycocotools broke"):
        train(_run(coco_small, tmp_path / "r", recipe={"iters": 3, "save_every": 100}))
    assert ckpt.load(tmp_path / "r")["step"] == 3
    monkeypatch.undo()  # fixed: the resume runs the evaluation the failure left undone (it ended the run)
    final = train(_run(coco_small, tmp_path / "r", recipe={"iters": 3, "save_every": 100}, resume=True))
    assert final["step"] == 3 and ckpt.load(tmp_path / "r")["metrics"]["step"] == 3
    assert [m["step"] for m in read_metrics(tmp_path / "r") if m["kind"] == "eval"] == [3]
    assert train(_run(coco_small, tmp_path / "r", recipe={"iters": 3}, resume=True)) == final  # done: no rerun


def test_a_corrupt_training_image_saves_the_step_and_resumes_with_skip(coco_small, tmp_path, capsys):
    """A training image that cannot be decoded, met at step 3: the run saves step 2 before it stops (with
    --save-every 2000 every step since the start was lost), and resumes with --on-corrupt skip, which puts
    the next image in its place: bitwise the run that skipped from the start."""
    import shutil
    from reslab.detection.data import FlipSampler
    data = tmp_path / "coco"
    shutil.copytree(coco_small, data)
    ds = CocoDetection(data, "train2017", train=True)
    third_batch = [i for i, _ in FlipSampler(len(ds), seed=0)][4]
    bad = data / "train2017" / ds.images[third_batch]["file_name"]
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    args = ["detect", "train", "--data-dir", str(data), "--arch", "resnet18", "--width", "0.125", "--no-frozen-bn",
            "--min-size", "64", "--max-size", "96", "--batch-size", "2", "--lr", "0.02", "--iters", "5",
            "--save-every", "2000", "--workers", "0", "--quiet"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "now holds step 2, saved before that batch" in err and "\n" not in err, err
    assert ckpt.load(tmp_path / "r")["step"] == 2
    assert main([*args, "--out", str(tmp_path / "r"), "--resume", "--on-corrupt", "skip"]) == 0
    assert capsys.readouterr().err.count(f"skipping corrupt image: {bad}") == 1
    assert main([*args, "--out", str(tmp_path / "s"), "--on-corrupt", "skip"]) == 0
    a, b = ckpt.load(tmp_path / "r"), ckpt.load(tmp_path / "s")
    assert a["step"] == b["step"] == 5 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_kill_between_the_evaluation_save_and_its_log_line(coco_small, tmp_path, monkeypatch):
    """The evaluation is saved, then logged: killed in between, the resume writes the line back from the
    checkpoint and does not evaluate again (it logged a second line at the same step)."""
    import reslab.detection.train as det_train
    from reslab import logs
    real_write, real_eval = logs.MetricsLog.write, det_train.evaluate
    kill_on_eval_line(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_run(coco_small, tmp_path / "r", recipe={"iters": 3, "save_every": 100}))
    assert ckpt.load(tmp_path / "r")["metrics"]["step"] == 3
    monkeypatch.setattr(logs.MetricsLog, "write", real_write)
    calls = []
    monkeypatch.setattr(det_train, "evaluate", lambda *a, **k: calls.append(1) or real_eval(*a, **k))
    final = train(_run(coco_small, tmp_path / "r", recipe={"iters": 3}, resume=True))
    assert not calls and final["step"] == 3
    assert [m for m in read_metrics(tmp_path / "r") if m["kind"] == "eval"] == [final]


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reslab: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input_is_a_one_line_error(coco_small, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(empty), "--out", str(tmp_path / "r")],
                    "neither a COCO-format folder", "annotations/instances_<split>.json", "VOC2007/")
    (empty / "annotations").mkdir()
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(empty), "--out", str(tmp_path / "r")],
                    "instances_train2017.json not found", "annotations/")
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(coco_small), "--out", str(tmp_path / "r2"),
                             "--arch", "resnet56"], "CIFAR-family", "resnet101")
    with pytest.raises(ReslabError, match="ImageNet-family backbone"):
        create_detector("resnet20", num_classes=4)
    with pytest.raises(ReslabError, match="unknown model"):
        create_detector("resnet19", num_classes=4)
    _classifier_file(tmp_path / "cls.pt")
    _one_line_error(capsys, ["detect", "eval", str(tmp_path / "cls.pt"), "--data-dir", str(coco_small)],
                    "classification checkpoint")
    _one_line_error(capsys, ["detect", "eval", str(tmp_path / "nothing"), "--data-dir", str(coco_small)],
                    "no checkpoint")
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "train2017").mkdir()
    (bad / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(bad), "--out", str(tmp_path / "r3")],
                    "not a COCO instances file")
    gone = tmp_path / "gone"  # an image the annotations list is not on disk
    shutil.copytree(coco_small, gone)
    (gone / "train2017" / "0002.jpg").unlink()
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(gone), "--out", str(tmp_path / "r4")],
                    "1 of the 6 images", "0002.jpg")


def _edited(src: Path, dest: Path, split: str, edit) -> Path:
    """A copy of a COCO folder whose `split` annotations `edit(d)` has changed in place."""
    shutil.copytree(src, dest)
    f = dest / "annotations" / f"instances_{split}.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))
    return dest


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["annotations"][0].pop("category_id"), "annotation id 1 has no 'category_id'"),
    (lambda d: d["annotations"][0].pop("image_id"), "annotation id 1 has no 'image_id'"),
    (lambda d: d["images"][0].pop("file_name"), "image id 1 has no 'file_name'"),
    (lambda d: d["images"][0].update(id="1"), "image id 1 has a str 'id' (needs int)"),
    (lambda d: d.update(categories=["square", "disc"]), "category #0 is a str, not an object"),
    (lambda d: d.update(annotations=None), "'annotations' must be a list, got NoneType"),
    (lambda d: d["annotations"][0].update(image_id=999), "refer to an image_id the file does not list (999)"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(0, float("nan")),
     "instances_train2017.json: annotation 1 of image 1: 'bbox' has a non-finite value"),
])
def test_a_malformed_annotation_file_is_named_before_training(coco_small, tmp_path, edit, needle):
    """Checked when the data is read, each with what is wrong where: found later they were KeyErrors and
    TypeErrors, an annotation of an unlisted image vanished, and a NaN box was blamed on the learning rate."""
    bad = _edited(coco_small, tmp_path / "bad", "train2017", edit)
    with pytest.raises(ReslabError, match=re.escape(needle)):
        CocoDetection(bad, "train2017", train=True)


def test_what_evaluation_needs_is_checked_before_training(coco_small, tmp_path, capsys):
    """A validation file without 'area' was found by COCOeval after the whole run: now when the run starts."""
    bad = _edited(coco_small, tmp_path / "bad", "val2017", lambda d: d["annotations"][0].pop("area"))
    CocoDetection(bad, "val2017", train=True)  # training does not read it
    _one_line_error(capsys, ["detect", "train", "--data-dir", str(bad), "--out", str(tmp_path / "r"), *TINY_FLAGS,
                             "--iters", "2"], "lack 'area' or 'iscrowd'")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_split_without_boxes_has_no_map(trained, coco_small, tmp_path, capsys):
    """COCOeval has no mAP for images without a ground-truth box: reported as n/a, not a TypeError."""
    empty = _edited(coco_small, tmp_path / "empty", "val2017", lambda d: d.update(annotations=[]))
    capsys.readouterr()
    assert main(["detect", "eval", str(trained), "--data-dir", str(empty), "--workers", "0"]) == 0
    assert "mAP@[.5,.95] n/a" in capsys.readouterr().out


def test_predict_turns_photos_upright_and_names_an_image_it_cannot_scale(tmp_path):
    """A phone photo stored sideways is turned as its EXIF says before detection (training reads files as
    stored: COCO's boxes are on those pixels); an image too elongated for the detector's sizes is a one-line
    error, not torchvision's "Input and output sizes should be greater than 0"."""
    from PIL import Image
    from reslab.detection.data import read_rgb
    from reslab.detection.draw import detect
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(tmp_path / "side.jpg", exif=exif)
    assert read_rgb(tmp_path / "side.jpg").shape == (3, 20, 40)
    assert read_rgb(tmp_path / "side.jpg", upright=True).shape == (3, 40, 20)
    Image.fromarray(np.full((20, 40), 40000, np.uint16)).save(tmp_path / "deep.png")  # scaled, not clipped at 255
    assert read_rgb(tmp_path / "deep.png").unique().tolist() == [40000 >> 8]
    with pytest.raises(ReslabError, match="nothing.jpg: no such image file"):
        read_rgb(tmp_path / "nothing.jpg")
    with pytest.raises(ReslabError, match="a folder, not an image file"):
        read_rgb(tmp_path)
    model = create_detector("resnet18", num_classes=4, **{**TINY, "min_size": 128, "max_size": 192}).eval()
    with pytest.raises(ReslabError, match="a 4000x20 image is too elongated"):
        detect(model, torch.zeros(3, 20, 4000, dtype=torch.uint8), 0.5, Categories.from_coco(CATEGORIES))


def test_missing_pycocotools_says_what_to_install(monkeypatch, coco_small):
    import sys
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ReslabError, match=r"pip install 'reslab\[detection\]'"):
        require_pycocotools()


def test_no_detections_score_zero(coco_small):
    ann = coco_small / "annotations" / "instances_val2017.json"
    m = coco_metrics(ann, [], [1, 2, 3, 4])
    assert m["map"] == 0.0 and m["map50"] == 0.0 and m["n_images"] == 4 and m["map_large"] is None


def test_data_with_other_categories_says_which_differs(coco_small):
    """The same number of categories under other names was "(3 vs 3)": now the first that differs."""
    renamed = Categories.from_coco([{**c, "name": "kite"} if c["id"] == CATEGORIES[1]["id"] else c for c in CATEGORIES])
    with pytest.raises(ReslabError, match=f"category id {CATEGORIES[1]['id']} is '{CATEGORIES[1]['name']}' here "
                                          "and 'kite' in the detector"):
        CocoDetection(coco_small, "val2017", train=False, categories=renamed)


# ------------------------------------------------------------------ PASCAL VOC (the paper's Table 7)
def voc_from_coco(coco_root: Path, split: str, voc_root: Path, year: str, image_set: str,
                  difficult_first: bool = False) -> Path:
    """The shapes of a COCO split written in VOC's format: one XML per image (pixels numbered from 1, corners
    included: xmin = x + 1, xmax = x + w), JPEGImages/, ImageSets/Main/<image_set>.txt. `difficult_first`
    marks the first object of the first image difficult."""
    d = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in d["categories"]}
    folder = voc_root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for n, im in enumerate(d["images"]):
        stem = f"{year}_{image_set}_{Path(im['file_name']).stem}"  # unique within the year, as VOC's ids are
        shutil.copy(coco_root / split / im["file_name"], folder / "JPEGImages" / f"{stem}.jpg")
        objs = [a for a in d["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        xml = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>{int(difficult_first and n == 0 and k == 0)}"
            f"</difficult><bndbox><xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
            for k, a in enumerate(objs))
        (folder / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{xml}</annotation>")
        stems.append(stem)
    (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(s + "\n" for s in stems))
    return voc_root


@pytest.fixture(scope="module")
def voc(coco, tmp_path_factory) -> Path:
    """The shapes set as a VOCdevkit: VOC2007 trainval (the COCO training split, its first object difficult)
    and test (the COCO validation split)."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    voc_from_coco(coco, "train2017", root, "2007", "trainval", difficult_first=True)
    return voc_from_coco(coco, "val2017", root, "2007", "test").parent


def _det(image_id, boxes, scores, label=1):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores), "labels": torch.full((len(scores),), label)}


def _gt(boxes, labels, difficult=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "difficult": torch.tensor(difficult or [False] * len(labels))}


def test_voc_average_precision_by_hand():
    """The devkit's rules on cases worked out by hand: a second detection of a found box is a false positive,
    a detection of a difficult box counts for nothing, IoU must exceed 0.5, AP is 11-point (VOC 2007) or the
    area under the interpolated curve, and a class with nothing to find has no AP."""
    from reslab.detection.voc import voc_ap50
    A, B, D, far = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [80, 80, 90, 90]
    gt = {0: _gt([A, B, A], [1, 1, 2]), 1: _gt([A, A], [1, 2], [True, False]), 2: _gt([D], [1])}
    dets = [_det(0, [A, [0, 0, 10, 9]], [0.9, 0.8]),  # class 1, image 0: found, then the same box again (IoU .9)
            _det(1, [A], [0.7]),                      # class 1, image 1: the difficult box, ignored
            _det(2, [far], [0.6]),                    # class 1, image 2: nothing there
            _det(0, [B], [0.5]),                      # class 1, image 0: found
            _det(0, [A], [0.9], label=2),             # class 2: found, a miss, found
            _det(1, [far, A], [0.8, 0.7], label=2),
            _det(5, [A], [0.99])]                     # an image not evaluated: ignored
    # class 1: TP FP FP TP of 3 objects -> recall 1/3 1/3 1/3 2/3, precision 1 1/2 1/3 1/2
    #   area: 1/3 x 1 + 1/3 x 1/2 = 1/2;  11-point: (4 x 1 + 3 x 1/2) / 11 = 1/2
    # class 2: TP FP TP of 2 -> recall 1/2 1/2 1, precision 1 1/2 2/3
    #   area: 1/2 x 1 + 1/2 x 2/3 = 5/6;  11-point: (6 x 1 + 5 x 2/3) / 11 = 28/33
    assert voc_ap50(dets, gt, 3, eleven_point=False) == pytest.approx([0.5, 5 / 6, None]) or False
    ap = voc_ap50(dets, gt, 3, eleven_point=True)
    assert ap[0] == pytest.approx(0.5) and ap[1] == pytest.approx(28 / 33) and ap[2] is None
    half = [0, 0, 10, 5]  # IoU exactly 0.5 with A: not a match
    assert voc_ap50([_det(0, [half], [1.0])], {0: _gt([A], [1])}, 1, False) == [0.0]
    assert voc_ap50([], {0: _gt([A], [1])}, 1, True) == [0.0]


def test_voc_folder_targets_splits_and_errors(voc, coco, tmp_path):
    from reslab.detection.formats import default_splits, format_of, open_split
    from reslab.detection.voc import VocDetection
    assert format_of(voc) == "voc" and format_of(voc / "VOCdevkit") == "voc" and format_of(coco) == "coco"
    assert default_splits(voc) == ("2007-trainval", "2007-test")
    tr, ref = open_split(voc, "2007-trainval", train=True), CocoDetection(coco, "train2017", train=True)
    assert tr.categories.names == ("disc", "square", "triangle")  # sorted names, labels 1..3
    # the same boxes as COCO's, on the same pixels; the first image's difficult object is left out of training
    # (and the image with it, if that was its only object)
    coco_index = {Path(im["file_name"]).stem: k for k, im in enumerate(ref.images)}
    for k, im in enumerate(tr.images):
        _, t = tr[k]
        _, r = ref[coco_index[im["name"].rsplit("_", 1)[1]]]
        names = [ref.categories.names[i - 1] for i in r["labels"]]
        if im["name"] == "2007_trainval_0000":
            r["boxes"], names = r["boxes"][1:], names[1:]
        assert torch.equal(t["boxes"], r["boxes"]) and [tr.categories.names[i - 1] for i in t["labels"]] == names
    first_ref = ref.targets[ref.images[0]["id"]]
    assert ref.images[0]["file_name"] == "0000.jpg" and len(tr) == len(ref) - (len(first_ref["boxes"]) == 1)
    val = VocDetection(voc, "2007-test", train=False, categories=tr.categories)
    assert len(val) == 32 and val.eleven_point and not val.targets[0]["difficult"].any()
    # the VOC2007 folder given itself: its sets by name, still VOC 2007 (11-point AP)
    year = voc / "VOCdevkit" / "VOC2007"
    assert format_of(year) == "voc" and default_splits(year) == ("trainval", "test")
    assert VocDetection(year, "test", train=False, categories=tr.categories).eleven_point
    hard = VocDetection(voc, "2007-trainval", train=False, categories=tr.categories)
    assert hard.targets[0]["difficult"].tolist()[0] and len(hard.targets[0]["boxes"]) == len(first_ref["boxes"])
    # 07+12: a second year joins the default training split; a non-2007 part makes AP the area metric
    voc_from_coco(coco, "val2017", voc / "VOCdevkit", "2012", "trainval")
    try:
        assert default_splits(voc) == ("2007-trainval+2012-trainval", "2007-test")
        both = open_split(voc, "2007-trainval+2012-trainval", train=True)
        assert len(both) == len(tr) + 32
        assert not VocDetection(voc, "2012-trainval", train=False, categories=tr.categories).eleven_point
    finally:
        shutil.rmtree(voc / "VOCdevkit" / "VOC2012")
    for split, needle in (("test", "a VOC split is YEAR-SET"), ("2007-val", "ImageSets/Main/val.txt not found")):
        with pytest.raises(ReslabError, match=needle):
            VocDetection(voc, split, train=True)
    with pytest.raises(ReslabError, match="class 'disc' is not among the detector's 2 classes"):
        VocDetection(voc, "2007-test", train=False, categories=Categories((1, 2), ("square", "triangle")))
    bad = tmp_path / "bad"
    shutil.copytree(voc, bad)
    xml = bad / "VOCdevkit" / "VOC2007" / "Annotations" / "2007_test_0003.xml"
    xml.write_text(xml.read_text().replace("<xmax>", "<xmax>x", 1))
    with pytest.raises(ReslabError, match="2007_test_0003.xml: object #1 needs"):
        VocDetection(bad, "2007-test", train=False)
    xml.write_text("<annotation><object>")
    with pytest.raises(ReslabError, match="2007_test_0003.xml: not a readable VOC annotation"):
        VocDetection(bad, "2007-test", train=False)


def test_voc_ap_agrees_with_cocos_map50_on_the_same_detector(trained, voc, coco, capsys):
    """The COCO-trained detector scored on the same validation images in both formats: VOC's AP at IoU > .5
    (the area metric) and COCOeval's mAP@.5 (101-point interpolation) measure the same matches."""
    from reslab.detection.evaluate import evaluate
    from reslab.detection.data import eval_loader
    from reslab.detection.voc import VocDetection
    model = load_detector(trained)
    cats = Categories.from_coco(model.reslab["categories"])
    ds = VocDetection(voc, "2007-test", train=False, categories=cats)
    ds.eleven_point = False
    m = evaluate(model, eval_loader(ds, 8, workers=0), ds)
    assert main(["detect", "eval", str(trained), "--data-dir", str(coco), "--json", "--workers", "0"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert m["protocol"] == "voc" and set(m["ap50"]) == {"square", "disc", "triangle"}
    assert m["map50"] == pytest.approx(c["map50"], abs=0.01) and m["n_images"] == c["n_images"] == 32
    assert main(["detect", "eval", str(trained), "--data-dir", str(voc), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "on 32 2007-test images: mAP@.5" in out and "VOC, 11-point AP" in out
    with capsys.disabled():
        print(f"\nVOC area AP50 {m['map50']:.4f}, COCO mAP@.5 {c['map50']:.4f}")


def test_detect_train_on_a_voc_folder_and_resume_with_its_splits(coco_small, tmp_path, capsys):
    root = tmp_path / "VOCdevkit"
    voc_from_coco(coco_small, "train2017", root, "2007", "train")
    voc_from_coco(coco_small, "val2017", root, "2007", "val")
    run = tmp_path / "run"
    args = ["detect", "train", "--data-dir", str(tmp_path), "--out", str(run), *TINY_FLAGS, "--no-frozen-bn",
            "--iters", "4", "--batch-size", "2", "--lr", "0.02", "--log-every", "2", "--save-every", "2"]
    assert main([*args, "--train-split", "2007-train", "--val-split", "2007-val", "--stop-at", "2"]) == 0
    assert main([*args, "--resume"]) == 0  # the splits the run recorded, not the defaults (which do not exist)
    out = capsys.readouterr().out
    assert "mAP@.5" in out and "VOC, 11-point AP" in out and "on 4 validation images" in out
    ev = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [4] and ev[0]["protocol"] == "voc" and ev[0]["ap_metric"] == "11-point"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["train_split"] == "2007-train" and cfg["resumed_with"]["val_split"] == "2007-val"
    # detect eval without --split: the run's own validation split (the format's default, 2007-test, is absent)
    assert main(["detect", "eval", str(run), "--data-dir", str(tmp_path), "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "2007-val"
    assert [c["name"] for c in cfg["categories"]] == ["disc", "square", "triangle"]
