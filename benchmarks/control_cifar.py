"""An independent control: ResNet on CIFAR-10 with the recipe of He et al. 2016 (§4.2), written from the
paper and torchvision alone. It imports nothing from reslab, so that reslab's CIFAR errors can be set next
to what a plain, textbook implementation reaches on the same data.

    # the paper's schedule (64k iterations at batch 128), on a GPU
    python benchmarks/control_cifar.py --data-dir ../shared/datasets/cifar10 --out runs/control-resnet20-s0
    # 1.5% of it (960 iterations, lr steps at 480/720) on a CPU
    python benchmarks/control_cifar.py --data-dir ../shared/datasets/cifar10 --budget 0.015 --eval-every 320 \
        --workers 2 --out runs/control-resnet20-quick

What it does, all in this file:
  data     the official python batches (data_batch_1..5, test_batch, batches.meta), read with pickle;
           per-sample torchvision transforms: pad 4 + random 32x32 crop, horizontal flip, normalisation
  model    the CIFAR ResNet of §4.2: 6n+2 layers, 16/32/64 filters, option A shortcuts, He init
  recipe   SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr /10 at 32k and 48k, stop at 64k;
           depth >= 110: lr 0.01 until the training error is below 80%, then back to 0.1
  output   RUN/metrics.jsonl, RUN/config.json, RUN/env.json (the layout `reslab report` reads), RUN/last.pt

Eager fp32 (PyTorch's defaults, so convolutions may use TF32 on Ampere and later GPUs), no compile, no
channels_last: the point is an implementation nobody would suspect of being clever.
"""
import argparse
import hashlib
import json
import os
import pickle
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# The paper's CIFAR-10 recipe (§4.2) at full budget. --budget scales ITERS; the lr steps stay at 1/2 and 3/4.
ITERS = 64_000          # iterations (about 164 epochs of 50k images)
BATCH_SIZE = 128        # images per iteration
LR = 0.1                # initial learning rate
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4     # on every parameter, BN and biases included
GAMMA = 0.1             # lr factor at each milestone
WARMUP_LR = 0.01        # depth >= 110 only: lr until the training error drops below WARMUP_UNTIL_ERR
WARMUP_UNTIL_ERR = 0.80
WARMUP_WINDOW = 20      # iterations whose mean training error decides the end of the warm-up


