"""Image-folder pipelines: the two decoding paths crop the same boxes, the boxes have the paper's
distribution, a stream is exact wherever it resumes and whatever its workers, and a ResNet-18 learns from
real photographs (the CIFAR-10 JPEG tree in ../shared)."""
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from reslab.data import folder as fold
from reslab.data.augment import Augment, Finish, crop_resize
from reslab.data.build import FolderStream
from reslab.errors import ReslabError

from conftest import make_jpeg_folder

JPEG_PACK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "cifar-10-jpeg.tar.xz"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def smooth_jpegs(root: Path, n=6, size=(75, 100)):
    """Smooth photographs-like images (gradients and blobs), where resampling filters agree closely."""
    from PIL import Image
    yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.stack([128 + 100 * np.sin(xx / (9 + i) + c) * np.cos(yy / (13 + c)) for c in range(3)], -1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=95)
    (root / "val").mkdir(exist_ok=True)
    (root / "val" / "c0").symlink_to(root / "train" / "c0")
    return root


def stream(root, *, encoded, workers=0, seed=0, batch=4, aug=Augment.for_size("scale", 32), norm=None):
    ds = fold.ImageFolderSplit(root, "train", augment=aug, encoded=encoded)
    norm = norm or fold.imagenet_normalizer()
    return FolderStream(fold.make_loader(ds, batch, train=True, workers=workers, seed=seed),
                        fold.Finisher(ds, "cpu", norm))


def test_both_decoding_paths_give_the_same_batches(tmp_path):
    """Decoding in the workers (cpu) and decoding the batch on the device (here the CPU, batched, as on a
    GPU) crop the same boxes of the same images: the batches are bitwise equal on the CPU."""
    root = make_jpeg_folder(tmp_path / "imgs", per_class=5, size=(40, 56))
    for aug in (Augment.for_size("scale", 24), Augment.for_size("rrc", 24)):
        a = [(x, y) for x, y in stream(root, encoded=False, aug=aug, batch=3)]
        b = [(x, y) for x, y in stream(root, encoded=True, aug=aug, batch=3)]
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    norm = fold.imagenet_normalizer()
    for view in fold.VIEWS:
        t = fold.eval_transform(norm, view, size=24)
        cpu = fold.ImageFolderSplit(root, "val", t)
        dev = fold.ImageFolderSplit(root, "val", encoded=True)
        la = FolderStream(fold.make_loader(cpu, 4, train=False, workers=0, multiscale=view == "multiscale"),
                          fold.Finisher(cpu, "cpu", norm, t))
        lb = FolderStream(fold.make_loader(dev, 4, train=False, workers=0, multiscale=view == "multiscale"),
                          fold.Finisher(dev, "cpu", norm, t))
        for (xa, ya), (xb, yb) in zip(la, lb, strict=True):
            assert torch.equal(ya, yb)
            flat = lambda x: [v for views in x for v in views] if isinstance(x, list) else [x]  # noqa: E731
            assert all(torch.equal(p, q) for p, q in zip(flat(xa), flat(xb), strict=True))


def test_datasets_pickle_for_spawned_workers(tmp_path):
    """Where workers are spawned (macOS, Windows; forkserver on Python 3.14) the dataset is pickled into
    each: it kept torchvision's ImageFolder with two lambdas, and every folder run with workers failed."""
    import pickle
    root = make_jpeg_folder(tmp_path / "imgs", per_class=2)
    norm = fold.imagenet_normalizer()
    for ds in (fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24)),
               fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24), encoded=True),
               fold.ImageFolderSplit(root, "val", fold.eval_transform(norm, "10crop", size=24, resize=32))):
        again = pickle.loads(pickle.dumps(ds))
        key = (1, 7) if ds.augment else 1
        assert same(ds[key], again[key])


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_a_stream_is_exact_whatever_its_workers_and_wherever_it_resumes(tmp_path):
    root = make_jpeg_folder(tmp_path / "imgs", per_class=6, size=(40, 56))
    def two_epochs(s):
        return [x for x, _ in s] + [x for x, _ in s]
    want = two_epochs(stream(root, encoded=False, workers=0))
    got2 = two_epochs(stream(root, encoded=False, workers=2))
    assert all(torch.equal(a, b) for a, b in zip(want, got2, strict=True))
    s = stream(root, encoded=True, workers=1)
    it = iter(s)
    head = [next(it)[0]]                      # one batch of epoch 0, then "interrupted"
    r = stream(root, encoded=True, workers=2)
    r.load_state_dict(s.state_dict())
    rest = two_epochs(r)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, want, strict=True))
    assert not torch.equal(want[0], want[len(want) // 2])  # epochs draw new crops
    # rank 1 of 2 crops its images exactly as one process does: each image's draw is its own (seed, epoch, index)
    from reslab.data.resident import mix_seed
    ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 32))
    ld = fold.make_loader(ds, 2, train=True, workers=0, seed=3, rank=1, world_size=2)
    ld.sampler.set_epoch(1)
    for crops, _, (boxes, _, _), indices in ld:
        for c, b, i in zip(crops, boxes, indices):
            alone, _, (box, _, _), _ = ds[i, mix_seed(3, 1, i)]
            assert torch.equal(c, alone) and torch.equal(b, box)


