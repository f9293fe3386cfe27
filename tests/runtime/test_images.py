"""Image I/O on real files: input collection, every kind of input, bad files, atomic writes."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfosd.core.errors import DfosdError
from dfosd.runtime.images import (
    ImageInputError,
    ImageOutputError,
    LoadedImage,
    compose_output,
    load_image,
    save_image_atomic,
)
from dfosd.runtime.inputs import IMAGE_SUFFIXES, collect_inputs, output_path_for


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256x256x3 uint8, a real photo


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.camera()[::2, ::2])  # 256x256 uint8, a real grayscale photo


def chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def touch_png(path: Path, size=(4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


# ----------------------------------------------------------------------------- collect_inputs

def test_suffixes():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"} == set(IMAGE_SUFFIXES)


def test_collect_folder_is_recursive_sorted_and_mirrors_subfolders(tmp_path):
    root = tmp_path / "in"
    for rel in ["b.png", "a.PNG", "sub/c.JPG", "sub/deeper/d.webp", "sub/e.tiff", ".hidden.png", ".cache/f.png"]:
        touch_png(root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "clip.mov").write_bytes(b"\0")
    found = collect_inputs([str(root)])
    pairs = found.pairs
    assert found.problems == []
    assert [rel.as_posix() for _, rel in pairs] == ["a.PNG", "b.png", "sub/c.JPG", "sub/deeper/d.webp", "sub/e.tiff"]
    assert all(src == root / rel for src, rel in pairs)
    # the other files are named with the reason (hidden ones are left out)
    assert [(p.name, why.split(" (")[0]) for p, why in found.skipped] == [
        ("notes.txt", "not an image file name"), ("clip.mov", "not an image file name")]


def test_collect_files_globs_missing_and_duplicates(tmp_path):
    other = tmp_path / "other"
    d, f = touch_png(other / "d.png"), touch_png(other / "f.png")
    odd = other / "e.xyz"
    odd.write_bytes(b"whatever")  # given explicitly: kept, so load_image can report it
    (tmp_path / "empty").mkdir()
    inputs = [str(d), str(odd), str(other / "*.png"), str(tmp_path / "missing.png"),
              str(tmp_path / "nothing" / "*.png"), str(tmp_path / "empty"), str(d)]
    found = collect_inputs(inputs)
    pairs, problems = found.pairs, found.problems
    assert pairs == [(d, Path("d.png")), (odd, Path("e.xyz")), (f, Path("f.png"))]  # d.png once
    assert problems[0] == f"no such file or folder: {tmp_path / 'missing.png'}"
    assert problems[1] == f"no image files match: {tmp_path / 'nothing' / '*.png'}"
    assert problems[2].startswith("no image files") and problems[2].endswith(f"in folder: {tmp_path / 'empty'}")
    assert len(problems) == 3


def test_collect_reports_output_name_clashes(tmp_path):
    a1, a2 = touch_png(tmp_path / "x" / "a.png"), touch_png(tmp_path / "y" / "a.jpg")
    found = collect_inputs([str(a1), str(a2)])
    pairs, problems = found.pairs, found.problems
    assert pairs == [(a1, Path("a.png"))]
    assert len(problems) == 1 and str(a2) in problems[0] and str(a1) in problems[0]


def test_output_path_for(tmp_path):
    assert output_path_for(Path("sub/x.JPG"), tmp_path, "png") == tmp_path / "sub" / "x.png"
    assert output_path_for(Path("x.tar.tiff"), tmp_path, "jpg") == tmp_path / "x.tar.jpg"
    assert output_path_for(Path("noext"), tmp_path, "webp") == tmp_path / "noext.webp"
    with pytest.raises(DfosdError):
        output_path_for(Path("x.png"), tmp_path, "gif")
    with pytest.raises(ValueError):
        output_path_for(Path("../x.png"), tmp_path, "png")


# ----------------------------------------------------------------------------- load_image

def test_load_rgb_png_exact(tmp_path, astronaut):
    p = tmp_path / "astro.png"
    Image.fromarray(astronaut).save(p)
    img = load_image(p)
    assert isinstance(img, LoadedImage) and img.path == p
    assert img.rgb.dtype == torch.uint8 and torch.equal(img.rgb, chw(astronaut))
    assert img.alpha is None and not img.grayscale and img.notes == []


def test_load_grayscale(tmp_path, camera):
    p = tmp_path / "cam.png"
    Image.fromarray(camera).save(p)
    img = load_image(p)
    assert img.grayscale and img.alpha is None and img.rgb.shape == (3, 256, 256)
    for c in range(3):
        assert torch.equal(img.rgb[c], torch.from_numpy(camera))


def test_load_bilevel_is_grayscale(tmp_path, camera):
    p = tmp_path / "bw.png"
    Image.fromarray(camera).convert("1").save(p)
    img = load_image(p)
    assert img.grayscale and set(img.rgb.unique().tolist()) <= {0, 255}


def test_load_rgba_keeps_alpha(tmp_path, astronaut):
    alpha = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1))
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([astronaut, alpha]), "RGBA").save(p)
    img = load_image(p)
    assert not img.grayscale
    assert torch.equal(img.rgb, chw(astronaut)) and torch.equal(img.alpha, torch.from_numpy(alpha))


def test_load_gray_with_alpha(tmp_path, camera):
    alpha = np.full_like(camera, 128)
    p = tmp_path / "la.png"
    Image.fromarray(np.dstack([camera, alpha]), "LA").save(p)
    img = load_image(p)
    assert img.grayscale and torch.equal(img.alpha, torch.from_numpy(alpha))
    assert torch.equal(img.rgb[1], torch.from_numpy(camera))


def test_load_palette_with_transparency(tmp_path, astronaut):
    pal = Image.fromarray(astronaut).quantize(16)
    index = np.asarray(pal)
    transparent = int(index[0, 0])
    p = tmp_path / "pal.png"
    pal.save(p, transparency=transparent)
    img = load_image(p)
    assert img.alpha is not None and not img.grayscale
    assert torch.equal(img.alpha == 0, torch.from_numpy(index == transparent))
    expected = np.asarray(pal.convert("RGB"))
    assert torch.equal(img.rgb, chw(expected))


def test_load_palette_without_transparency(tmp_path, astronaut):
    p = tmp_path / "pal.bmp"
    Image.fromarray(astronaut).quantize(32).save(p)
    img = load_image(p)
    assert img.alpha is None and img.rgb.shape == (3, 256, 256)


def test_load_16bit_gray_png(tmp_path, camera):
    p = tmp_path / "g16.png"
    Image.fromarray(camera.astype(np.uint16) * 257).save(p)  # full 16-bit range
    assert Image.open(p).mode.startswith("I")
    img = load_image(p)
    assert img.grayscale and "16-bit input written as 8-bit" in img.notes
    assert torch.equal(img.rgb[0], torch.from_numpy(camera))  # x*257/257 == x: exact


def _png_rgb48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, encoded by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_load_16bit_rgb_png_is_noted(tmp_path, astronaut):
    p = tmp_path / "rgb48.png"
    p.write_bytes(_png_rgb48(astronaut[:32, :48].astype(np.uint16) * 257))
    img = load_image(p)
    assert "16-bit input written as 8-bit" in img.notes
    assert img.rgb.shape == (3, 32, 48)
    assert (img.rgb.int() - chw(astronaut[:32, :48]).int()).abs().max() <= 1


def test_load_float_tiff(tmp_path, camera):
    p = tmp_path / "f.tif"
    Image.fromarray(camera.astype(np.float32) / 255).save(p)
    img = load_image(p)
    assert img.grayscale and any("floating-point" in n for n in img.notes)
    assert (img.rgb[0].int() - torch.from_numpy(camera).int()).abs().max() <= 1


def test_load_applies_exif_orientation(tmp_path, astronaut):
    src = astronaut[:120, :200]  # landscape 120x200 (HxW)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write portrait shots
    p = tmp_path / "phone.jpg"
    Image.fromarray(src).save(p, quality=95, exif=exif)
    img = load_image(p)
    assert img.rgb.shape == (3, 200, 120)  # portrait after orientation
    assert any("EXIF orientation 6" in n for n in img.notes)
    cw = chw(np.rot90(src, k=-1))
    ccw = chw(np.rot90(src, k=1))
    assert (img.rgb.float() - cw.float()).abs().mean() < 4  # JPEG-close to the clockwise turn
    assert (img.rgb.float() - ccw.float()).abs().mean() > 20  # and not the other way round


def test_load_cmyk_jpeg(tmp_path, astronaut):
    p = tmp_path / "print.jpg"
    Image.fromarray(astronaut).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    img = load_image(p)
    assert img.rgb.shape == (3, 256, 256) and not img.grayscale
    assert any("CMYK" in n for n in img.notes)
    assert (img.rgb.float() - chw(astronaut).float()).abs().mean() < 6


def test_icc_profile_is_carried_over(tmp_path, astronaut):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    p = tmp_path / "icc.png"
    Image.fromarray(astronaut[:16, :16]).save(p, icc_profile=icc)
    img = load_image(p)
    assert img.icc_profile == icc
    sr = torch.zeros(3, 64, 64, dtype=torch.uint8)
    for fmt in ("png", "jpg", "webp"):
        out = tmp_path / f"out.{fmt}"
        save_image_atomic(compose_output(sr, img, 4), out, fmt)
        assert Image.open(out).info.get("icc_profile") == icc


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not an image PIL can read"),
    (lambda p: p.write_text("<html>oops</html>"), "not an image PIL can read"),
])
def test_bad_files_raise_one_clear_line(tmp_path, make, needle):
    p = tmp_path / "broken file.png"
    make(p)
    with pytest.raises(ImageInputError) as exc:
        load_image(p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg and "\n" not in msg
    assert isinstance(exc.value, DfosdError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_caught(tmp_path, astronaut, fmt):
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"half.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    with Image.open(p):  # the header alone still reads: only a full decode notices
        pass
    with pytest.raises(ImageInputError, match="truncated or corrupt") as exc:
        load_image(p)
    assert str(p) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageInputError, match="no such file"):
        load_image(tmp_path / "nope.png")


# ----------------------------------------------------------------------------- compose_output

def _loaded(h, w, *, grayscale=False, alpha=False) -> LoadedImage:
    a = torch.arange(h * w, dtype=torch.int64).reshape(h, w).remainder(256).to(torch.uint8) if alpha else None
    return LoadedImage(Path("x.png"), torch.zeros(3, h, w, dtype=torch.uint8), a, grayscale, [])


def test_compose_rgb_and_rgba(astronaut):
    sr = chw(astronaut)  # pretend 64x64 -> 256x256
    out = compose_output(sr, _loaded(64, 64), 4)
    assert out.mode == "RGB" and out.size == (256, 256)
    assert np.array_equal(np.asarray(out), astronaut)
    loaded = _loaded(64, 64, alpha=True)
    out = compose_output(sr, loaded, 4)
    assert out.mode == "RGBA" and out.size == (256, 256)
    expected_alpha = Image.fromarray(loaded.alpha.numpy()).resize((256, 256), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected_alpha))
    assert np.array_equal(np.asarray(out.convert("RGB")), astronaut)


def test_compose_grayscale_and_la():
    sr = torch.stack([torch.full((8, 12), v, dtype=torch.uint8) for v in (10, 11, 13)])  # mean 11.33
    out = compose_output(sr, _loaded(2, 3, grayscale=True), 4)
    assert out.mode == "L" and out.size == (12, 8) and set(np.asarray(out).ravel()) == {11}
    out = compose_output(sr, _loaded(2, 3, grayscale=True, alpha=True), 4)
    assert out.mode == "LA" and out.size == (12, 8)


def test_compose_rejects_wrong_size():
    with pytest.raises(ValueError):
        compose_output(torch.zeros(3, 8, 8, dtype=torch.uint8), _loaded(3, 3), 4)


# ----------------------------------------------------------------------------- save_image_atomic

def test_save_formats_roundtrip_and_leave_no_temp(tmp_path, astronaut):
    img = Image.fromarray(astronaut)
    for fmt in ("png", "jpg", "webp"):
        dst = tmp_path / "deep" / "er" / f"x.{fmt}"
        assert save_image_atomic(img, dst, fmt, quality=90) == []
        back = np.asarray(Image.open(dst).convert("RGB")).astype(int)
        assert back.shape == astronaut.shape
        assert np.abs(back - astronaut).mean() < (0.001 if fmt == "png" else 4)
    assert sorted(os.listdir(tmp_path / "deep" / "er")) == ["x.jpg", "x.png", "x.webp"]


def test_save_overwrites_atomically(tmp_path):
    dst = tmp_path / "x.png"
    save_image_atomic(Image.new("RGB", (4, 4), (255, 0, 0)), dst, "png")
    save_image_atomic(Image.new("RGB", (4, 4), (0, 0, 255)), dst, "png")
    assert Image.open(dst).getpixel((0, 0)) == (0, 0, 255) and os.listdir(tmp_path) == ["x.png"]


def test_save_jpg_drops_alpha_with_a_note(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 128))
    notes = save_image_atomic(rgba, tmp_path / "a.jpg", "jpg")
    assert notes == ["alpha dropped: jpg has no alpha channel"]
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    notes = save_image_atomic(Image.new("LA", (8, 8), (90, 10)), tmp_path / "g.jpg", "jpg")
    assert notes and Image.open(tmp_path / "g.jpg").mode == "L"
    # png and webp keep it
    assert save_image_atomic(rgba, tmp_path / "a.png", "png") == []
    assert Image.open(tmp_path / "a.png").mode == "RGBA"
    assert save_image_atomic(rgba, tmp_path / "a.webp", "webp") == []
    assert Image.open(tmp_path / "a.webp").mode == "RGBA"


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial data")
        raise OSError("disk full (simulated)")

    old = tmp_path / "keep.png"
    save_image_atomic(Image.new("RGB", (4, 4), (1, 2, 3)), old, "png")
    before = old.read_bytes()
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "new.png", "png")
    with pytest.raises(OSError, match="simulated"):
        save_image_atomic(Image.new("RGB", (4, 4)), old, "png")
    assert os.listdir(tmp_path) == ["keep.png"]  # no partial new.png, no temp files
    assert old.read_bytes() == before  # the previous output is untouched


def test_save_too_large_for_format_is_a_clear_write_error(tmp_path):
    with pytest.raises(ImageOutputError, match="webp holds at most 16383") as exc:
        save_image_atomic(Image.new("L", (16_384, 1)), tmp_path / "wide.webp", "webp")
    assert isinstance(exc.value, OSError)  # batch runners report write errors per file
    assert not (tmp_path / "wide.webp").exists()
    with pytest.raises(DfosdError, match="unknown output format"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.gif", "gif")


# ----------------------------------------------------------------------------- hostile inputs

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds a few bytes of (zero) data:
    decoding it would need width*height*4 bytes; its header costs nothing to read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + \
        chunk(b"IEND", b"")


def test_max_pixels_is_checked_from_the_header_before_decoding(tmp_path):
    from dfosd.runtime.inputs import DEFAULT_MAX_PIXELS

    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(12000, 12000))  # 144 MP: PIL's own limit would call it a bomb
    with pytest.raises(ImageInputError) as exc:
        load_image(p, max_pixels=DEFAULT_MAX_PIXELS)
    msg = str(exc.value)
    assert "bomb.png: 12000x12000 is 144.0 MP, over --max-pixels 25000000" in msg and "--max-pixels 144000000" in msg
    # Ours replaces PIL's limit (an error past 179 MP, raised while opening): a 200 MP header
    # gets our message, and PIL's global is left as it was.
    p.write_bytes(_png_header_only(20000, 10000))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageInputError, match="20000x10000 is 200.0 MP, over --max-pixels 150000000"):
        load_image(p, max_pixels=150_000_000)
    assert Image.MAX_IMAGE_PIXELS == before
    touch_png(tmp_path / "ok.png", (100, 50))
    assert load_image(tmp_path / "ok.png", max_pixels=5000).rgb.shape == (3, 50, 100)  # exactly at the limit


def test_gif_is_read_by_its_first_frame(tmp_path, astronaut):
    frames = [Image.fromarray(astronaut[:64, :48]).quantize(64), Image.new("P", (48, 64), 3)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    img = load_image(p)
    assert img.rgb.shape == (3, 64, 48) and any("2 frames" in n for n in img.notes)
    assert torch.equal(img.rgb, chw(np.asarray(frames[0].convert("RGB"))))


@pytest.mark.parametrize("orientation", [0, 9, 300])
def test_invalid_exif_orientation_is_not_reported_as_applied(tmp_path, astronaut, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "odd.jpg"
    Image.fromarray(astronaut[:40, :60]).save(p, quality=95, exif=exif)
    img = load_image(p)
    assert img.rgb.shape == (3, 40, 60)  # used as stored
    assert not any("applied" in n for n in img.notes)
    assert any(f"EXIF orientation {orientation} is not valid" in n for n in img.notes)


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_one_pixel_inputs_load_without_warnings(tmp_path, size, mode):
    import warnings

    p = tmp_path / "dot.png"
    Image.new(mode, size, 200).save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given NumPy array is not writable" was one
        img = load_image(p)
        img.rgb[0, 0, 0] = 1  # a tensor of its own, writable
        sr = torch.zeros(3, size[1] * 4, size[0] * 4, dtype=torch.uint8)
        assert compose_output(sr, img, 4).size == (size[0] * 4, size[1] * 4)


def test_output_canvas_rows_equal_compose_output(astronaut):
    from dfosd.runtime.images import OutputCanvas

    for gray, alpha in [(False, None), (True, None), (False, torch.full((30, 20), 77, dtype=torch.uint8)),
                        (True, torch.arange(600, dtype=torch.int32).reshape(30, 20).remainder(256).to(torch.uint8))]:
        lr = chw(astronaut[:30, :20])
        loaded = LoadedImage(path=Path("x.png"), rgb=lr, alpha=alpha, grayscale=gray, icc_profile=b"icc")
        sr = chw(np.ascontiguousarray(astronaut[:120, :80]))
        whole = compose_output(sr, loaded, 4)
        canvas = OutputCanvas(loaded, 4)
        for y in range(0, 120, 50):  # bands of 50, 50, 20 rows
            canvas.write_rows(y, sr[:, y:y + 50])
        banded = canvas.finish()
        assert banded.mode == whole.mode and banded.info["icc_profile"] == b"icc"
        assert np.array_equal(np.asarray(banded), np.asarray(whole))
    with pytest.raises(ValueError, match="rows within"):
        canvas.write_rows(100, sr[:, :50])


def test_32_bit_tiffs_are_scaled_from_their_own_range(tmp_path):
    """A 32-bit TIFF divided by 65535 was near-binary: its range is read from the header."""
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    want = np.round(ramp * 255).astype(np.uint8)
    Image.fromarray((ramp * (2**31 - 1)).astype(np.int32)).save(tmp_path / "signed.tif")  # PIL: SampleFormat 2
    img = load_image(tmp_path / "signed.tif")
    assert Image.open(tmp_path / "signed.tif").mode == "I" and img.notes == ["32-bit signed input written as 8-bit"]
    assert np.abs(img.rgb[0].numpy().astype(int) - want).max() <= 1
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "unsigned.tif", (ramp * (2**32 - 1)).astype(np.uint32))
    img = load_image(tmp_path / "unsigned.tif")
    assert img.notes == ["32-bit input written as 8-bit"] and np.abs(img.rgb[0].numpy().astype(int) - want).max() <= 1
    sixteen = (ramp * 65535).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "16.tif")
    assert np.abs(load_image(tmp_path / "16.tif").rgb[0].numpy().astype(int) - want).max() <= 1
