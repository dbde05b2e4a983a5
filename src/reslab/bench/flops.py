"""FLOP arithmetic for throughput figures: 6 x forward MACs per trained image (2 per multiply-add, x3 for
the backward pass), 2 x MACs per inferred image, and datasheet peaks to put them against."""
from __future__ import annotations

# dense peak FLOP/s by device name fragment and precision (vendor datasheets; leads, not measurements)
PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}, "H200": {"bf16": 989e12, "fp16": 989e12,
                                                                             "fp32": 494e12},
         "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}}


def train_flops_per_image(macs: int) -> float:
    return 6.0 * macs


def achieved(images_per_s: float, macs: int, train: bool = True) -> float:
    return images_per_s * (train_flops_per_image(macs) if train else 2.0 * macs)


def peak_for(device_name: str, precision: str) -> float | None:
    for key, table in PEAKS.items():
        if key in device_name:
            return table.get(precision)
    return None


