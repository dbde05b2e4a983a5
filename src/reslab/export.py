"""`reslab export`: TorchScript, ONNX or safetensors, each checked against the PyTorch model before success.

The check runs the exported artefact and the PyTorch model on the same random batches, at the model's test
view and at a larger non-square size, and requires max |difference| <= 1e-4 * max(1, max |reference|) on
each (ONNX is run with onnxruntime, from the `export` extra).

TorchScript and ONNX files hold the network alone (inputs normalised as the run normalised them), or with
`with_normalizer` the run's normalisation too: the graph then takes uint8 RGB images, the form a decoder
gives, and needs nothing else from reslab.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .errors import ReslabError
from .interop import load, refuse_to_overwrite, save_safetensors

FORMATS = ("torchscript", "onnx", "safetensors")
SUFFIXES = {"torchscript": ".ts.pt", "onnx": ".onnx", "safetensors": ".safetensors"}


class WithNormalizer(nn.Module):
    """uint8 (N, C, H, W) images -> the model's logits, the run's Normalizer inside. A per-pixel mean image
    is resized to the input's size as Normalizer.mean_at does for multi-scale tests; at its own size that
    resize is the identity (bilinear at scale 1), so it is applied to every input and the traced graph keeps
    height and width free."""

    def __init__(self, model: nn.Module, normalizer):
        super().__init__()
        self.model, self.pixel = model, normalizer.mode == "pixel"
        self.register_buffer("mean", normalizer.mean.float()[None].clone())   # (1, C, H, W) or (1, C, 1, 1)
        self.register_buffer("std", normalizer.std.float()[None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (F.interpolate(self.mean, size=(x.shape[-2], x.shape[-1]), mode="bilinear", align_corners=False)
                if self.pixel else self.mean)
        return self.model((x.float() / 255 - mean) / self.std)


def _examples(model) -> list[torch.Tensor]:
    """Batches to export with and check on: the model's own test view (predict.view_size: a run trained at
    --crop-size 32 is tested at 32, not 224), then another batch size at a larger, non-square size, as
    multi-scale testing feeds it (the exported graph takes any batch, height and width)."""
    from .predict import view_size
    r = model.reslab
    s = view_size(model.cfg.family, r.get("crop_size"), r.get("data"))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, model.cfg.in_channels, s, s, generator=g),
            torch.randn(1, model.cfg.in_channels, s + s // 4, s + s // 2, generator=g)]


def _check(name: str, run, reference, xs: list[torch.Tensor]) -> float:
    """max |difference| between the exported artefact (`run`) and the PyTorch model (`reference`) over the
    example batches."""
    worst = 0.0
    for x in xs:
        ref, got = reference(x), run(x)
        err = float((got - ref).abs().max())
        tol = 1e-4 * max(1.0, float(ref.abs().max()))
        if not err <= tol:
            raise ReslabError(f"{name} export does not match the PyTorch model on a {tuple(x.shape)} batch (max "
                              f"|diff| {err:.3g} > {tol:.3g}); the file was written but should not be used")
        worst = max(worst, err)
    return worst


@torch.no_grad()
def export(path, fmt: str, out, with_normalizer: bool = False, force: bool = False) -> dict:
    """Write the model at `path` (a checkpoint, run folder, or converted file) as `fmt` to `out`, then check
    the file against the PyTorch model. Existing output files are replaced only with `force`."""
    if fmt not in FORMATS:
        raise ReslabError(f"unknown format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    if with_normalizer and fmt == "safetensors":
        raise ReslabError("--with-normalizer is for torchscript and onnx: safetensors files carry the normaliser "
                          "already (reslab_normalizer.* and the sidecar's mode)")
    out = Path(out)
    if out.is_dir():
        raise ReslabError(f"--out {out} is a folder; give the file to write, e.g. {out / ('model' + SUFFIXES[fmt])}")
    if fmt == "safetensors" and out.suffix != ".safetensors":
        # reslab.load (and predict, eval) tell a safetensors file from a checkpoint by its suffix
        raise ReslabError(f"--out {out}: a safetensors file must end in .safetensors, e.g. {out}.safetensors")
    refuse_to_overwrite([out, out.with_suffix(".json")] if fmt == "safetensors" else [out], force)
    model = load(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    xs = _examples(model)
    reference = model
    if with_normalizer:  # uint8 images in; checked against the model fed by the run's own Normalizer
        norm = model.reslab["normalizer"]
        reference = lambda x, net=model: net(norm(x))  # noqa: E731
        model = WithNormalizer(model, norm).eval()
        g = torch.Generator().manual_seed(1)
        xs = [torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8) for x in xs]
    if fmt == "torchscript":
        torch.jit.trace(model, xs[0]).save(str(out))
        err = _check(fmt, torch.jit.load(str(out)), reference, xs)
        files = [out]
    elif fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ReslabError("ONNX export is checked with onnxruntime: pip install 'reslab[export]'") from None
        torch.onnx.export(model, (xs[0],), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
                          dynamo=False)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        err = _check(fmt, lambda x: torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), reference, xs)
        files = [out]
    else:
        ck = ckpt.load(path) if Path(path).suffix != ".safetensors" else None
        if ck is None:
            raise ReslabError("the input is already safetensors")
        files = list(save_safetensors(ck, out))
        err = _check(fmt, load(out), reference, xs)
    return {"format": fmt, "files": [str(f) for f in files], "max_abs_diff": err, "view_size": xs[0].shape[-1],
            "input": "uint8 RGB images, normalised inside" if with_normalizer else "normalised float images"}
