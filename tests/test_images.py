"""Reading image files (reslab.data.images): every format an image folder lists decodes to the RGB that
Pillow sees, 16-bit images are scaled the same whichever decoder reads them, hidden files are never data,
and a torchvision without its (deprecated) decoders still trains from folders on the CPU."""
import numpy as np
import pytest
import torch
from PIL import Image

from reslab.data import images
from reslab.data import folder as fold
from reslab.data.augment import Augment
from reslab.data.build import FolderStream, build
from reslab.errors import ReslabError
from reslab.predict import image_paths

from conftest import make_jpeg_folder


def rgb(h=24, w=36, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


FORMATS = {  # file name -> how to write it
    "rgb.bmp": lambda p: rgb().save(p),
    "rgb.tiff": lambda p: rgb().save(p),
    "cmyk.tif": lambda p: rgb().convert("CMYK").save(p),
    "rgb.ppm": lambda p: rgb().save(p),
    "grey.pgm": lambda p: rgb().convert("L").save(p),
    "rgb.webp": lambda p: rgb().save(p, lossless=True),
    "two-frames.gif": lambda p: rgb().save(p, save_all=True, append_images=[rgb(seed=1)]),
    "grey.jpg": lambda p: rgb().convert("L").save(p),
    "cmyk.jpg": lambda p: rgb().convert("CMYK").save(p),
    "progressive.JPG": lambda p: rgb().save(p, progressive=True),
    "rgba.png": lambda p: rgb().convert("RGBA").save(p),
    "palette.png": lambda p: rgb().convert("P").save(p),
    "one-bit.png": lambda p: rgb().convert("1").save(p),
}


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's about a read-only array, once per process
def test_every_format_decodes_to_the_rgb_pillow_sees(tmp_path):
    """BMP, TIFF, PPM/PGM (which torchvision's decoders refuse, though ImageFolder lists them) and every
    mode of the others: the same pixels as Pillow's RGB conversion (a GIF's first frame)."""
    for name, write in FORMATS.items():
        write(tmp_path / name)
        img = images.decode(str(tmp_path / name))
        want = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert img.dtype == torch.uint8 and img.shape == (3, 24, 36), name
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want), name


def test_sixteen_bit_images_are_scaled_alike_by_either_decoder(tmp_path):
    """A 16-bit PNG (torchvision) and the same pixels as a 16-bit TIFF or PGM (Pillow, which opens them in
    two different modes) give the same 8-bit image: scaled, not clipped at 255 as Pillow's own RGB
    conversion clips, and not wrapped around."""
    deep = (np.arange(24 * 36).reshape(24, 36) * 75).astype(np.uint16)  # 0 .. 64,725
    for name in ("deep.png", "deep.tiff", "deep.pgm"):
        Image.fromarray(deep).save(tmp_path / name)
    ascii_pgm = f"P2\n36 24\n65535\n{' '.join(map(str, deep.flatten()))}\n"  # Pillow writes only binary PGMs
    (tmp_path / "ascii.pgm").write_text(ascii_pgm)
    png, tiff, pgm, plain = (images.decode(str(tmp_path / n)) for n in ("deep.png", "deep.tiff", "deep.pgm",
                                                                         "ascii.pgm"))
    assert torch.equal(png, tiff) and torch.equal(png, pgm) and torch.equal(png, plain)
    assert torch.equal(png[0], torch.from_numpy((deep >> 8).astype(np.uint8))) and torch.equal(png[0], png[2])
    # 32-bit integer TIFFs (Pillow's mode "I", as for the PGM): 8-bit values stored wide are those values;
    # wider ones have no one scale
    Image.fromarray((deep >> 8).astype(np.int32), "I").save(tmp_path / "wide8.tiff")
    assert torch.equal(images.decode(str(tmp_path / "wide8.tiff")), png)
    Image.fromarray(deep.astype(np.int32), "I").save(tmp_path / "wide.tiff")
    with pytest.raises(ReslabError, match=r"wide.tiff: 32-bit or signed integer pixels \(values 0..64725\)"):
        images.decode(str(tmp_path / "wide.tiff"))
    (tmp_path / "signed.tiff").write_bytes(signed_16_bit_tiff(np.array([[-20000, 0], [100, 26000]], np.int16)))
    with pytest.raises(ReslabError, match=r"signed.tiff: 32-bit or signed integer pixels \(values -"):
        images.decode(str(tmp_path / "signed.tiff"))  # signed 16-bit: no one scale (it was wrapped around)
    Image.fromarray(deep.astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ReslabError, match="float.tiff: floating-point pixels"):
        images.decode(str(tmp_path / "float.tiff"))


