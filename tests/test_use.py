"""Using trained models: predict, export, convert, torch.hub."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import reslab
from reslab.cli import main
from reslab.config import RunConfig
from reslab.engine import train
from reslab.errors import ReslabError
from reslab.export import SUFFIXES
from reslab.recipes import get_recipe

from conftest import make_cifar_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("use")
    make_cifar_archive(d / "data" / "cifar-10-python.tar.gz", n_train=200, n_test=40)
    r = get_recipe("cifar-paper").with_overrides(batch_size=40, iters=30, eval_every=30, log_every=10)
    import os
    os.environ["RESLAB_CACHE"] = str(d / "cache")
    train(RunConfig.build(d / "run", "resnet8", r, data_dir=d / "data", progress=False))
    return d / "run"


def _images(folder: Path, labels=(0, 3, 7)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(labels):  # the synthetic classes are colours: c * 23 in every channel
        arr = np.full((48, 40, 3), c * 23 % 256, np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}_c{c}.png")
    return folder


def test_predict_top5_with_class_names(trained, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    assert main(["predict", str(trained), str(imgs), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 3
    for r in res:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["class"].startswith("class") for t in r["top"])
    assert main(["predict", str(trained), str(tmp_path / "missing.png")]) == 2


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("onnx", ".onnx"), ("safetensors", ".safetensors")])
def test_export_round_trips(trained, tmp_path, fmt, suffix, capsys):
    out = tmp_path / f"model{suffix}"
    assert main(["export", str(trained), "--format", fmt, "--out", str(out)]) == 0
    assert "checked" in capsys.readouterr().out
    ref = reslab.load(trained / "last.pt")
    for x in (torch.randn(3, 3, 32, 32), torch.randn(1, 3, 40, 48)):  # any batch, height and width
        with torch.no_grad():
            want = ref(x)
            if fmt == "torchscript":
                got = torch.jit.load(str(out))(x)
            elif fmt == "onnx":
                import onnxruntime as ort
                got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0])
            else:
                again = reslab.load(out)
                side = json.loads(out.with_suffix(".json").read_text())
                assert side["architecture"] == "resnet8" and side["shortcut"] == "A" and side["classes"][0] == "class0"
                assert torch.equal(again.reslab["normalizer"].mean, ref.reslab["normalizer"].mean)
                assert again.reslab["crop_size"] == side["crop_size"] == ref.reslab["crop_size"] == 224
                got = again(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_with_the_normalizer_takes_uint8_images(trained, tmp_path, fmt, capsys):
    """--with-normalizer: the file takes decoded pixels (uint8) and gives what reslab gives for them, at the
    test view and at another size (the per-pixel mean image resized as for multi-scale tests)."""
    out = tmp_path / f"model{SUFFIXES[fmt]}"
    assert main(["export", str(trained), "--format", fmt, "--out", str(out), "--with-normalizer"]) == 0
    assert "input: uint8 RGB images, normalised inside" in capsys.readouterr().out
    ref = reslab.load(trained / "last.pt")
    assert ref.reslab["normalizer"].mode == "pixel" and ref.reslab["normalizer"].mean.shape == (3, 32, 32)
    g = torch.Generator().manual_seed(5)
    for shape in ((4, 3, 32, 32), (2, 3, 40, 48)):
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        with torch.no_grad():
            want = ref(ref.reslab["normalizer"](x))
            if fmt == "torchscript":
                got = torch.jit.load(str(out))(x)
            else:
                import onnxruntime as ort
                got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert main(["export", str(trained), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors"),
                 "--with-normalizer"]) == 2
    assert "carry the normaliser already" in capsys.readouterr().err


def test_exports_and_hand_edited_sidecars_are_named_errors(trained, tmp_path, capsys):
    """predict on a TorchScript file says it is an export (not "not a readable checkpoint" with torch.load's
    advice to unpickle it); a safetensors sidecar without its fields, or with too few class names, is
    refused when loaded, not with a KeyError or an IndexError later."""
    ts = tmp_path / "m.ts.pt"
    assert main(["export", str(trained), "--format", "torchscript", "--out", str(ts)]) == 0
    capsys.readouterr()
    assert main(["predict", str(ts), str(_images(tmp_path / "imgs"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a TorchScript export" in err and "weights_only" not in err and "\n" not in err
    # without its suffix a safetensors file would be read back as a checkpoint: refused before writing
    assert main(["export", str(trained), "--format", "safetensors", "--out", str(tmp_path / "noext")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err and not (tmp_path / "noext").exists()
    st = tmp_path / "m.safetensors"
    assert main(["export", str(trained), "--format", "safetensors", "--out", str(st)]) == 0
    side = json.loads(st.with_suffix(".json").read_text())
    st.with_suffix(".json").write_text(json.dumps({**side, "classes": side["classes"][:3]}))
    with pytest.raises(ReslabError, match="3 class names for a model with 10 outputs"):
        reslab.load(st)
    st.with_suffix(".json").write_text("{}")
    with pytest.raises(ReslabError, match="lacks model_config, normalization"):
        reslab.load(st)
    # files that exist are replaced only on request: the sidecar alone is enough to refuse
    st.unlink()
    assert main(["export", str(trained), "--format", "safetensors", "--out", str(st)]) == 2
    assert "m.json already exists; choose another --out, or pass --force" in capsys.readouterr().err
    assert not st.exists() and st.with_suffix(".json").read_text() == "{}"
    assert main(["export", str(trained), "--format", "safetensors", "--out", str(st), "--force"]) == 0
    assert reslab.load(st).reslab["classes"] == side["classes"]


def test_onnx_export_takes_the_view_a_folder_run_was_tested_at(tmp_path, capsys):
    """A 224-layout net trained on 32x32 crops is tested at 32: its ONNX file is exported and checked there
    (it used to accept 224 only, and the documented 32x32 view failed in onnxruntime)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from conftest import make_jpeg_folder
    root = make_jpeg_folder(tmp_path / "imgs", per_class=4, size=(40, 48))
    run = tmp_path / "r18"
    assert main(["train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--data-dir", str(root),
                 "--crop-size", "32", "--batch-size", "4", "--iters", "2", "--eval-every", "2", "--workers", "0",
                 "--normalization", "channel", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "r18.onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "test view is 32x32" in capsys.readouterr().out
    ref, sess = reslab.load(run), ort.InferenceSession(str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), ref(x),
                                   rtol=1e-4, atol=1e-4)
    # with the run's per-channel normalisation inside: uint8 pixels in
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--with-normalizer", "--force"]) == 0
    u8 = torch.randint(0, 256, (2, 3, 36, 44), dtype=torch.uint8)
    assert ref.reslab["normalizer"].mode == "channel"
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"images": u8.numpy()})[0]),
                                   ref(ref.reslab["normalizer"](u8)), rtol=1e-4, atol=1e-4)


