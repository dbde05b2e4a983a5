"""Run folders: the resolved config, the environment, JSONL metrics, and a progress display.

    RUN/config.json     everything needed to rerun: model config, recipe, data, seed, precision, ...
    RUN/env.json        library versions, git revision, hardware
    RUN/metrics.jsonl   one JSON object per line: {"kind": "train"|"eval", step, epoch, lr, loss, ...}
    RUN/last.pt, RUN/best.pt
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import ReslabError


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None, world_size: int = 1) -> dict:
    """Versions and hardware; with `device`, the device the run used and how many ranks it had (the GPUs a
    host has are not the ones a run used: a CPU run on a GPU host, four ranks on an eight-GPU host)."""
    import numpy
    import torchvision
    from . import __version__
    env = {
        "reslab": __version__, "git": git_revision(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if device is not None:
        env.update(device=device.type, world_size=world_size)
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env


def hardware_line(env: dict) -> str:
    """What a run ran on: the GPU it used times its ranks, or the CPU. Records from before the device was
    kept name the host's GPUs, if it had any."""
    cpu = f"{env['cpu']} ({env['cpu_count']} cores)"
    if "device" in env:
        return f"{env['gpu']} x{env.get('world_size', 1)}" if env["device"] == "cuda" else \
            cpu + (f" x{env['world_size']} ranks" if env.get("world_size", 1) > 1 else "")
    return f"{env['gpus'][0]} x{len(env['gpus'])}" if env.get("gpus") else cpu


def session_environment(previous: dict | None, device: torch.device, world_size: int) -> dict:
    """env.json for a session of a run: this session's environment, and under "earlier" those of the
    sessions before it that differ from it in hardware, torch or code (a run resumed on another machine
    says so: its numbers are not one machine's)."""
    env = environment(device, world_size)
    if isinstance(previous, dict) and all(isinstance(e, dict) for e in previous.get("earlier", [])):
        seen = previous.pop("earlier", []) + [previous]
        def what(e):
            return hardware_line(e), e.get("torch"), e.get("git")
        earlier = [e for e in seen if what(e) != what(env)]
        if earlier:
            env["earlier"] = earlier
    return env


class MetricsLog:
    """Appends JSON lines to RUN/metrics.jsonl (flushed per line) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'")
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:  # the last line, torn by a kill mid-write: the run resumes before it
                break
            raise ReslabError(f"{path}, line {i + 1}: not a JSON line ({e}); the log is damaged") from None
    return out


def last_evaluation(run_dir) -> dict | None:
    """The last evaluation a run folder's log records (None: none). Every evaluation is followed by a
    checkpoint, so a log that has one and a folder without last.pt means the checkpoint went missing."""
    return next((r for r in reversed(read_metrics(run_dir)) if r.get("kind") == "eval"), None)


class Progress:
    """A tqdm bar with throughput and ETA on a terminal; plain lines (one per log interval) otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True, label: str = ""):
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = None
        self.prefix = f"{label}: " if label else ""
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=sys.stderr,
                            desc=label or None)
        self.total, self.t0, self.s0 = total, time.time(), start

    def update(self, step: int, n: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(text)
        else:
            rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            print(f"{self.prefix}step {step}/{self.total} {text} | {rate:.1f} it/s, eta {eta / 60:.1f} min", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def truncate_metrics(run_dir, step: int, evaluation: dict | None = None) -> None:
    """Lines logged after the checkpoint belong to steps that will be run again: drop them. `evaluation` (the
    checkpoint's own record of its evaluation) goes back in if a kill between the save and the log write
    lost its line: a run saves before it logs, so that no log ever shows an evaluation without its
    checkpoint."""
    p = Path(run_dir) / "metrics.jsonl"
    keep, evaluated = [], False
    text = p.read_text() if p.is_file() else ""
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
            if rec["step"] <= step:
                keep.append(ln)
                evaluated |= rec.get("kind") == "eval" and rec["step"] == step
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
    if evaluation and evaluation.get("kind") == "eval" and evaluation.get("step") == step and not evaluated:
        keep.append(json.dumps(evaluation))
    new = "".join(ln + "\n" for ln in keep)
    if new != text and (keep or p.is_file()):
        write_text_atomic(p, new)