def test_a_broken_file_is_named_in_one_line(tmp_path):
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    rgb().save(tmp_path / "whole.bmp")
    (tmp_path / "cut.bmp").write_bytes((tmp_path / "whole.bmp").read_bytes()[:1000])
    rgb().save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
    for name, says in (("text.jpg", "not an image"), ("empty.png", "empty file"),
                       ("cut.bmp", "cannot decode image .*truncated"), ("cut.jpg", "cannot decode image")):
        with pytest.raises(ReslabError, match=f"{name}: {says}") as e:
            images.decode(str(tmp_path / name))
        assert "\n" not in str(e.value) and ".cpp" not in str(e.value)


def test_hidden_files_and_folders_are_not_data(tmp_path):
    """macOS's `._x.jpg` resource forks, Jupyter's `.ipynb_checkpoints/` and a hidden folder inside a class
    are neither images nor classes, in an image folder and in `reslab predict`'s folder walk."""
    root = make_jpeg_folder(tmp_path / "imgs", per_class=2)
    for split in ("train", "val"):
        (root / split / "cat" / "._0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / "dog" / ".thumbs").mkdir()
        rgb().save(root / split / "dog" / ".thumbs" / "0.jpg")
    ds = fold.ImageFolderSplit(root, "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert not any("/." in p for p, _ in ds.samples)
    assert [p.name for p in image_paths([root / "val"])] == ["0.JPEG", "1.JPEG"] * 2


def test_an_empty_split_names_the_suffixes_it_looks_for(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.jfif").write_bytes(b"")
    with pytest.raises(ReslabError, match=r"no images in its class folders \(files ending .jpg, .jpeg"):
        fold.ImageFolderSplit(tmp_path, "train")


def test_a_folder_of_mixed_formats_trains_alike_on_both_decoding_paths(tmp_path):
    """BMP and TIFF files among the JPEGs: the device path (here the CPU, batched) decodes them in the
    workers, as the cpu path does, and both give the same batches."""
    root = make_jpeg_folder(tmp_path / "imgs", per_class=3, size=(40, 56))
    rgb(40, 56, seed=3).save(root / "train" / "cat" / "x.bmp")
    rgb(40, 56, seed=4).convert("CMYK").save(root / "train" / "dog" / "x.tiff")

    def batches(encoded):
        ds = fold.ImageFolderSplit(root, "train", augment=Augment.for_size("scale", 24), encoded=encoded)
        s = FolderStream(fold.make_loader(ds, 4, train=True, workers=0),
                         fold.Finisher(ds, "cpu", fold.imagenet_normalizer()))
        return list(s)

    a, b = batches(False), batches(True)
    assert len(a) == len(b) == 2
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_without_torchvisions_decoders_pillow_reads_everything(tmp_path, monkeypatch):
    """torchvision deprecates its decoders (0.29): where they are gone, Pillow decodes JPEGs and PNGs to the
    same pixels (both use libjpeg-turbo and libpng), turns photos upright when asked, and a folder run on the
    CPU decodes in the workers; asking for device decoding is a one-line error."""
    rgb().save(tmp_path / "a.jpg", quality=90)
    rgb().save(tmp_path / "a.png")
    im = rgb()
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(tmp_path / "side.jpg", exif=exif)
    tv = {n: images.decode(str(tmp_path / n)) for n in ("a.jpg", "a.png")}
    monkeypatch.setattr(images, "decode_image", None)
    monkeypatch.setattr(images, "decode_jpeg", None)
    for name, img in tv.items():
        assert torch.equal(images.decode(str(tmp_path / name)), img), name
    assert images.decode(str(tmp_path / "side.jpg")).shape == (3, 24, 36)
    assert images.decode(str(tmp_path / "side.jpg"), upright=True).shape == (3, 36, 24)
    root = make_jpeg_folder(tmp_path / "imgs", per_class=2)
    run = build("folder", root, batch_size=2, device="cpu", workers=0, augment=Augment.for_size("scale", 24))
    x, y = next(iter(run.train))
    assert x.shape == (2, 3, 24, 24)
    with pytest.raises(ReslabError, match="--decode device needs torchvision's decode_jpeg.*use --decode cpu"):
        build("folder", root, batch_size=2, device="cpu", workers=0, decode="device")


def signed_16_bit_tiff(a: np.ndarray) -> bytes:
    """A baseline TIFF of signed 16-bit grey samples (SampleFormat 2), which Pillow reads but cannot write."""
    import struct
    h, w = a.shape
    tags = [(256, 3, w), (257, 3, h), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 3, h), (279, 4, a.nbytes), (339, 3, 2)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\x00" + struct.pack("<I", 8 + a.nbytes) + a.astype("<i2").tobytes() + ifd + b"\x00" * 4