def test_scale_boxes_have_the_papers_distribution():
    """Shorter side s ~ U{256..480}, crop 224 anywhere in the resized image, flip 1/2, lighting N(0, 0.1):
    the box's side in the original is 224*375/s, its position uniform; 4,000 draws of a 375x500 image."""
    aug = Augment()
    h, w = 375, 500
    draws = [aug.draw(h, w, seed) for seed in range(4000)]
    boxes = torch.tensor([b for b, _, _ in draws])
    side_h = boxes[:, 3] - boxes[:, 1]
    s = 224 * h / side_h                                              # the shorter side each box implies
    assert s.min() >= 256 - 1e-3 and s.max() <= 480 + 1e-3
    want = 224 * h * sum(1 / k for k in range(256, 481)) / 225      # E[224*375/s] over s uniform on 256..480
    assert abs(float(side_h.mean()) - want) < 1.0
    assert abs(float(s.mean()) - 368) < 3                           # (256+480)/2, sd/sqrt(n) ~ 1
    # the box keeps the image's aspect (a square crop of the resized image) and stays inside the image
    ratio = (boxes[:, 2] - boxes[:, 0]) / side_h
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.01)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
    # position: uniform over the free range, so the box centre's mean is the image centre
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    assert abs(float(cx.mean()) - w / 2) < 3
    flips = torch.tensor([f for _, f, _ in draws], dtype=torch.float)
    alphas = torch.tensor([a for _, _, a in draws])
    assert abs(float(flips.mean()) - 0.5) < 0.03 and abs(float(alphas.std()) - 0.1) < 0.005
    # RandomResizedCrop: torchvision's sampler, area 8-100%, aspect 3/4-4/3 (its fallback aside)
    rrc = torch.tensor([Augment.for_size("rrc", 224).draw(h, w, seed)[0] for seed in range(500)])
    bw, bh = rrc[:, 2] - rrc[:, 0], rrc[:, 3] - rrc[:, 1]
    area = bw * bh / (h * w)
    assert area.min() >= 0.079 and area.max() <= 1 and ((bw / bh) > 0.74).all() and ((bw / bh) < 1.35).all()
    # a function of the seed only, and different seeds differ
    assert aug.draw(h, w, 7) == aug.draw(h, w, 7) and aug.draw(h, w, 7) != aug.draw(h, w, 8)


def test_a_box_crop_is_the_papers_resize_then_crop(tmp_path):
    """Cropping the box from the original and resizing it to 224 takes the pixels that resizing the whole
    image to shorter side s and cropping 224 at (top, left) takes; only the filter and the box's rounding to
    whole pixels on the CPU differ. On a smooth image (up to ~11 levels per pixel) the two agree to a few
    levels, and a box misplaced by 6 pixels is several times further off."""
    root = smooth_jpegs(tmp_path / "imgs", n=1, size=(150, 200))
    img = fold.decode(str(next((root / "train").rglob("*.jpg"))))
    aug = Augment.for_size("scale", 56)
    for seed in range(5):
        box, _, _ = aug.draw(150, 200, seed)
        side = aug.size * 150 / (box[3] - box[1])
        s = round(side)
        rh, rw = s, int(s * 200 / 150)
        top, left = round(box[1] * rh / 150), round(box[0] * rw / 200)
        paper = v2.functional.crop(v2.functional.resize(img, [rh, rw], antialias=True), top, left, 56, 56)
        ours = crop_resize([img], torch.tensor([box]), 56)[0]
        diff = (paper.float() - ours.float()).abs()
        shifted = crop_resize([img], torch.tensor([[box[0] + 6, box[1], box[2] + 6, box[3]]]), 56)[0]
        assert diff.mean() < 3, (seed, float(diff.mean()))
        assert (paper.float() - shifted.float()).abs().mean() > 3 * diff.mean()


