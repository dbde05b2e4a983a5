"""Shared fixtures: synthetic datasets in the official formats, made by the tests themselves."""
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
# PyTorch reads this once, at the process's first cuBLAS call: a deterministic CUDA test (which sets it for
# its run) that came after any other CUDA test would fail. Set before any test runs; no effect on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder and no RESLAB_DATA from the environment."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # process-wide switches a deterministic run sets: restored, so no test runs in the mode of the one before
    switches = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(switches[0])
    torch.backends.cudnn.benchmark = switches[1]


def make_cifar_batches(folder: Path, n_train=500, n_test=100, num_classes=10, seed=0, per_batch=None,
                       str_keys=False):
    """Write CIFAR-10-style batch files (protocol 2, bytes keys, like the official python-2 pickles; with
    `str_keys` str keys and names, as the JPEG pack's rebuild.py writes them). Images carry a class-dependent
    colour so a model can learn them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def images(labels):
        base = (labels[:, None] * 23 % 256).astype(np.int16)
        noise = rng.integers(-20, 21, size=(len(labels), 3072))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    per_batch = per_batch or n_train // 5
    for b in range(5):
        y = rng.integers(0, num_classes, size=per_batch)
        d = {b"batch_label": b"training batch", b"labels": y.tolist(), b"data": images(y),
             b"filenames": [b"x.png"] * per_batch}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(d, protocol=2))
    y = rng.integers(0, num_classes, size=n_test)
    d = {b"batch_label": b"testing batch", b"labels": y.tolist(), b"data": images(y), b"filenames": [b"x"] * n_test}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(num_classes)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    if str_keys:
        for f in folder.iterdir():
            d = pickle.loads(f.read_bytes(), encoding="bytes")
            d = {k.decode(): [v.decode() if isinstance(v, bytes) else v for v in vs] if isinstance(vs, list) else
                 vs.decode() if isinstance(vs, bytes) else vs for k, vs in d.items()}
            f.write_bytes(pickle.dumps(d, protocol=2))
    return folder


def make_cifar_archive(path: Path, **kw) -> Path:
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    src = make_cifar_batches(Path(tempfile.mkdtemp()) / "cifar-10-batches-py", **kw)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return path


@pytest.fixture
def cifar_dir(tmp_path):
    """A folder holding a synthetic cifar-10-python.tar.gz (500 train / 100 test)."""
    d = tmp_path / "data"
    d.mkdir()
    make_cifar_archive(d / "cifar-10-python.tar.gz")
    return d


def make_jpeg_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(40, 56)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.JPEG", format="JPEG")
    return root


@pytest.fixture
def jpeg_dir(tmp_path):
    return make_jpeg_folder(tmp_path / "imgs")


def randomise_bn(model, seed=0):
    """BN statistics and affine parameters away from their init, so that outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def kill_on_eval_line(monkeypatch) -> None:
    """Make the metrics log raise KeyboardInterrupt (a kill) when it is about to write an evaluation line."""
    from reslab import logs
    real = logs.MetricsLog.write

    def killed(self, rec):
        if rec["kind"] == "eval":
            raise KeyboardInterrupt()
        real(self, rec)
    monkeypatch.setattr(logs.MetricsLog, "write", killed)
