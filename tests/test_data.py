"""The data layer: official formats, safety, splits, the resident loader, folders and views."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from reslab.data import Normalizer, ResidentLoader, cifar
from reslab.data import folder as fold
from reslab.data.augment import Augment
from reslab.data.safe_pickle import load_batch
from reslab import checkpoint as ckpt
from reslab.errors import ReslabError

from conftest import SHARED_CIFAR, make_cifar_archive, make_cifar_batches


def test_archive_is_extracted_into_the_cache_not_the_source(cifar_dir, capsys):
    loc = cifar.locate("cifar10", cifar_dir)
    assert not loc.official and "differs from the official" in capsys.readouterr().err
    assert str(loc.folder).startswith(str(cifar.cache_dir()))
    assert sorted(p.name for p in cifar_dir.iterdir()) == ["cifar-10-python.tar.gz"]
    tr, te = cifar.load("cifar10", "train", located=loc), cifar.load("cifar10", "test", located=loc)
    assert tr.images.shape == (500, 3, 32, 32) and tr.images.dtype == torch.uint8 and len(te) == 100
    assert tr.classes[0] == "class0"


def test_extracted_folder_and_archive_path_are_accepted(tmp_path):
    folder = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    assert cifar.locate("cifar10", tmp_path).folder == folder
    assert cifar.locate("cifar10", folder).folder == folder
    arch = make_cifar_archive(tmp_path / "elsewhere" / "my.tar.gz")
    assert len(cifar.load("cifar10", "test", arch)) == 100


def test_download_checks_the_md5(tmp_path, monkeypatch):
    arch = make_cifar_archive(tmp_path / "srv" / "cifar-10-python.tar.gz")
    good = hashlib.md5(arch.read_bytes()).hexdigest()
    spec = cifar.SPECS["cifar10"]
    got = cifar.download(spec, url=arch.as_uri(), expected_md5=good)
    assert got.is_file() and got.parent == cifar.cache_dir() / "downloads"
    got.unlink()
    with pytest.raises(ReslabError, match="refusing"):
        cifar.download(spec, url=arch.as_uri(), expected_md5="0" * 32)
    assert not (cifar.cache_dir() / "downloads" / spec.archive).exists()


def test_a_process_waits_for_another_extracting_into_the_same_cache(tmp_path, monkeypatch):
    """DDP ranks find the cache empty together. Without the lock the second extracted too and replaced the
    folder the first was reading; with it, the second waits and then reuses the first one's folder."""
    import subprocess
    import sys
    import time
    arch = make_cifar_archive(tmp_path / "a" / "cifar-10-python.tar.gz")
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    spec = cifar.SPECS["cifar10"]
    dest = cifar.cache_dir() / "extracted" / f"cifar10-{hashlib.md5(arch.read_bytes()).hexdigest()[:12]}"
    code = ("import sys; from reslab.data import cifar; print('ready', flush=True); "
            "print(cifar.locate('cifar10', sys.argv[1]).folder)")
    with cifar._cache_lock(dest.parent / f".{dest.name}.lock"):  # "another rank" is extracting
        p = subprocess.Popen([sys.executable, "-c", code, str(arch)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        assert p.poll() is None, "the second process did not wait for the lock"
        cifar._extract_locked(arch, spec, dest)
        (dest / "marker").write_text("first")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-500:]
    assert out.strip() == str(dest / spec.folder) and (dest / "marker").is_file()  # reused, not replaced


def test_malicious_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ReslabError, match="not allowed"):
        load_batch(bad)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "shape"])
