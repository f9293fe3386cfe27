"""Image files in and out: decoding any common file to uint8 RGB, writing safely (inputs: ``runtime.inputs``).

The engines only understand uint8 RGB [3,H,W]. Real folders hold more than that:
grayscale scans, PNGs with transparency, palette images, 16-bit TIFFs, CMYK JPEGs from
print workflows, phone photos stored sideways with an EXIF orientation tag. ``load_image``
turns each into RGB plus what is needed to give the output the input's form back
(grayscale flag, alpha plane), and records anything lossy in ``notes`` so the run report
says what happened instead of changing images silently.

A broken file is a user problem, not a crash: it raises ``ImageInputError`` with one
line naming the file, and a batch run reports it and goes on.

Outputs are written to a temporary dot-file next to the destination and renamed into
place (``os.replace`` is atomic on one file system), so an interrupted run never leaves a
half-written image that a later ``--skip-existing`` run would take for a finished one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dfosd.core.atomic import atomic_target
from dfosd.core.errors import DfosdError, ImageInputError
from dfosd.runtime.inputs import OUTPUT_FORMATS

# Largest side each encoder can hold; checked up front for a clear message.
_MAX_SIDE = {"jpg": 65_535, "webp": 16_383}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
NOTE_16BIT = "16-bit input written as 8-bit"
INT_RANGE_KEY = "dfosd_integer_range"  # img.info: (full scale, signed) of a mode-"I" image


class ImageOutputError(DfosdError, OSError):
    """An output that cannot be written as asked. Also an OSError, so callers that report
    write failures per file (and go on) catch it along with disk-full and permission errors."""


# ----------------------------------------------------------------------------- loading

@dataclass
class LoadedImage:
    path: Path
    rgb: torch.Tensor  # uint8 [3,H,W], what the model sees
    alpha: torch.Tensor | None  # uint8 [H,W] when the input had transparency
    grayscale: bool  # input had one colour channel: write the output as grayscale too
    notes: list[str] = field(default_factory=list)  # anything lossy or unusual, for the report
    icc_profile: bytes | None = None  # colour profile to carry over to the output


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if not path.is_file():
        raise ImageInputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageInputError(f"{path}: empty file (0 bytes)")


@contextlib.contextmanager
def _own_pixel_limit(active: bool):
    """Lift PIL's decompression-bomb check while ours (``max_pixels``) applies, so the limit
    the user set is the one that counts (PIL's refuses 179 MP whatever --max-pixels says).
    PIL keeps it in a module global: this is not for concurrent threads."""
    if not active:
        yield
        return
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def too_many_pixels(path: Path, width: int, height: int, max_pixels: int) -> ImageInputError:
    return ImageInputError(
        f"{path}: {width}x{height} is {width * height / 1e6:.1f} MP, over --max-pixels {max_pixels} "
        f"({max_pixels / 1e6:g} MP); not decoded",
        hint=f"pass --max-pixels {width * height} if the machine has the memory (about "
             f"{width * height * RUN_BYTES_PER_INPUT_PIXEL / 2**30:.1f} GiB), or downscale the image")


# Peak bytes per input pixel of a x4 run without colour fix (measured in BENCHMARKS.md: 745 MiB
# for 3000x3000, i.e. 1.81 x the uint8 output): the output image (4 bytes per output pixel in
# PIL, 16 output pixels per input pixel), the float band, the decoded input and its tensor.
RUN_BYTES_PER_INPUT_PIXEL = 88


def _decode(path: Path, max_pixels: int | None = None) -> tuple[Image.Image, bool, int]:
    """Open and fully decode; returns the image, whether the data was 16-bit, and the frame count.

    ``Image.open`` only reads the header; ``load()`` decodes the pixels, which is where a
    truncated or corrupt file fails. Doing it here turns that into one clear error. The
    header's size is checked against ``max_pixels`` first: a 166 KB PNG can declare
    12000x12000 pixels and ask for gigabytes once decoded.
    """
    try:
        with _own_pixel_limit(max_pixels is not None), Image.open(path) as img:
            if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
                raise too_many_pixels(path, *img.size, max_pixels)
            # PIL decodes 16-bit RGB PNGs straight to 8-bit "RGB"; only the raw mode tells.
            was_16bit = any(";16" in str(t.args) for t in img.tile)
            img.load()  # a GIF or multi-page TIFF: the first frame
            if img.mode == "I":  # the range of its integers is in the file's header, lost by copy()
                img.info[INT_RANGE_KEY] = _integer_range(img)
            frames = getattr(img, "n_frames", 1)
            return img.copy(), was_16bit, frames  # a copy: the with-block closes the file
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image PIL can read") from None
    except PermissionError as exc:
        raise ImageInputError(f"{path}: cannot read ({exc.strerror})") from None
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{path}: too large to decode safely ({exc})") from None
    except MemoryError:
        raise ImageInputError(f"{path}: not enough memory to decode it",
                              hint="lower --max-pixels to refuse such images up front, or downscale it") from None
    except Exception as exc:  # noqa: BLE001 - a decoder's error on a bad file is that file's problem
        # PIL reports bad data as many types: "image file is truncated" (OSError), "broken PNG
        # file" (SyntaxError), ValueError, EOFError, struct.error from a damaged header, ...
        raise ImageInputError(f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc})") from None


def _apply_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says (phones store photos sideways)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (None, 1):
            return img
        if orientation not in range(2, 9):  # exif_transpose leaves such an image as it is
            notes.append(f"EXIF orientation {orientation!r} is not valid (1-8); used as stored")
            return img
        out = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
        return out if out is not None else img
    except Exception as exc:  # a broken EXIF block should not cost the image
        notes.append(f"EXIF orientation unreadable ({exc}); used as stored")
        return img


def _integer_range(img: Image.Image) -> tuple[int, bool]:
    """(full scale, signed) of a mode-"I" image: 32-bit TIFFs say so in BitsPerSample (258) and
    SampleFormat (339: 2 signed, else unsigned); PIL's other "I" images are 16-bit."""
    tags = getattr(img, "tag_v2", None) or {}
    bits, sample_format = tags.get(258), tags.get(339)
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if img.format == "TIFF" and bits == 32:
        return (2**31 - 1, True) if sample_format == 2 else (2**32 - 1, False)
    return 65535, False


def _high_depth_to_l(img: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit, 32-bit or float single-channel image -> 8-bit "L".

    Integer modes are scaled from their full range: 0..65535 divided by 257 (65535 -> 255
    exactly); 32-bit TIFFs from 0..2^32-1 (unsigned) or 0..2^31-1 (signed, negatives as 0).
    Float ("F") as 0..1 when its maximum is at most 1, else like 16-bit.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        notes.append("floating-point input written as 8-bit")
        arr = np.nan_to_num(arr)
        full = 1.0 if arr.size and arr.max() <= 1.0 else 65535.0
    else:
        full, signed = img.info.get(INT_RANGE_KEY, (65535, False))
        if full > 65535:
            notes.append(f"32-bit {'signed ' if signed else ''}input written as 8-bit")
            arr = np.clip(arr, 0, None) if signed else arr % 2**32  # PIL holds unsigned 32-bit as int32
        else:
            notes.append(NOTE_16BIT)
    out = np.clip(np.round(arr / full * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _split_channels(img: Image.Image, notes: list[str]) -> tuple[Image.Image, Image.Image | None, bool]:
    """Any PIL mode -> (RGB image, alpha "L" image or None, grayscale?)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        img, mode = _high_depth_to_l(img, notes), "L"
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("P", "PA"):
        # Palette entries can be transparent ("transparency" in info): keep that as alpha.
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("L", "RGB") and "transparency" in img.info:  # one colour marked transparent (PNG tRNS)
        img = img.convert("LA" if mode == "L" else "RGBA")
        mode = img.mode
    if mode == "CMYK":
        notes.append("CMYK input converted to RGB")
        img, mode = img.convert("RGB"), "RGB"

    if mode == "L":
        return img.convert("RGB"), None, True
    if mode in ("LA", "La"):
        lum, alpha = img.convert("LA").split()
        return lum.convert("RGB"), alpha, True
    if mode in ("RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A"), False
    if mode == "RGB":
        return img, None, False
    try:  # YCbCr, LAB, HSV, RGBX, ...: PIL knows how
        return img.convert("RGB"), None, False
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"image mode {mode} is not supported ({exc})") from None


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)  # read-only view of PIL's buffer
    if arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    # Always a copy: ascontiguousarray returns the read-only view itself when it is already
    # contiguous (a 1x1 image), and torch warns about non-writable arrays.
    return torch.from_numpy(np.array(arr, dtype=np.uint8, order="C", copy=True))


def load_image(path: str | Path, max_pixels: int | None = None) -> LoadedImage:
    """Read any supported image file as uint8 RGB [3,H,W] (+ alpha, grayscale flag, notes).

    EXIF orientation is applied; grayscale (L/LA/1) is replicated to RGB and flagged;
    transparency (RGBA/LA/palette) is kept as a separate alpha plane; 16-bit and float
    data are scaled to 8-bit; CMYK is converted to RGB. Raises ``ImageInputError``
    (one line naming the file) for missing, empty, unreadable or truncated files, and for
    images over ``max_pixels`` (checked from the header, before decoding).
    """
    path = Path(path)
    _check_file(path)
    img, was_16bit, frames = _decode(path, max_pixels)
    notes: list[str] = []
    if was_16bit and img.mode not in _SIXTEEN_BIT_MODES:
        notes.append(NOTE_16BIT)  # PIL already reduced it; say so
    if frames > 1:
        notes.append(f"multi-frame image ({frames} frames): first frame only")
    # A CMYK profile does not describe the converted RGB; any other profile still applies.
    icc = img.info.get("icc_profile") if img.mode != "CMYK" else None
    img = _apply_orientation(img, notes)
    try:
        rgb, alpha, grayscale = _split_channels(img, notes)
    except ImageInputError as exc:
        raise ImageInputError(f"{path}: {exc.message}") from None
    return LoadedImage(path=path, rgb=_to_tensor(rgb), alpha=None if alpha is None else _to_tensor(alpha),
                       grayscale=grayscale, notes=notes, icc_profile=icc or None)


# ----------------------------------------------------------------------------- writing

class OutputCanvas:
    """The output image in the input's form (grayscale and/or alpha), filled row band by row band.

    ``write_rows(y, band)`` takes uint8 [3, rows, W*scale] output rows as the tiler
    finishes them, so no output-sized tensor is ever needed: the canvas (PIL's own
    image, 4 bytes per pixel for RGB/RGBA, 1-2 for grayscale) is the only output-sized
    buffer of a run. ``finish()`` attaches alpha and the colour profile.

    Grayscale inputs come back as "L" (the rounded mean of the three channels: the model
    may add a faint tint, which should not make a grayscale scan colour). Alpha is NOT
    super-resolved -- the model only sees RGB -- it is resized with PIL bicubic to the
    output size and put into the canvas (which is "LA"/"RGBA" from the start, so
    attaching it needs no second copy).
    """

    def __init__(self, loaded: LoadedImage, scale: int):
        h, w = loaded.rgb.shape[1:]
        self.loaded, self.width, self.height = loaded, w * scale, h * scale
        mode = "L" if loaded.grayscale else "RGB"
        if loaded.alpha is not None:
            mode = "LA" if loaded.grayscale else "RGBA"
        self.image = Image.new(mode, (self.width, self.height))

    def write_rows(self, y: int, band: torch.Tensor) -> None:
        if band.dtype != torch.uint8 or band.dim() != 3 or band.shape[0] != 3 or band.shape[2] != self.width \
                or not 0 <= y <= self.height - band.shape[1]:
            raise ValueError(f"expected uint8 [3,rows,{self.width}] rows within {self.height} for "
                             f"{self.loaded.path}, got {band.dtype} {tuple(band.shape)} at row {y}")
        band = band.contiguous()  # the same reduction kernel as for a whole image: identical bytes
        if self.loaded.grayscale:
            gray = torch.round(band.float().mean(0)).clamp(0, 255).to(torch.uint8)
            part = Image.fromarray(gray.numpy(), "L")
        else:
            part = Image.fromarray(np.ascontiguousarray(band.permute(1, 2, 0).numpy()), "RGB")
        self.image.paste(part, (0, y))  # into LA/RGBA: alpha 255 until finish() sets it

    def finish(self) -> Image.Image:
        out = self.image
        if self.loaded.alpha is not None:
            alpha = Image.fromarray(self.loaded.alpha.numpy(), "L").resize(out.size, Image.Resampling.BICUBIC)
            out.putalpha(alpha)  # in place: the canvas already has an alpha band
        if self.loaded.icc_profile:
            out.info["icc_profile"] = self.loaded.icc_profile
        return out


def compose_output(sr: torch.Tensor, loaded: LoadedImage, scale: int) -> Image.Image:
    """Give the whole uint8 SR output [3,H,W] the input's form (see ``OutputCanvas``)."""
    h, w = loaded.rgb.shape[1:]
    if sr.dtype != torch.uint8 or tuple(sr.shape) != (3, h * scale, w * scale):
        raise ValueError(f"expected uint8 [3,{h * scale},{w * scale}] for {loaded.path}, "
                         f"got {sr.dtype} {tuple(sr.shape)}")
    canvas = OutputCanvas(loaded, scale)
    canvas.write_rows(0, sr)
    return canvas.finish()


def _prepare_for_format(image: Image.Image, fmt: str) -> tuple[Image.Image, list[str]]:
    """Convert to a mode the format can hold; say what was lost."""
    notes = []
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if fmt == "jpg" and has_alpha:
        notes.append("alpha dropped: jpg has no alpha channel")
        gray = image.mode in ("LA", "La")
        image = image.convert("L" if gray else "RGB")
    elif fmt == "webp" and image.mode in ("L", "LA"):
        notes.append("grayscale stored as RGB: webp has no grayscale mode")
    side = _MAX_SIDE.get(fmt)
    if side is not None and max(image.size) > side:
        raise ImageOutputError(f"{fmt} holds at most {side} pixels per side, the output is "
                               f"{image.size[0]}x{image.size[1]}", hint="use --format png")
    return image, notes


def save_image_atomic(image: Image.Image, path: Path, fmt: str, quality: int = 95) -> list[str]:
    """Write ``image`` to ``path`` as ``fmt`` (png/jpg/webp) atomically; returns notes.

    The data goes to ".<name>.<random>.tmp" in the destination folder first (a dot-name:
    shell and Python globs of the outputs skip it, and it does not end in the image
    suffix), is flushed to disk, and is then renamed over ``path``. On any failure the
    temporary file is removed and the exception re-raised, so ``path`` is either the
    old file, absent, or the complete new image -- never a partial one.
    """
    if fmt not in OUTPUT_FORMATS:
        raise DfosdError(f"unknown output format {fmt!r}", hint=f"use one of: {', '.join(OUTPUT_FORMATS)}")
    image, notes = _prepare_for_format(image, fmt)
    pil_format = OUTPUT_FORMATS[fmt][0]
    params: dict = {} if fmt == "png" else {"quality": int(quality)}
    if image.info.get("icc_profile"):
        params["icc_profile"] = image.info["icc_profile"]

    with atomic_target(path, fsync=True) as tmp:  # the rename must not outlive the data in a crash
        with open(tmp, "wb") as fh:
            image.save(fh, format=pil_format, **params)
    return notes
