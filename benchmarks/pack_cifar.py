"""Pack a CIFAR-10 python-format dataset small enough to travel to a lent GPU machine (64 MiB limit), and
unpack it there into the official batch layout.

Superseded for the JPEG copy of CIFAR-10: its source JPEGs travel as an 18.7 MB pack that rebuilds the
batches pixel for pixel (shared/datasets/cifar10-jpeg, rebuild.py), where this re-encodes the training
images once more. Kept because the 2026-11-23 GPU results were made with it (docs/results/gpu-cifar-paper).

  pack:   train images re-encoded as JPEG q=75 4:2:0 (the JPEG copy's own settings: mean |change| about
          0.15 grey levels per pixel on the shared copy), test images as lossless WebP (exact).
  unpack: decode into cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) and print the MD5
          of the test pixels, to compare with the source's.

    python benchmarks/pack_cifar.py pack ../shared/datasets/cifar10 .device-data
    python benchmarks/pack_cifar.py unpack .device-data /tmp/cifar-device
"""
import hashlib
import io
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(x, fmt):
    blobs = []
    for im in x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1):
        b = io.BytesIO()
        if fmt == "jpeg":
            Image.fromarray(im).save(b, format="JPEG", quality=75, subsampling=2)
        else:
            Image.fromarray(im).save(b, format="WEBP", lossless=True, quality=100, method=6)
        blobs.append(b.getvalue())
    return blobs


def pack(src, dst):
    from reslab.data import cifar
    loc = cifar.locate("cifar10", src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, fmt in (("train", "jpeg"), ("test", "webp")):
        arr = cifar.load("cifar10", split, located=loc)
        x = arr.images.numpy().reshape(len(arr), -1)
        blobs = _encode(x, fmt)
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        np.savez(dst / f"{split}.npz", blob=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                 labels=arr.labels.numpy(), md5=hashlib.md5(x.tobytes()).hexdigest())
        print(split, len(arr), f"{offsets[-1] / 2**20:.1f} MiB", hashlib.md5(x.tobytes()).hexdigest())
    (dst / "classes.txt").write_text("\n".join(arr.classes))


def unpack(src, dst):
    src, out = Path(src), Path(dst) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        z = np.load(src / f"{split}.npz")
        blob, off, labels = z["blob"].tobytes(), z["offsets"], z["labels"]
        x = np.stack([np.asarray(Image.open(io.BytesIO(blob[off[i]:off[i + 1]])).convert("RGB"))
                      for i in range(len(labels))]).transpose(0, 3, 1, 2).reshape(len(labels), -1)
        x = np.ascontiguousarray(x, dtype=np.uint8)
        print(split, len(labels), "md5", hashlib.md5(x.tobytes()).hexdigest(), "source", str(z["md5"]))
        chunks = [("test_batch", slice(None))] if split == "test" else [
            (f"data_batch_{b + 1}", slice(b * 10000, (b + 1) * 10000)) for b in range(5)]
        for name, sl in chunks:
            d = {b"batch_label": name.encode(), b"labels": labels[sl].tolist(), b"data": x[sl],
                 b"filenames": [b""] * len(labels[sl])}
            (out / name).write_bytes(pickle.dumps(d, protocol=2))
    names = (src / "classes.txt").read_text().split("\n")
    (out / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](sys.argv[2], sys.argv[3])