def test_the_batched_crop_path_matches_the_per_image_one():
    """The GPU's path (RoIAlign, images grouped by shape) run on the CPU: on smooth images of two sizes,
    interleaved so the write-back order matters, every crop is within a level or two of the CPU path's."""
    yy, xx = torch.meshgrid(torch.arange(400.0), torch.arange(500.0), indexing="ij")

    def smooth(h, w, k):
        return torch.stack([128 + 100 * torch.sin(xx[:h, :w] / (9 + k) + c) * torch.cos(yy[:h, :w] / (13 + c))
                            for c in range(3)]).round().clamp(0, 255).to(torch.uint8)
    images = [smooth(*hw, k) for k, hw in enumerate([(300, 400), (375, 500), (300, 400), (375, 500)])]
    boxes = torch.tensor([[10.0, 20.0, 250.0, 260.0], [0.0, 0.0, 375.0, 375.0],
                          [100.0, 40.0, 340.0, 280.0], [125.0, 0.0, 500.0, 375.0]])
    a = crop_resize(images, boxes, 56, batched=False).float()
    b = crop_resize(images, boxes, 56, batched=True).float()
    per_image = (a - b).abs().mean((1, 2, 3))
    assert per_image.max() < 2.0, per_image    # a crop written back to the wrong slot differs by ~40 levels
    assert (a[0] - b[2]).abs().mean() > 10


def test_finish_flips_lights_and_normalises_per_image():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    norm = fold.imagenet_normalizer()
    alpha = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.05]])
    out = Finish(norm, "cpu")(x, torch.tensor([True, False]), alpha)
    ref0 = (x[0].flip(-1).float() / 255 - norm.mean) / norm.std
    assert torch.allclose(out[0], ref0, atol=1e-6)
    from reslab.data.augment import PCA_EIGVAL, PCA_EIGVEC
    rgb = PCA_EIGVEC @ (alpha[1] * PCA_EIGVAL)
    ref1 = (x[1].float() / 255 + rgb.view(3, 1, 1) - norm.mean) / norm.std
    assert torch.allclose(out[1], ref1, atol=1e-6)


def test_corrupt_files_on_the_device_path_stop_with_their_name_or_are_skipped(tmp_path, capsys):
    root = make_jpeg_folder(tmp_path / "imgs", per_class=4, size=(40, 56))
    bad = root / "train" / "cat" / "1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    with pytest.raises(ReslabError, match="1.JPEG"):
        list(stream(root, encoded=True, batch=2))
    ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24), encoded=True, on_corrupt="skip")
    s = FolderStream(fold.make_loader(ds, 2, train=True, workers=0), fold.Finisher(ds, "cpu", fold.imagenet_normalizer()))
    assert sum(len(y) for _, y in s) == 8 and ds.skipped == [str(bad)]
    assert "1.JPEG" in capsys.readouterr().err
    # a PNG among the JPEGs is decoded in the worker and cropped like the rest
    from PIL import Image
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(bad.with_suffix(".png"))
    bad.unlink()
    assert sum(len(y) for _, y in stream(root, encoded=True, batch=2)) == 8
    # a 16-bit PNG is scaled to 8 bits, not wrapped around
    deep = root / "train" / "dog" / "deep.png"
    Image.fromarray(np.full((40, 56), 40000, np.uint16)).save(deep)
    img = fold.decode(str(deep))
    assert img.dtype == torch.uint8 and int(img.float().mean().round()) == round(40000 / 257)