def test_corrupt_batches_name_the_file(tmp_path, damage):
    folder = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    f = folder / "data_batch_3"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "garbage":
        f.write_bytes(b"\x00not a pickle at all")
    else:
        f.write_bytes(pickle.dumps({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, protocol=2))
    with pytest.raises(ReslabError, match="data_batch_3"):
        cifar.load("cifar10", "train", folder)


def test_corrupt_archive_is_an_error(tmp_path):
    arch = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    arch.write_bytes(arch.read_bytes()[: arch.stat().st_size // 2])
    with pytest.raises(ReslabError, match="corrupt or truncated"):
        cifar.locate("cifar10", tmp_path)


def test_45k_5k_split_is_deterministic_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 5000)
    np.random.default_rng(0).shuffle(labels)
    tr, va = cifar.val_split_indices(labels, 10)
    assert len(tr) == 45000 and len(va) == 5000 and not set(tr) & set(va)
    assert np.bincount(labels[va]).tolist() == [500] * 10
    tr2, va2 = cifar.val_split_indices(labels, 10)
    assert np.array_equal(va, va2)


def _loader(n=100, batch=16, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(n)
    return ResidentLoader(x, y, batch, Normalizer.fit(x), **kw), x


def test_train_epoch_sees_each_example_once_and_reshuffles():
    L, _ = _loader(train=True, seed=3)
    assert len(L) == 100 // 16  # last partial batch dropped in training
    e0 = torch.cat([y for _, y in L])
    e1 = torch.cat([y for _, y in L])
    assert len(e0) == 96 and len(set(e0.tolist())) == 96 and not torch.equal(e0, e1)
    L2, _ = _loader(train=True, seed=3, drop_last=False)
    assert sorted(torch.cat([y for _, y in L2]).tolist()) == list(range(100))


def test_augmentation_is_the_papers_crop_and_flip():
    L, x = _loader(n=20, batch=20, train=True, pad=2)
    xb, yb = next(iter(L))
    norm = L.normalizer
    for img, idx in zip(xb, yb):
        ref = norm(x[idx:idx + 1])[0]
        padded = torch.nn.functional.pad(ref, (2, 2, 2, 2))  # zero after normalisation
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                if torch.allclose((lambda c: c.flip(-1) if f else c)(padded[:, dy:dy + 8, dx:dx + 8]), img, atol=1e-5)]
        assert hits, "a training image is not a padded crop (or its flip) of its source"


def test_ddp_sharding_train_and_eval_cover_everything_exactly_once():
    full, _ = _loader(n=103, batch=12, train=True, seed=1)
    ranks = [_loader(n=103, batch=12, train=True, seed=1, rank=r, world_size=3)[0] for r in range(3)]
    for (xf, yf), *parts in zip(full, *ranks):
        assert torch.equal(torch.cat([p[1] for p in parts]), yf)
        assert torch.allclose(torch.cat([p[0] for p in parts]), xf)
    ev = [_loader(n=103, batch=10, train=False, rank=r, world_size=4)[0] for r in range(4)]
    seen = torch.cat([y for L in ev for _, y in L])
    assert sorted(seen.tolist()) == list(range(103))


def test_loader_state_restores_the_same_next_batch():
    L, _ = _loader(train=True, seed=5)
    it = iter(L)
    next(it), next(it)
    state = L.state_dict()
    want = next(it)
    L2, _ = _loader(train=True, seed=5)
    L2.load_state_dict(state)
    got = next(iter(L2))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_forks_leave_the_training_position_alone(jpeg_dir):
    """Precise BN reads a fork between training steps; the training stream must continue as if untouched."""
    L, _ = _loader(train=True, seed=5)
    ref, _ = _loader(train=True, seed=5)
    it, want = iter(L), [y for _, y in ref]
    got = [next(it)[1]]
    f = L.fork(99)
    forked = [y for _, y in f]
    got += [y for _, y in it]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert L.state_dict() == {"epoch": 1, "batch": 0, "seed": 5} and f.seed == 99
    assert not torch.equal(torch.cat(forked), torch.cat(want))
    # folder stream with persistent workers: a second iter() of the same DataLoader would reset the first
    from reslab.data.build import FolderStream
    norm = fold.imagenet_normalizer()

    def stream():
        ds = fold.ImageFolderSplit(jpeg_dir, "train", augment=Augment.for_size("scale", 16))
        return FolderStream(fold.make_loader(ds, 2, train=True, workers=1, seed=0), fold.Finisher(ds, "cpu", norm))
    S, R = stream(), stream()
    want = [x for x, _ in R]
    it = iter(S)
    got = [next(it)[0]]
    assert len(list(S.fork(7))) == 3
    got += [x for x, _ in it]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_channels_last_output_and_normalizer_modes():
    L, x = _loader(train=True, channels_last=True)
    xb, _ = next(iter(L))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    ch = Normalizer.fit(x, "channel")
    z = ch(x)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(3), atol=1e-2)
    back = Normalizer.from_state_dict(ch.state_dict())
    assert torch.equal(back.mean, ch.mean) and back.mode == "channel"
    # a float batch in [0, 1] (ToTensor's) was divided by 255 again, in the caller's own tensor: refused
    f = x[:4].float() / 255
    kept = f.clone()
    with pytest.raises(ReslabError, match="takes uint8 images"):
        ch(f)
    assert torch.equal(f, kept)


def test_folder_views_have_the_right_count_and_sizes(jpeg_dir):
    norm = fold.imagenet_normalizer()
    ds = fold.ImageFolderSplit(jpeg_dir, "val", fold.eval_transform(norm, "10crop", size=24, resize=32))
    x, y = ds[0]
    assert x.shape == (10, 3, 24, 24) and ds.classes == ["cat", "dog"]
    # the second five are crops of the flipped image: its centre is the flipped centre, its top-left the
    # flipped top-right
    assert torch.allclose(x[9], x[4].flip(-1)) and torch.allclose(x[5], x[1].flip(-1))
    ms = fold.ImageFolderSplit(jpeg_dir, "val", fold.eval_transform(norm, "multiscale"))
    views, _ = ms[0]
    assert [min(v.shape[-2:]) for v in views] == list(fold.MULTISCALE_SIZES)
    tr = fold.ImageFolderSplit(jpeg_dir, "train", augment=Augment.for_size("scale", 32))
    crop, _, (box, flip, alpha), used = tr[1, 7]
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8 and box.shape == (4,) and alpha.shape == (3,)
    assert used == 1
    c = fold.ImageFolderSplit(jpeg_dir, "val", fold.eval_transform(norm, "center", size=24, resize=32))
    loader = fold.make_loader(c, 4, train=False, workers=0, rank=1, world_size=2)
    assert sum(len(yb) for _, yb, _, _ in loader) == 3
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert fold.make_loader(c, 4, train=False, workers=64).num_workers == min(64, cpus)  # not 64 on 2 cores


def test_corrupt_jpeg_stops_with_its_name_or_is_skipped(jpeg_dir, capsys):
    bad = jpeg_dir / "val" / "cat" / "0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    ds = fold.ImageFolderSplit(jpeg_dir, "val")
    with pytest.raises(ReslabError, match="0.JPEG"):
        ds[0]
    skip = fold.ImageFolderSplit(jpeg_dir, "val", on_corrupt="skip")
    img, _ = skip[0]
    assert img.dtype == torch.uint8 and skip.skipped == [str(bad)]
    assert "0.JPEG" in capsys.readouterr().err


def test_a_run_stopped_by_a_corrupt_training_image_resumes_with_on_corrupt_skip(jpeg_dir, tmp_path, capsys):
    """The first undecodable training image stops `reslab train` with its name, the step it reached saved
    first (the steps since the last checkpoint were lost); the same run resumes with --on-corrupt skip (a
    free field), which reports the file once and trains to the end: bitwise the run that skipped from the
    start."""
    from reslab.cli import main
    bad = jpeg_dir / "train" / "dog" / "1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    run = tmp_path / "run"
    args = ["train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--data-dir", str(jpeg_dir),
            "--crop-size", "32", "--batch-size", "2", "--iters", "12", "--eval-every", "10", "--workers", "0",
            "--normalization", "channel", "--no-progress"]
    assert main([*args, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot decode" in err and len(err.strip().splitlines()) == 1
    step = ckpt.read_status(run)["step"]  # the file is met in the first epoch (3 batches), after step 0
    assert 0 < step < 3 and f"now holds step {step}, saved before that batch" in err
    assert main([*args, "--out", str(run), "--resume", "--on-corrupt", "skip"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"skipping corrupt image: {bad}") == 1
    assert ckpt.read_status(run)["step"] == 12
    assert json.loads((run / "config.json").read_text())["data"]["on_corrupt"] == "skip"
    assert main([*args, "--out", str(tmp_path / "skip"), "--on-corrupt", "skip"]) == 0
    a, b = ckpt.load(run / "last.pt")["model"], ckpt.load(tmp_path / "skip" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_an_image_folder_whose_file_list_changed(jpeg_dir, tmp_path, capsys):
    """A folder's split sizes were all a resume compared: a file renamed (or one swapped for another) kept
    the counts, and the loader's saved position then pointed at other images. Each split's file list is
    fingerprinted now; the contents are not read."""
    from reslab.cli import main
    run = tmp_path / "run"
    args = ["train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--data-dir", str(jpeg_dir),
            "--crop-size", "32", "--batch-size", "2", "--iters", "4", "--eval-every", "2", "--workers", "0",
            "--normalization", "channel", "--no-progress", "--out", str(run)]
    assert main([*args, "--stop-at", "2"]) == 0
    ident = json.loads((run / "config.json").read_text())["data_info"]["identity"]
    assert len(ident["train_files_md5"]) == len(ident["eval_files_md5"]) == 32
    for split, what in (("train", "training"), ("val", "evaluation")):
        a = sorted((jpeg_dir / split / "dog").iterdir())[0]
        b = a.with_name("renamed" + a.suffix)
        a.rename(b)
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        assert f"the {what} split's files differ from the run's" in capsys.readouterr().err
        b.rename(a)
    moved = tmp_path / "moved"  # the same files elsewhere are the same data
    jpeg_dir.rename(moved)
    assert main([*(str(moved) if x == str(jpeg_dir) else x for x in args), "--resume"]) == 0
    assert ckpt.read_status(run)["step"] == 4


@pytest.mark.parametrize("precise_bn, workers", [(0, 0), (2, 1)])
def test_a_corrupt_validation_image_saves_the_step_and_the_resume_evaluates_it(jpeg_dir, tmp_path, capsys,
                                                                               precise_bn, workers):
    """The evaluation is the first to read the validation images: a bad one used to stop the run with every
    step since the last checkpoint lost. The step is saved first, marked; once the file is fixed, --resume
    evaluates that step and trains on, bitwise the run that never stopped (with precise BN too: the resume
    computes the statistics of that step again)."""
    import shutil
    from reslab.cli import main
    good = tmp_path / "good"
    shutil.copytree(jpeg_dir, good)
    args = ["train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--crop-size", "32",
            "--batch-size", "2", "--iters", "6", "--eval-every", "3", "--log-every", "3", "--workers", str(workers),
            "--normalization", "channel", "--precise-bn", str(precise_bn), "--no-progress"]
    assert main([*args, "--data-dir", str(good), "--out", str(tmp_path / "ref")]) == 0
    bad = jpeg_dir / "val" / "dog" / "1.JPEG"
    original = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*args, "--data-dir", str(jpeg_dir), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    # with workers, PyTorch hands the worker's traceback back as the message: the line is still the error's
    assert err.startswith(f"reslab: error: the evaluation at step 3 failed: {bad}: cannot decode image") and \
        "Traceback" not in err and "saved before that evaluation" in err, err
    st = ckpt.read_status(run)
    assert st["step"] == 3 and not st["finished"] and ckpt.load(run / "last.pt")["eval_pending"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [] and rows[-1]["step"] == 3
    from reslab.reproduce import run_status
    assert run_status(run) == "resume@3"
    bad.write_bytes(original)
    assert main([*args, "--data-dir", str(jpeg_dir), "--out", str(run), "--resume"]) == 0
    a, b = ckpt.load(run / "last.pt"), ckpt.load(tmp_path / "ref" / "last.pt")
    assert a["finished"] and not a["eval_pending"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    evals = [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"}
             for p in (run, tmp_path / "ref") for ln in (p / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "eval"]
    assert len(evals) == 4 and evals[:2] == evals[2:]
    assert torch.equal(ckpt.load(run / "best.pt")["model"]["fc.weight"],
                       ckpt.load(tmp_path / "ref" / "best.pt")["model"]["fc.weight"])


def test_on_corrupt_skip_covers_the_normalisation_fitted_from_the_images(jpeg_dir, tmp_path, capsys):
    """--normalization pixel reads training images before the first step: a corrupt one stops the run with
    its name, or under --on-corrupt skip is reported once and left out of the mean (it was a traceback-free
    stop even with skip)."""
    from reslab.cli import main
    bad = jpeg_dir / "train" / "dog" / "1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    args = ["train", "--arch", "resnet18", "--width", "0.125", "--data", "folder", "--data-dir", str(jpeg_dir),
            "--crop-size", "32", "--batch-size", "2", "--iters", "3", "--eval-every", "3", "--workers", "0",
            "--normalization", "pixel", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot decode" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "b"), "--on-corrupt", "skip"]) == 0
    assert capsys.readouterr().err.count(f"skipping corrupt image: {bad}") == 1
    good = fold.ImageFolderSplit(jpeg_dir, "train", on_corrupt="skip")
    good.samples = [s for s in good.samples if s[0] != str(bad)]
    want = fold.fit_normalizer(good, "pixel", size=32)
    got = ckpt.load(tmp_path / "b")["normalizer"]
    assert torch.equal(got["mean"], want.mean)


def test_a_corrupt_jpeg_read_by_a_worker_is_still_one_line(jpeg_dir):
    """A loader worker's error comes back with the worker's traceback as its message: the CLI prints its
    last line, the error itself."""
    from torch.utils.data import DataLoader
    from reslab.cli import _message
    (jpeg_dir / "val" / "cat" / "0.JPEG").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    with pytest.raises(ReslabError) as e:
        list(DataLoader(fold.ImageFolderSplit(jpeg_dir, "val"), batch_size=None, num_workers=1))
    assert "Original Traceback" in str(e.value)
    line = _message(e.value)
    assert "\n" not in line and line.startswith(f"{jpeg_dir / 'val' / 'cat' / '0.JPEG'}: cannot decode"), line


def test_the_same_pixels_pickled_again_are_the_same_data(tmp_path):
    """The JPEG pack's rebuild.py pickles the batches again (str keys): other file checksums, the same pixels.
    The data is identified by its pixels, so a run resumes on the rebuilt copy and a report puts both in one
    row."""
    from conftest import make_cifar_batches
    from reslab.state import _check_same_data
    a = cifar.locate("cifar10", make_cifar_batches(tmp_path / "a" / "cifar-10-batches-py"))
    b = cifar.locate("cifar10", make_cifar_batches(tmp_path / "b" / "cifar-10-batches-py", str_keys=True))
    c = cifar.locate("cifar10", make_cifar_batches(tmp_path / "c" / "cifar-10-batches-py", seed=1))
    assert a.md5 != b.md5 and a.pixels_md5 == b.pixels_md5 != c.pixels_md5
    info = lambda loc: {"name": "cifar10", "identity": loc.identity}  # noqa: E731
    _check_same_data(info(a), info(b), "resume")
    with pytest.raises(ReslabError, match="checksum"):
        _check_same_data(info(a), info(c), "resume")


def test_data_info_cli_json(cifar_dir, capsys):
    import json
    from reslab.cli import main
    assert main(["data", "info", "--data-dir", str(cifar_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["train"] == 500 and d["test"] == 100 and len(d["classes"]) == 10 and d["checksum_official"] is False
    assert d["copy"].startswith("an unrecognised copy of cifar10")  # a known copy is named (report, config.json)


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="../shared/datasets/cifar10 not present")
def test_real_cifar10():
    loc = cifar.locate("cifar10", SHARED_CIFAR)
    tr, te = cifar.load("cifar10", "train", located=loc), cifar.load("cifar10", "test", located=loc)
    assert len(tr) == 50_000 and len(te) == 10_000 and tr.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(tr.labels).tolist() == [5000] * 10
    mean = tr.images.double().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.491, 0.482, 0.447], dtype=torch.float64), atol=0.01)
    assert len(cifar.load("cifar10", "val5k", located=loc)) == 5000
    # the pixels' MD5 that the JPEG pack's README gives for test_batch: a rebuilt copy is known by it
    assert loc.pixels_md5 == "f27046e7dd3c8468b91d5a6d7c5984a6" and "JPEG-recompressed" in loc.identity["description"]


def test_a_named_folder_without_the_data_says_what_is_missing_instead_of_downloading(tmp_path, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("downloaded although a folder was named")
    monkeypatch.setattr(cifar, "download", no_download)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="it holds neither cifar-10-python.tar.gz nor cifar-10-batches-py/"):
        cifar.locate("cifar10", tmp_path / "empty")
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)  # an image folder tree without --data folder
    with pytest.raises(FileNotFoundError, match="looks like an image folder tree .train/<class>/.: add --data folder"):
        cifar.locate("cifar10", tmp_path / "tree")
    part = tmp_path / "part" / "cifar-10-batches-py"
    make_cifar_batches(part, n_train=50, n_test=10)
    (part / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="an incomplete cifar10 folder, test_batch missing"):
        cifar.locate("cifar10", tmp_path / "part")