# ----------------------------------------------------------------------------------------------------------
# Data: the official CIFAR-10 python batches
# ----------------------------------------------------------------------------------------------------------
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def open_batches(data_dir):
    """Return {file name: unpickled dict} for BATCH_FILES, from the first of these that exists:
    data_dir itself (the extracted cifar-10-batches-py/), data_dir/cifar-10-batches-py/,
    data_dir/cifar-10-python.tar.gz, or data_dir being that archive.
    Archive members are read straight from the tar file into memory, so nothing is ever written next to
    the source (the shared data folder is read-only)."""
    d = Path(data_dir).expanduser()
    for folder in (d, d / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file():
            return {name: _unpickle(open(folder / name, "rb")) for name in BATCH_FILES}
    archive = d if d.is_file() else d / "cifar-10-python.tar.gz"
    if archive.is_file():
        out = {}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass: a gzip stream cannot seek back cheaply
                name = Path(member.name).name
                if member.isfile() and name in BATCH_FILES:
                    out[name] = _unpickle(tar.extractfile(member))
        missing = [n for n in BATCH_FILES if n not in out]
        if missing:
            raise FileNotFoundError(f"{archive} lacks {missing}")
        return out
    raise FileNotFoundError(f"no CIFAR-10 python batches at {d} (expected cifar-10-batches-py/ or "
                            "cifar-10-python.tar.gz)")


def _unpickle(f):
    # The batches are Python 2 pickles; encoding="bytes" is what the dataset's home page prescribes. Copies
    # pickled again by Python 3 (the JPEG pack's rebuild.py) have str keys: both read as str keys here.
    # (pickle runs code from the file: point --data-dir only at data you trust.)
    with f:
        d = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar10(data_dir):
    """(train_x, train_y, test_x, test_y, class names); images uint8 (N, 32, 32, 3), labels int64 (N,)."""
    b = open_batches(data_dir)

    def stack(names):
        # each row is 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32
        x = np.concatenate([b[n]["data"] for n in names]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([np.asarray(b[n]["labels"], dtype=np.int64) for n in names])
        return np.ascontiguousarray(x), y

    train_x, train_y = stack(BATCH_FILES[:5])
    test_x, test_y = stack(["test_batch"])
    classes = [c.decode() if isinstance(c, bytes) else c for c in b["batches.meta"]["label_names"]]
    return train_x, train_y, test_x, test_y, classes


class SubtractMeanImage:
    """x (3, 32, 32) in [0, 1] minus the training set's mean image: the paper's per-pixel mean subtraction,
    std left at 1. A class rather than a lambda so that DataLoader workers can pickle it."""

    def __init__(self, mean):
        self.mean = mean

    def __call__(self, x):
        return x - self.mean


def make_transforms(normalization, train_x):
    """(train transform, test transform) on PIL images."""
    if normalization == "pixel":
        mean_image = train_x.mean(0, dtype=np.float64) / 255               # (32, 32, 3) in [0, 1] units
        normalize = SubtractMeanImage(torch.from_numpy(mean_image).permute(2, 0, 1).float())
        # Caffe, which the paper used, subtracts the mean image first and pads the result with zeros, so a
        # padded pixel equals the mean pixel. We do the same: crop and flip the normalised tensor.
        train = transforms.Compose([transforms.ToTensor(), normalize,
                                    transforms.RandomCrop(32, padding=4, fill=0),
                                    transforms.RandomHorizontalFlip()])
    elif normalization == "channel":
        # The common textbook pipeline: per-channel mean/std, padding with black before normalising.
        pixels = torch.from_numpy(train_x).reshape(-1, 3).double() / 255   # (N*32*32, 3)
        normalize = transforms.Normalize(pixels.mean(0).tolist(), pixels.std(0).tolist())
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), normalize])
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    test = transforms.Compose([transforms.ToTensor(), normalize])
    return train, test