def test_convert_torchvision_identical_outputs(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7).eval()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert main(["convert", str(tmp_path / "tv.pth"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "r18.pt")]) == 0
    ours = reslab.load(tmp_path / "r18.pt")
    assert ours.metadata["stride_variant"] == "-" and ours.cfg.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    # the layouts training scripts save: pytorch/examples' {"state_dict": DataParallel names}, torchvision's
    # references' {"model": ...}; a whole pickled model is refused with what to save instead
    layouts = {"examples.pth": {"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}, "epoch": 90},
               "references.pth": {"model": tv.state_dict(), "optimizer": {}, "epoch": 3}}
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        assert main(["convert", str(tmp_path / name), "--from", "torchvision", "--arch", "resnet18",
                     "--out", str(tmp_path / (name + ".pt"))]) == 0, name
        with torch.no_grad():
            assert torch.equal(reslab.load(tmp_path / (name + ".pt"))(x), tv(x)), name
    # converted weights record no data: an ImageNet net is evaluated on a folder, whose class count must fit
    from conftest import make_jpeg_folder
    folder = make_jpeg_folder(tmp_path / "imgs", classes=tuple("abcdefg"), per_class=1)
    assert main(["eval", str(tmp_path / "r18.pt"), "--data-dir", str(folder), "--workers", "0"]) == 0
    assert main(["eval", str(tmp_path / "r18.pt"), "--data-dir", str(make_jpeg_folder(tmp_path / "two")),
                 "--workers", "0"]) == 2
    torch.save(tv, tmp_path / "whole.pth")
    assert main(["convert", str(tmp_path / "whole.pth"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "w.pt")]) == 2
    # a .safetensors --out is safetensors with its sidecar (it was a pickle under that name, read by nothing)
    pytest.importorskip("safetensors")
    assert main(["convert", str(tmp_path / "tv.pth"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "new" / "r18.safetensors")]) == 0  # its folder made, as for .pt
    with torch.no_grad():
        assert torch.equal(reslab.load(tmp_path / "new" / "r18.safetensors")(x), tv(x))
    assert json.loads((tmp_path / "new" / "r18.json").read_text())["architecture"] == "resnet18"
    assert sorted(f.name for f in (tmp_path / "new").iterdir()) == ["r18.json", "r18.safetensors"]  # no temporaries


TIMM = Path(__file__).parent / "fixtures" / "timm-resnet18"


def test_convert_timm_hub_folder_and_training_checkpoint(tmp_path):
    """timm's files as timm 1.0.31 writes them: tests/fixtures/timm-resnet18 holds the config.json its
    save_for_hf wrote for resnet18 and the names and shapes of that model's tensors (too large to commit
    whole). The weights are a torchvision ResNet-18's, which must have exactly timm's names and shapes."""
    torch.manual_seed(2)
    tv = torchvision.models.resnet18().eval()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    sd = tv.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == json.loads((TIMM / "tensors.json").read_text())
    from safetensors.torch import save_file
    hub = tmp_path / "hub"
    hub.mkdir()
    conf = json.loads((TIMM / "config.json").read_text())
    conf["pretrained_cfg"]["mean"] = [0.5, 0.4, 0.3]  # read from the file, not assumed
    conf["label_names"] = [f"n{i:08d}" for i in range(1000)]  # as timm writes ImageNet's synsets and words
    conf["label_descriptions"] = {f"n{i:08d}": f"class {i}" for i in range(1000)}
    (hub / "config.json").write_text(json.dumps(conf))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(hub / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    assert main(["convert", str(hub), "--from", "timm", "--out", str(tmp_path / "a.pt")]) == 0
    ours = reslab.load(tmp_path / "a.pt")
    assert ours.cfg.name == "resnet18" and ours.metadata["stride_variant"] == "-"
    assert ours.reslab["normalizer"].mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert ours.reslab["classes"][:2] == ["class 0", "class 1"]
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    # the Hugging Face cache's own layout (huggingface_hub's cache docs): the entry folder is read at the
    # snapshot refs/main names; its files are links into blobs/
    entry = tmp_path / "cache" / "models--timm--resnet18.a1_in1k"
    (entry / "blobs").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    snap = entry / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (entry / "snapshots" / "old9876").mkdir()
    for name in ("config.json", "model.safetensors"):
        (hub / name).rename(entry / "blobs" / name)
        (snap / name).symlink_to(Path("..", "..", "blobs", name))
    assert main(["convert", str(entry), "--from", "timm", "--out", str(tmp_path / "hf.pt")]) == 0
    with torch.no_grad():
        assert torch.equal(reslab.load(tmp_path / "hf.pt")(x), tv(x))
    (entry / "refs" / "main").unlink()  # two snapshots and no ref: which one is not guessed
    assert main(["convert", str(entry), "--from", "timm", "--out", str(tmp_path / "hf2.pt")]) == 2
    (entry / "blobs" / "model.safetensors").rename(hub / "model.safetensors")
    (entry / "blobs" / "config.json").rename(hub / "config.json")
    # the file names its architecture: another --arch is refused, and timm's other ResNets are other nets
    assert main(["convert", str(hub), "--from", "timm", "--arch", "resnet34", "--out", str(tmp_path / "b.pt")]) == 2
    conf["architecture"] = "resnet18d"
    (hub / "config.json").write_text(json.dumps(conf))
    assert main(["convert", str(hub / "model.safetensors"), "--from", "timm", "--out", str(tmp_path / "c.pt")]) == 2
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "c.pt").exists()
    # timm's train.py: its options as an argparse.Namespace, the EMA weights beside the raw ones (timm
    # prefers the EMA, and so does the converter), names behind DDP's and torch.compile's prefixes
    raw = {"_orig_mod.module." + k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": raw, "state_dict_ema": {"module." + k: v for k, v in sd.items()},
                "args": argparse.Namespace(model="resnet18", lr=0.5, sched="cosine")}, tmp_path / "model_best.pth.tar")
    assert main(["convert", str(tmp_path / "model_best.pth.tar"), "--from", "timm", "--out", str(tmp_path / "d.pt")]) == 0
    with torch.no_grad():
        assert torch.equal(reslab.load(tmp_path / "d.pt")(x), tv(x))
    # saved without its args, a train.py checkpoint's "arch" is the model's class name: --arch decides
    torch.save({"epoch": 1, "arch": "resnet", "state_dict": sd}, tmp_path / "noargs.pth.tar")
    assert main(["convert", str(tmp_path / "noargs.pth.tar"), "--from", "timm", "--arch", "resnet18",
                 "--out", str(tmp_path / "g.pt")]) == 0
    # torch.compile's prefix alone, and a .safetensors file given to the torchvision converter
    save_file({"_orig_mod." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tv.safetensors"))
    assert main(["convert", str(tmp_path / "tv.safetensors"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "e.pt")]) == 0
    with torch.no_grad():
        assert torch.equal(reslab.load(tmp_path / "e.pt")(x), tv(x))
    # a backbone saved without its classifier says so
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("fc.")}, str(tmp_path / "headless.safetensors"))
    assert main(["convert", str(tmp_path / "headless.safetensors"), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "f.pt")]) == 2