@cuda
def test_corrupt_and_cmyk_jpegs_on_the_gpu_decoder():
    """The device-decode path with odd files: a file that is not a JPEG is caught when its header is read
    (in the loader, before nvJPEG) and skipped under on_corrupt="skip" (stops with its name under "stop");
    nvJPEG may refuse a CMYK JPEG, and the batch then falls back to decoding image by image. Both batches
    come out alike on the CPU and the GPU: the same labels, and pixels within the resampling filters'
    difference (test_the_gpu_path_matches_the_cpu_path)."""
    import tempfile
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp) / "imgs", per_class=4, size=(40, 56))
        bad = root / "train" / "cat" / "1.JPEG"
        bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
        Image.new("CMYK", (56, 40), (0, 200, 200, 0)).save(root / "train" / "dog" / "2.JPEG", quality=95)
        with pytest.raises(ReslabError, match="1.JPEG"):
            ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24), encoded=True)
            list(FolderStream(fold.make_loader(ds, 4, train=True, workers=0),
                              fold.Finisher(ds, "cuda", fold.imagenet_normalizer())))
        outs = {}
        for device in ("cpu", "cuda"):
            ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24), encoded=True,
                                       on_corrupt="skip")
            s = FolderStream(fold.make_loader(ds, 4, train=True, workers=0),
                             fold.Finisher(ds, device, fold.imagenet_normalizer()))
            outs[device] = [(x.cpu(), y.cpu()) for x, y in s]
            assert sum(len(y) for _, y in outs[device]) == 8 and ds.skipped == [str(bad)]
        std = fold.imagenet_normalizer().std.view(1, 3, 1, 1)
        for (xa, ya), (xb, yb) in zip(outs["cpu"], outs["cuda"], strict=True):
            levels = (xa - xb).abs() * std * 255
            assert torch.equal(ya, yb) and torch.isfinite(xb).all() and levels.mean() < 3.0, levels.mean()


@cuda
def test_the_gpu_path_matches_the_cpu_path(monkeypatch):
    """The crops, flips and lighting are the same on both paths. Against a CPU reference that resamples as
    the GPU does (RoIAlign on the exact box), only the decoders differ (nvJPEG's pixels vs libjpeg's): a
    level or so. Against the CPU's own path (a resize of the box rounded to whole pixels) the filters differ
    as well: about 2 levels on average, up to 9 (measured on the CPU, emulating the GPU's filter, before this
    test ever ran on a GPU). The evaluation views agree within float tolerance."""
    import functools
    import tempfile
    from reslab.data.augment import crop_resize
    with tempfile.TemporaryDirectory() as tmp:
        root = smooth_jpegs(Path(tmp), n=8, size=(300, 400))
        aug = Augment.for_size("scale", 224)
        norm = fold.imagenet_normalizer()

        def device_stream(device):
            ds = fold.ImageFolderSplit(root, "train", augment=aug, encoded=True)
            return FolderStream(fold.make_loader(ds, 4, train=True, workers=0), fold.Finisher(ds, device, norm))

        def levels(xa, xb):
            return (xa - xb.cpu()).abs() * norm.std.view(1, 3, 1, 1) * 255

        gpu = list(device_stream("cuda"))
        for (xa, _), (xb, _) in zip(stream(root, encoded=False, aug=aug, norm=norm), gpu, strict=True):
            d = levels(xa, xb)
            assert d.mean() < 3.0 and d.max() <= 12, (d.mean(), d.max())
        with monkeypatch.context() as m:
            m.setattr(fold, "crop_resize", functools.partial(crop_resize, batched=True))
            same_filter = list(device_stream("cpu"))
        for (xa, _), (xb, _) in zip(same_filter, gpu, strict=True):
            d = levels(xa, xb)
            assert d.mean() < 1.0 and d.max() <= 8, (d.mean(), d.max())
        for view in fold.VIEWS:
            t = fold.eval_transform(norm, view)
            ds = fold.ImageFolderSplit(root, "val", encoded=True)
            imgs = [fold.decode(p) for p, _ in ds.samples]
            for img in imgs:
                a, b = t(img), t(img.cuda())
                pairs = zip(a, b) if isinstance(a, list) else [(a, b)]
                assert all(torch.allclose(p, q.cpu(), atol=2e-2) for p, q in pairs)


def extract_cifar_jpegs(dest: Path, classes=("airplane", "frog", "truck"), train=200, test=60) -> Path:
    """A few classes of the CIFAR-10 JPEG tree (real 32x32 photographs) out of the shared pack."""
    keep = {(split, c): n for c in classes for split, n in (("train", train), ("test", test))}
    with tarfile.open(JPEG_PACK) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and keep.get((parts[0], parts[1]), 0) > 0:
                keep[parts[0], parts[1]] -= 1
                tar.extract(m, dest, filter="data")
    return dest