class CIFAR10(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------------------------------------------------
# Model: the CIFAR ResNet of §4.2 (6n+2 weighted layers, option A shortcuts)
# ----------------------------------------------------------------------------------------------------------
class ShortcutA(nn.Module):
    """Option A: identity on a stride-2 subsample, extra channels zero-padded. No parameters."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]             # (N, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))         # (N, C + extra, H/2, W/2), new channels 0


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (the paper's Fig. 2)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        same = stride == 1 and in_channels == out_channels
        self.shortcut = nn.Identity() if same else ShortcutA(in_channels, out_channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNets have 6n+2 layers; {depth} is not of that form")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):     # feature maps 32x32, 16x16, 8x8
            for i in range(n):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015

    def forward(self, x):                                     # x: (N, 3, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)                                    # (N, 64, 8, 8)
        return self.fc(x.mean((2, 3)))                        # global average pool, then (N, num_classes)


def resnet_cifar(depth=20, num_classes=10):
    return CifarResNet(depth, num_classes)


# ----------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------
def environment():
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        revision = git.stdout.strip() if git.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        revision = None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [], "git": revision}


def log(run_dir, record):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device):
    """Mean cross-entropy, top-1 and top-5 error (fractions) over the whole loader, BN in eval mode."""
    model.eval()
    loss = top1 = top5 = n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(5, dim=1).indices                      # (N, 5)
        top1 += (top[:, 0] != y).sum().item()
        top5 += (top != y[:, None]).all(dim=1).sum().item()
        n += len(y)
    model.train()
    return {"loss": loss / n, "top1_err": top1 / n, "top5_err": top5 / n, "n": n}


def train(args):
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = args.resume and (run_dir / "last.pt").is_file()
    if (run_dir / "metrics.jsonl").exists() and not resuming:
        if not args.resume:
            sys.exit(f"{run_dir} already holds a run: choose another --out, or pass --resume")
        # an evaluation is logged after its checkpoint is saved: a logged one without last.pt is a record kept apart
        # from its checkpoint (a finished run's results, say), which starting afresh would delete
        if '"kind": "eval"' in (run_dir / "metrics.jsonl").read_text():
            sys.exit(f"{run_dir} holds the log of an evaluated run but not its checkpoint (last.pt), so it cannot "
                     "be continued; choose another --out, or move the folder away to train it again")
        # --resume of an attempt stopped before its first checkpoint: nothing to continue, so it starts
        # afresh, without that attempt's log lines
        (run_dir / "metrics.jsonl").unlink()
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    iters = args.iters or round(ITERS * args.budget)
    budget = iters / ITERS if args.iters else args.budget
    milestones = [iters // 2, iters * 3 // 4]              # 32k and 48k of 64k, as in the paper
    eval_every = args.eval_every or max(1, iters // 32)

    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y, classes = load_cifar10(args.data_dir)
    train_tf, test_tf = make_transforms(args.normalization, train_x)
    cuda = device.type == "cuda"
    shuffle_rng = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(CIFAR10(train_x, train_y, train_tf), batch_size=args.batch_size, shuffle=True,
                              drop_last=True, num_workers=args.workers, pin_memory=cuda,
                              persistent_workers=args.workers > 0,
                              generator=shuffle_rng)
    test_loader = DataLoader(CIFAR10(test_x, test_y, test_tf), batch_size=500, shuffle=False,
                             num_workers=args.workers, pin_memory=cuda)
    print(f"data: {len(train_y)} train / {len(test_y)} test images, {len(classes)} classes, "
          f"{args.normalization} normalisation, loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    model = resnet_cifar(args.depth, len(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # stepped once per ITERATION, so the milestones are iteration counts, as in the paper
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=GAMMA)

    arch = f"resnet{args.depth}"
    config = {"implementation": "control", "script": "benchmarks/control_cifar.py",
              "command": shlex.join([Path(sys.executable).name, *sys.argv]), "arch": arch, "seed": args.seed,
              "precision": "fp32", "device": device.type, "eval_split": "test",
              "recipe": {"name": "cifar-paper", "iters": iters, "batch_size": args.batch_size, "lr": LR,
                         "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "milestones": milestones,
                         "gamma": GAMMA, "budget": budget, "eval_every": eval_every, "log_every": args.log_every,
                         "warmup": {"lr": WARMUP_LR, "until_train_err": WARMUP_UNTIL_ERR,
                                    "window": WARMUP_WINDOW} if args.depth >= 110 else None},
              "model_config": {"name": arch, "depth": args.depth, "shortcut": "A", "residual": True,
                               "num_classes": len(classes)},
              # which data this is, by the MD5 of the test images as the batch file stores them (N x 3072, each
              # image's red, green and blue planes): reslab records the same fingerprint, so a report can tell
              # whether both trained on one copy
              "data": {"dir": str(args.data_dir), "normalization": args.normalization, "train_size": len(train_y),
                       "test_size": len(test_y), "augmentation": "pad 4 + random crop 32, horizontal flip",
                       "test_pixels_md5": hashlib.md5(np.ascontiguousarray(test_x.transpose(0, 3, 1, 2)).tobytes()).hexdigest()},
              "workers": args.workers}
    if not resuming:  # a resumed run keeps the command that started it
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "env.json").write_text(json.dumps(environment(), indent=2))

    # The paper's warm-up for ResNet-110: lr 0.01 until the training error is below 80%, then 0.1 again.
    # It only overrides the lr the optimizer sees; the MultiStepLR schedule underneath runs on unchanged.
    warming_up = args.depth >= 110
    step, elapsed_before = 0, 0.0
    if resuming:  # continue from the last evaluation (the data order after it differs from an unbroken run)
        ckpt = torch.load(run_dir / "last.pt", map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, elapsed_before, warming_up = ckpt["step"], ckpt["elapsed_s"], ckpt["warming_up"]
        torch.manual_seed(args.seed + step)
        shuffle_rng.manual_seed(args.seed + step)
        # drop the lines logged after the checkpoint: those iterations are about to be run again
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if ckpt.get("eval") and not any('"kind": "eval"' in ln and json.loads(ln)["step"] == step for ln in kept):
            kept.append(json.dumps(ckpt["eval"]))  # killed between the save and the log write
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        print(f"resumed from step {step}", flush=True)
    recent_err = deque(maxlen=WARMUP_WINDOW)

    model.train()
    start = time.perf_counter() - elapsed_before              # elapsed_s counts training and evaluation
    tick, sum_loss, sum_wrong, seen = time.perf_counter(), 0.0, 0, 0
    last_eval = None
    while step < iters:
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            scheduled_lr = scheduler.get_last_lr()[0]
            lr = WARMUP_LR if warming_up else scheduled_lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr
            scheduler.step()
            step += 1

            wrong = (out.argmax(1) != y).sum()
            sum_loss, sum_wrong, seen = sum_loss + loss.detach() * len(y), sum_wrong + wrong, seen + len(y)
            if warming_up:
                recent_err.append(wrong.item() / len(y))
                if len(recent_err) == WARMUP_WINDOW and sum(recent_err) / WARMUP_WINDOW < WARMUP_UNTIL_ERR:
                    warming_up = False
                    print(f"step {step}: training error below {WARMUP_UNTIL_ERR:.0%}, warm-up over", flush=True)

            if step % args.log_every == 0 or step == iters:
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                rec = {"kind": "train", "step": step, "epoch": step * args.batch_size / len(train_y), "lr": lr,
                       "loss": float(sum_loss) / seen, "train_err": float(sum_wrong) / seen,
                       "images_per_s": seen / (now - tick), "elapsed_s": now - start}
                log(run_dir, rec)
                print(f"step {step}/{iters} lr {lr:g} loss {rec['loss']:.4f} train err {rec['train_err']:.2%} "
                      f"{rec['images_per_s']:.0f} img/s", flush=True)
                tick, sum_loss, sum_wrong, seen = now, 0.0, 0, 0

            if step % eval_every == 0 or step == iters:
                t_eval = time.perf_counter()
                last_eval = evaluate(model, test_loader, device)
                rec = {"kind": "eval", "step": step, "epoch": step * args.batch_size / len(train_y),
                       "split": "test", **last_eval, "elapsed_s": time.perf_counter() - start}
                # written beside and renamed: a kill mid-write leaves the previous last.pt whole; logged after,
                # so that no log shows an evaluation whose checkpoint a kill lost
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step, "warming_up": warming_up,
                            "elapsed_s": rec["elapsed_s"], "eval": rec}, run_dir / "last.pt.tmp")
                os.replace(run_dir / "last.pt.tmp", run_dir / "last.pt")
                log(run_dir, rec)
                print(f"step {step}/{iters} test loss {rec['loss']:.4f} top-1 err {rec['top1_err']:.2%} "
                      f"top-5 err {rec['top5_err']:.2%}", flush=True)
                tick += time.perf_counter() - t_eval  # images_per_s counts training time only
            if step == iters:
                break

    if last_eval is None:  # resumed a run that had already finished
        last_eval = evaluate(model, test_loader, device)
    wall = time.perf_counter() - start
    print(f"final test error {last_eval['top1_err']:.2%} (top-5 {last_eval['top5_err']:.2%}) on "
          f"{last_eval['n']} test images after {iters} iterations, {arch}, {wall / 60:.1f} min", flush=True)
    return last_eval


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True,
                   help="cifar-10-batches-py/, a folder holding it or cifar-10-python.tar.gz, or the archive")
    p.add_argument("--out", default=None, help="run folder (default runs/control-resnetDEPTH-sSEED)")
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110, 1202")
    p.add_argument("--normalization", choices=("pixel", "channel"), default="pixel",
                   help="pixel: the paper's per-pixel mean subtraction; channel: per-channel mean/std")
    p.add_argument("--budget", type=float, default=1.0, help=f"fraction of the paper's {ITERS} iterations")
    p.add_argument("--iters", type=int, default=None, help="iterations (overrides --budget)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--eval-every", type=int, default=None, help="iterations between test evaluations "
                   "(default iters/32)")
    p.add_argument("--log-every", type=int, default=20, help="iterations between training-metric lines")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/control-resnet{args.depth}-s{args.seed}"
    return args


if __name__ == "__main__":
    train(parse_args())
