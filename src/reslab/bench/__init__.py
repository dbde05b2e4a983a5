"""Benchmarks: training and inference throughput, each next to a baseline measured in the same run.

Training throughput is images/s of a full step (forward, backward, SGD). reslab's rows run the engine's own
TrainStep, so the bench times the code `reslab train` runs. Baselines: for the CIFAR nets, the same net in a
textbook eager fp32 loop fed by a torchvision DataLoader with per-sample transforms (the usual CIFAR
pipeline), against reslab's resident loader: both end to end, data included; for the 224x224 nets,
torchvision's ResNet in that eager loop, both on synthetic batches already on the device. Candidates run
interleaved with their baseline in rounds (shared machines drift; see harness.measure). No test asserts a
speed.

  flops.py      FLOP/s arithmetic and datasheet peaks
  harness.py    Setting, Plan, measure(): warm-up, interleaved rounds, medians and ratios
  baselines.py  the textbook loop, the DataLoader pipeline, synthetic inputs
  cases.py      CIFAR / 224x224 / inference / data benchmarks, each with its same-run baseline
  plans.py      what runs on each device (data), and run() which writes JSON + Markdown
  report.py     the Markdown table
"""
from .flops import PEAKS, achieved, peak_for, train_flops_per_image
from .plans import run
from .report import markdown

__all__ = ["PEAKS", "achieved", "markdown", "peak_for", "run", "train_flops_per_image"]
