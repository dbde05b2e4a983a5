"""Running a trained detector on image files and drawing its boxes (torchvision.utils.draw_bounding_boxes)."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes

from ..errors import ReslabError
from .data import Categories

# one colour per class, cycling: distinct hues that read on photographs
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


@torch.no_grad()
def detect(model, image_uint8: torch.Tensor, threshold: float, categories: Categories) -> list[dict]:
    """Detections scoring at least `threshold`: [{class, label, score, box (xyxy pixels)}], best first."""
    if not 0 <= threshold <= 1:
        raise ReslabError(f"--threshold must be in [0, 1], got {threshold}")
    h, w = image_uint8.shape[-2:]
    t = model.transform  # the detector resizes the shorter side to min_size, the longer to max_size at most
    if min(h, w) * min(t.min_size[-1] / min(h, w), t.max_size / max(h, w)) < 1:
        raise ReslabError(f"a {w}x{h} image is too elongated for this detector's sizes (shorter side {t.min_size[-1]}, "
                          f"longer side at most {t.max_size} px): its shorter side would shrink below 1 px; "
                          "crop it first")
    device = next(model.parameters()).device
    out = model([image_uint8.to(device).float() / 255])[0]
    keep = out["scores"] >= threshold
    return [{"class": categories.name(int(lab)), "label": int(lab), "score": float(s),
             "box": [round(float(v), 1) for v in b]}
            for b, lab, s in zip(out["boxes"][keep].cpu(), out["labels"][keep].cpu(), out["scores"][keep].cpu())]


def draw(image_uint8: torch.Tensor, dets: list[dict], out) -> Path:
    """The image with each detection's box and "class score" written as a PNG."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ReslabError(f"--out {out}: the drawing is written as PNG; give a .png path")
    if dets:
        boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32)
        labels = [f"{d['class']} {d['score']:.2f}" for d in dets]
        colors = [PALETTE[(d["label"] - 1) % len(PALETTE)] for d in dets]
        image_uint8 = draw_bounding_boxes(image_uint8, boxes, labels=labels, colors=colors, width=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.fromarray(image_uint8.permute(1, 2, 0).contiguous().numpy()).save(out)
    return out
