"""`reslab export`: TorchScript, ONNX or safetensors, each checked against the PyTorch model before success.

The check runs the exported artefact and the PyTorch model on the same random batch and requires
max |difference| <= 1e-4 * max(1, max |reference|) (ONNX is run with onnxruntime, from the `export` extra).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import ReslabError
from .interop import load, save_safetensors

FORMATS = ("torchscript", "onnx", "safetensors")
SUFFIXES = {"torchscript": ".ts.pt", "onnx": ".onnx", "safetensors": ".safetensors"}


def _example(model) -> torch.Tensor:
    size = 32 if model.cfg.family == "cifar" else 224
    return torch.randn(2, model.cfg.in_channels, size, size, generator=torch.Generator().manual_seed(0))


def _check(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((got - ref).abs().max())
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    if not err <= tol:
        raise ReslabError(f"{name} export does not match the PyTorch model (max |diff| {err:.3g} > {tol:.3g}); "
                          "the file was written but should not be used")
    return err


@torch.no_grad()
def export(path, fmt: str, out) -> dict:
    if fmt not in FORMATS:
        raise ReslabError(f"unknown format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ReslabError(f"--out {out} is a folder; give the file to write, e.g. {out / ('model' + SUFFIXES[fmt])}")
    model = load(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model)
    ref = model(x)
    if fmt == "torchscript":
        traced = torch.jit.trace(model, x)
        traced.save(str(out))
        err = _check(fmt, torch.jit.load(str(out))(x), ref)
        files = [out]
    elif fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ReslabError("ONNX export is checked with onnxruntime: pip install 'reslab[export]'") from None
        torch.onnx.export(model, (x,), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        err = _check(fmt, torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), ref)
        files = [out]
    else:
        ck = ckpt.load(path) if Path(path).suffix != ".safetensors" else None
        if ck is None:
            raise ReslabError("the input is already safetensors")
        files = list(save_safetensors(ck, out))
        err = _check(fmt, load(out)(x), ref)
    return {"format": fmt, "files": [str(f) for f in files], "max_abs_diff": err}