@pytest.mark.skipif(not JPEG_PACK.exists(), reason="needs ../shared/datasets/cifar10-jpeg")
def test_resnet18_learns_from_real_photographs(tmp_path):
    """The whole folder pipeline on real JPEGs: 600 CIFAR-10 photographs of three classes, upscaled by the
    scale augmentation to 32x32 crops of boxes 15-28 px wide, through both decoding paths; a ResNet-18
    (ImageNet stem) trained for 200 steps must beat chance (66.7% error) clearly on 180 held-out photos."""
    from reslab.cli import main
    root = extract_cifar_jpegs(tmp_path / "c10")
    out = tmp_path / "run"
    rc = main(["train", "--arch", "resnet18", "--data", "folder", "--data-dir", str(root), "--recipe",
               "imagenet-paper", "--crop-size", "32", "--batch-size", "32", "--iters", "200", "--schedule", "step",
               "--milestones", "150", "--lr", "0.05", "--eval-every", "100", "--workers", "1", "--decode", "device",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, final = [m for m in evals if m["kind"] == "eval"]
    assert final["n"] == 180 and final["top1_err"] < 0.45, final    # chance is 0.667
    assert final["loss"] < first["loss"] and math.isfinite(final["loss"])
    # the checkpoint's users see its crop size: 10-crop evaluation at 37/32, predictions at the same view
    from reslab.predict import evaluate_checkpoint, predict
    ten = evaluate_checkpoint(out, view="10crop", workers=0, decode="cpu")
    assert ten["n"] == 180 and ten["top1_err"] < 0.45, ten
    frogs = predict(out, [root / "test" / "frog"], top=1)
    assert len(frogs) == 60 and sum(r["top"][0]["class"] == "frog" for r in frogs) > 30


@cuda
def test_a_graphed_folder_step_follows_the_eager_one(tmp_path, monkeypatch):
    """--graphs on image folders: each batch is copied into the graph's input buffers (GivenBatch). Over 20
    steps in fp32 (no TF32 convolutions) the losses follow the eager run's to rounding."""
    from reslab.cli import main
    from reslab.logs import read_metrics
    from reslab.step import GraphedStep
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    captures = []
    capture = GraphedStep._capture
    monkeypatch.setattr(GraphedStep, "_capture", lambda self: (captures.append(1), capture(self))[1])
    root = smooth_jpegs(tmp_path / "img", n=16, size=(60, 80))
    losses = {}
    for flag in ("--no-graphs", "--graphs"):
        out = tmp_path / flag
        assert main(["train", "--arch", "resnet18", "--data", "folder", "--data-dir", str(root), "--recipe",
                     "imagenet-paper", "--crop-size", "32", "--batch-size", "8", "--iters", "20", "--log-every", "1",
                     "--eval-every", "20", "--workers", "0", "--device", "cuda", "--precision", "fp32", flag,
                     "--out", str(out), "--no-progress"]) == 0
        losses[flag] = [m["loss"] for m in read_metrics(out) if m["kind"] == "train"]
        assert len(captures) == (flag == "--graphs")  # the graphed run really replayed a captured step
    assert losses["--graphs"][:5] == pytest.approx(losses["--no-graphs"][:5], rel=1e-4)
    assert losses["--graphs"] == pytest.approx(losses["--no-graphs"], rel=5e-2)


def test_a_split_without_one_class_keeps_the_training_labels(tmp_path, capsys):
    """val/ lacking `cat` must not shift `dog` and `ship` down one label; a val/ class the training split
    lacks, a resumed run or a checkpoint evaluated on other classes are one-line errors."""
    import shutil
    from reslab.cli import main
    from reslab.data import build as data_build
    root = make_jpeg_folder(tmp_path / "imgs", classes=("cat", "dog", "ship"), per_class=2, size=(40, 56))
    shutil.rmtree(root / "val" / "cat")
    # files ImageFolder leaves out for their suffix are counted aloud (a .jfif is a JPEG); hidden ones are not data
    shutil.copy(root / "val" / "dog" / "0.JPEG", root / "val" / "dog" / "9.jfif")
    (root / "val" / "dog" / "notes.txt").write_text("x")
    (root / "val" / "dog" / ".DS_Store").write_text("x")
    capsys.readouterr()
    data = data_build.build("folder", root, batch_size=2, device="cpu", workers=0, normalization="channel",
                            augment=Augment.for_size("scale", 32))
    assert f"2 file(s) in {root / 'val'} left out for their suffix (.jfif, .txt;" in capsys.readouterr().err
    assert data.classes == ["cat", "dog", "ship"]
    assert sorted(int(t) for _, y in data.eval for t in y) == [1, 1, 2, 2]  # dog, ship: their training labels
    capsys.readouterr()
    assert main(["data", "info", "--data", "folder", "--data-dir", str(root), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["test_per_class"] == [0, 2, 2] and d["mean_pixel_images"] == 6  # cat: none in val/
    assert d["eval_split"] == "val"
    assert main(["data", "info", "--data", "folder", "--data-dir", str(root)]) == 0
    assert "  val 4  classes 3  first image (3, " in capsys.readouterr().out  # not "test", not the data's shape
    (root / "val" / "truck").mkdir()
    shutil.copy(root / "val" / "dog" / "0.JPEG", root / "val" / "truck" / "0.JPEG")
    with pytest.raises(ReslabError, match=r"val: class folder\(s\) truck are not among the training classes"):
        data_build.build("folder", root, batch_size=2, device="cpu", workers=0, normalization="channel",
                         augment=Augment.for_size("scale", 32))
    shutil.rmtree(root / "val" / "truck")
    run = tmp_path / "run"
    assert main(["train", "--arch", "resnet18", "--recipe", "imagenet-paper", "--data", "folder", "--data-dir",
                 str(root), "--crop-size", "32", "--iters", "2", "--batch-size", "4", "--eval-every", "2",
                 "--workers", "0", "--normalization", "channel", "--no-progress", "--out", str(run), "--stop-at", "1"]) == 0
    other = make_jpeg_folder(tmp_path / "other", classes=("bird", "frog", "ship"), per_class=2, size=(40, 56))
    capsys.readouterr()
    assert main(["eval", str(run), "--workers", "0"]) == 0
    line = capsys.readouterr().out
    assert "top-1 error" in line and "top-5" not in line  # 3 classes: top-5 is always right, so not shown
    wrong = "the data's classes (bird, frog, ship) are not the ones the model was trained on (cat, dog, ship)"
    assert main(["eval", str(run), "--data-dir", str(other), "--workers", "0"]) == 2
    assert wrong in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--data-dir", str(other)]) == 2
    assert wrong in capsys.readouterr().err


def test_a_batch_larger_than_the_training_split_is_refused(tmp_path, capsys):
    """Not a loader that never yields a full batch (it hung), and no run folder left behind."""
    from reslab.cli import main
    root = make_jpeg_folder(tmp_path / "imgs", per_class=2, size=(40, 56))
    assert main(["train", "--arch", "resnet18", "--recipe", "imagenet-paper", "--data", "folder", "--data-dir",
                 str(root), "--crop-size", "32", "--iters", "2", "--batch-size", "8", "--workers", "0",
                 "--normalization", "channel", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "the batch (8) is larger than the training split (4 images); use --batch-size 4 or less" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_empty_class_folder_is_a_missing_class_in_val_and_an_error_in_train(tmp_path):
    """val/dog/ without images is val/ without dog (labels kept); train/dog/ without images is a one-line
    error (ImageFolder's own message said "Found no valid file for the classes dog")."""
    root = make_jpeg_folder(tmp_path / "imgs", classes=("cat", "dog", "ship"), per_class=2, size=(40, 56))
    for p in (root / "val" / "dog").iterdir():
        p.unlink()
    val, train = fold.ImageFolderSplit(root, "val"), fold.ImageFolderSplit(root, "train")
    val.label_as(train.classes)
    assert val.targets == [0, 0, 2, 2]
    for p in (root / "train" / "dog").iterdir():
        p.unlink()
    with pytest.raises(ReslabError, match="class folder.s. dog hold no images"):
        fold.ImageFolderSplit(root, "train")
    # a --data-dir that does not exist, or is a file, says so (it named the train/ inside it)
    for bad, says in ((tmp_path / "nowhere", "does not exist"), (root / "train" / "cat" / sorted(
            p.name for p in (root / "train" / "cat").iterdir())[0], "is a file")):
        with pytest.raises(FileNotFoundError, match=f"--data-dir .* {says}: --data folder needs a folder"):
            fold.ImageFolderSplit(bad, "train")
    # one class: a one-output classifier is always right (0% error), so it is refused
    from reslab.data import build as data_build
    one = make_jpeg_folder(tmp_path / "one", classes=("cat",), per_class=2, size=(40, 56))
    with pytest.raises(ReslabError, match="one class folder .cat.; a classifier needs at least 2"):
        data_build.build("folder", one, batch_size=2, device="cpu", workers=0)