class _ReproBlock(nn.Module):
    """The popular CIFAR reproduction's block, written independently here: option A pads planes//4 zero
    channels on both sides of a stride-2 subsample (their lambda layer)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or cin != planes) else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class _ReproNet(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, stages = 16, []
        for i, w in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_ReproBlock(cin, w, 2 if i and not j else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_convert_cifar_reproduction_layout(tmp_path):
    torch.manual_seed(1)
    net = _ReproNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    sd = {"module." + k: v for k, v in net.state_dict().items()}  # DataParallel's prefix
    torch.save({"state_dict": sd, "best_prec1": 91.7}, tmp_path / "resnet20.th")
    assert main(["convert", str(tmp_path / "resnet20.th"), "--from", "cifar-repro", "--arch", "resnet20",
                 "--out", str(tmp_path / "r20.pt")]) == 0
    ours = reslab.load(tmp_path / "r20.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-5)
    assert ours.reslab["classes"][3] == "cat"
    # plain20 has exactly these tensor names: converting into it would drop the shortcuts silently
    assert main(["convert", str(tmp_path / "resnet20.th"), "--from", "cifar-repro", "--arch", "plain20",
                 "--out", str(tmp_path / "p20.pt")]) == 2
    assert not (tmp_path / "p20.pt").exists()
    # an --out that names a file already there (a run's last.pt, mistyped) is left alone without --force
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"months of training")
    args = ["convert", str(tmp_path / "resnet20.th"), "--from", "cifar-repro", "--arch", "resnet20", "--out",
            str(run / "last.pt")]
    assert main(args) == 2 and (run / "last.pt").read_bytes() == b"months of training"
    assert main(args[:-2] + ["--out", str(run)]) == 2  # a folder: say so, not IsADirectoryError
    assert main(args + ["--force"]) == 0 and reslab.load(run / "last.pt").reslab["classes"][3] == "cat"


def test_torch_hub_local():
    m = torch.hub.load(str(REPO), "resnet56", source="local", num_classes=100)
    assert m.cfg.depth == 56 and m.cfg.num_classes == 100
    r50 = torch.hub.load(str(REPO), "resnet50", source="local", stride_in_1x1=False)
    assert r50.metadata["stride_variant"] == "v1.5"
    with pytest.raises(ValueError, match="no pretrained weights"):
        torch.hub.load(str(REPO), "resnet20", source="local", pretrained=True)


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    for args in (["predict", str(junk), str(tmp_path)], ["export", str(junk), "--format", "onnx", "--out",
                 str(tmp_path / "x.onnx")], ["convert", str(junk), "--from", "torchvision", "--arch", "resnet18",
                 "--out", str(tmp_path / "y.pt")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "junk.pt" in err[0]
    # an ONNX file under a checkpoint's suffix: named for what it is (it got torch.load's unpickling advice)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(nn.Linear(3, 2), (torch.randn(1, 3),), str(tmp_path / "net.pt"), dynamo=False)
    assert main(["predict", str(tmp_path / "net.pt"), str(tmp_path)]) == 2
    assert "net.pt is an ONNX export, which holds the network alone" in capsys.readouterr().err
    # a run folder that kept only best.pt (last.pt deleted to save space): the error points at it
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    assert main(["predict", str(run), str(tmp_path)]) == 2
    assert f"the folder holds best.pt, the run's best evaluation: give {run / 'best.pt'}" in capsys.readouterr().err


def test_test_views_keep_the_crop_a_run_trained_with():
    """A folder run trained at crop size 32 is tested at 32 with the paper's 256:224 proportions (scale
    augmentation 37-69 at that size); checkpoints from before the field existed get the paper's 224."""
    from reslab.predict import augment_of, preprocess
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert preprocess(img, "imagenet").shape == (3, 224, 224)
    assert preprocess(img, "imagenet", 32).shape == (3, 32, 32)
    assert preprocess(img, "cifar", 224).shape == (3, 32, 32)   # CIFAR nets see 32x32 whatever the recipe says
    # the data decides where it is recorded: ResNet-18 trained on CIFAR arrays saw 32x32; a CIFAR net trained
    # on a folder at crop 32 is tested as `reslab eval` does, resize 37 then the centre 32
    assert preprocess(img, "imagenet", 224, data="cifar10").shape == (3, 32, 32)
    from torchvision.transforms import v2
    want = v2.CenterCrop(32)(v2.Resize(37, antialias=True)(img))
    assert torch.equal(preprocess(img, "cifar", 32, data="folder"), want)
    a = augment_of({"recipe": {"crop": "scale", "crop_size": 32}})
    assert (a.size, a.scale) == (32, (37, 69))
    assert (augment_of({}).size, augment_of({}).scale) == (224, (256, 480))


def test_predict_sees_a_photo_upright(trained, tmp_path):
    """A JPEG stored sideways with an EXIF orientation (as phones write them) is turned before the view."""
    from PIL import Image
    from reslab.data.folder import decode
    from reslab.predict import predict
    arr = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    arr[:, :10] = 255  # a bright left edge
    im = Image.fromarray(arr)
    im.save(tmp_path / "as-stored.jpg", quality=95)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(tmp_path / "side.jpg", exif=exif, quality=95)
    assert decode(str(tmp_path / "side.jpg")).shape == (3, 20, 40)  # training reads files as stored
    up = decode(str(tmp_path / "side.jpg"), upright=True)
    assert up.shape == (3, 40, 20) and up[:, :10].float().mean() > 200  # the bright edge is now on top
    Image.fromarray(up.permute(1, 2, 0).numpy()).save(tmp_path / "upright.png")  # the same pixels, lossless

    def probs(name):
        return [t["prob"] for t in predict(trained, [tmp_path / name], top=10, device="cpu")[0]["top"]]
    assert probs("side.jpg") == probs("upright.png")  # predict saw the photo turned upright
    assert probs("side.jpg") != probs("as-stored.jpg")  # which is not the view of the pixels as stored
