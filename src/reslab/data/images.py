"""Image files to uint8 RGB (3, H, W) tensors on the CPU, whatever their format.

JPEGs and PNGs, nearly every file of a real dataset, go through torchvision's decoders (libjpeg-turbo,
libpng), which decode straight into tensors. Everything else ImageFolder lists (BMP, TIFF, PPM/PGM, WebP)
and GIFs go through Pillow, as do JPEGs and PNGs that torchvision refuses, and all files where the
installed torchvision has no image decoders (they are deprecated since 0.29 in favour of TorchCodec, whose
JPEG decoder always applies EXIF orientation, which training must not do). Both read a file as stored
unless asked to turn it upright, and scale 16-bit images to 8 bits rather than clip or wrap them.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ..errors import ReslabError

try:  # absent from a torchvision that has dropped its deprecated decoders
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:
    ImageReadMode = decode_image = decode_jpeg = None

FOLDER_SUFFIXES = IMG_EXTENSIONS            # what an image folder's splits hold (torchvision's ImageFolder)
IMAGE_SUFFIXES = (*IMG_EXTENSIONS, ".gif")  # what `reslab predict` reads from a folder


def is_image_file(path, below: Path | None = None, suffixes=FOLDER_SUFFIXES) -> bool:
    """An image by its suffix (any case), and not hidden: no part of its path below `below` starts with a
    dot, as macOS's `._photo.jpg` resource forks and Jupyter's `.ipynb_checkpoints/` do; they are never data."""
    p = Path(path)
    parts = Path(os.path.relpath(p, below)).parts if below is not None else (p.name,)
    return p.suffix.lower() in suffixes and not any(s.startswith(".") for s in parts)


def device_decoding() -> bool:
    """Whether JPEGs can be decoded in batches on a GPU (torchvision's nvJPEG-backed decode_jpeg)."""
    return decode_jpeg is not None


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor in ordinary memory (torchvision's read_file maps the file, and a
    mapped storage cannot be handed from a DataLoader worker to the main process)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ReslabError(f"{path}: cannot read ({e.strerror})") from None
    if not raw:
        raise ReslabError(f"{path}: empty file, not an image")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def is_png(data: torch.Tensor) -> bool:
    return data.numel() > 8 and data[:8].tolist() == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]


def jpeg_size(path: str, data: torch.Tensor) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it (Pillow reads the header lazily)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            w, h = im.size
    except Exception as e:
        raise ReslabError(f"{path}: cannot read the JPEG header ({type(e).__name__}: {e})") from None
    return h, w


def decode(path: str, data: torch.Tensor | None = None, upright: bool = False) -> torch.Tensor:
    """A file (or its bytes, already read) as a uint8 RGB (3, H, W) tensor. `upright`: turned as its EXIF
    orientation says (a phone's photo as its owner sees it); training data is read as stored, as PIL-based
    pipelines read ImageNet."""
    data = read_bytes(path) if data is None else data
    if decode_image is not None and (is_jpeg(data) or is_png(data)):
        try:
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=upright)
        except Exception as e:  # torchvision raises RuntimeError for many decoder failures; Pillow may cope
            try:
                return pil_decode(path, data, upright)
            except ReslabError:
                raise ReslabError(f"{path}: cannot decode image ({reason(e)})") from None
        # 16-bit PNGs decode to uint16: scale them, as storing them in uint8 would wrap around
        return img if img.dtype == torch.uint8 else v2.functional.to_dtype(img, torch.uint8, scale=True)
    return pil_decode(path, data, upright)


def pil_decode(path: str, data: torch.Tensor, upright: bool = False) -> torch.Tensor:
    """decode() by Pillow: the first frame of a multi-frame file; 16-bit grey scaled to 8 bits as
    torchvision scales a 16-bit PNG; floating-point and 32-bit images refused, having no one scale."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            sixteen = stored_as_16_bit(im)  # read from the file's layout, before a transpose loads it
            if upright:
                im = ImageOps.exif_transpose(im)
            arr = deep_gray(im, sixteen)
            if arr is None:
                arr = np.array(im.convert("RGB"))  # a copy: a read-only array makes torch warn
    except ReslabError as e:
        raise ReslabError(f"{path}: {e}") from None
    except UnidentifiedImageError:
        raise ReslabError(f"{path}: not an image (its bytes are in no format torchvision or Pillow reads)") from None
    except Exception as e:  # truncated files, decompression bombs, broken headers
        raise ReslabError(f"{path}: cannot decode image ({reason(e)})") from None
    img = torch.from_numpy(arr)
    if img.ndim == 2:  # 16-bit grey
        return v2.functional.to_dtype(img[None], torch.uint8, scale=True).expand(3, -1, -1).contiguous()
    return img.permute(2, 0, 1).contiguous()


def stored_as_16_bit(im) -> bool:
    """Whether the file stores 16-bit samples. Pillow opens a 16-bit PGM in mode "I", as it opens a 32-bit
    TIFF; only the raw mode of the file's pixel data tells them apart."""
    for tile in im.tile or []:
        args = tile[3] if isinstance(tile[3], tuple) else (tile[3],)
        if isinstance(args[0], str) and args[0].startswith("I;16"):
            return not args[0].endswith("S")  # I;16S, I;16BS: signed, no one scale (refused below)
        if tile[0] in ("ppm", "ppm_plain") and any(isinstance(a, int) and a > 255 for a in args[1:]):
            return True  # a PGM whose maximum value needs 16 bits (ASCII P2, or binary with maxval < 65535)
    return False


def deep_gray(im, sixteen: bool) -> np.ndarray | None:
    """A grey image of more than 8 bits as uint16 (H, W), or None for what Pillow converts to RGB itself
    (its own conversion clips every value above 255, right only for 8-bit values)."""
    if im.mode.startswith("I;16") or (im.mode == "I" and sixteen):
        return np.asarray(im).astype(np.uint16)
    if im.mode == "I":  # 32-bit integers: 8-bit values stored wide are kept; others have no one scale
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ReslabError(f"32-bit or signed integer pixels (values {arr.min()}..{arr.max()}); "
                              "save it with 8 or 16 bits, unsigned")
        return None
    if im.mode == "F":
        raise ReslabError("floating-point pixels; save it with 8 or 16 bits")
    return None


CPP_LOCATION = re.compile(r"\.cpp:\d+, ")


def reason(e: Exception) -> str:
    """A decoder's error in one line, without the C++ source location torchvision puts first."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {CPP_LOCATION.split(first)[-1]}"
