"""HR folder dataset, resumable sampler and pair dumps, on real photos from scikit-image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dfosd.core.errors import DfosdError
from dfosd.training.data import HRImageFolder, ResumableSampler, dump_pairs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


skd = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(skd.astronaut()).save(root / "astronaut.png")          # 512x512
    Image.fromarray(skd.coffee()).save(root / "sub" / "coffee.jpg", quality=92)  # 400x600
    Image.fromarray(skd.chelsea()).save(root / "sub" / "deeper" / "chelsea.JPEG")  # 300x451
    (root / "notes.txt").write_text("not an image")
    return root


def test_finds_images_recursively_and_crops(photo_dir):
    ds = HRImageFolder(photo_dir, crop=128)
    assert len(ds) == 3
    assert {p.name for p in ds.files} == {"astronaut.png", "coffee.jpg", "chelsea.JPEG"}
    for i in range(len(ds)):
        x = ds[(i, 7)]
        assert x.shape == (3, 128, 128) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert float(x.std()) > 0.02  # a real photo crop, not padding
    assert torch.equal(ds[(0, 11)], ds[(0, 11)])  # the item seed fixes crop and flip
    assert ds[0].shape == (3, 128, 128)  # plain index: fresh random crop


def test_crop_matches_source_pixels(photo_dir):
    ds = HRImageFolder(photo_dir, crop=64, flip=False)
    i = [p.name for p in ds.files].index("astronaut.png")
    src = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float() / 255.0
    x = ds[(i, 3)]
    # find the crop: it must equal some window of the source exactly
    unf = src.unfold(1, 64, 1).unfold(2, 64, 1)  # [3, 449, 449, 64, 64]
    d = (unf[:, :, :, :4, :4] - x[:, None, None, :4, :4]).abs().sum((0, 3, 4))
    t, l = divmod(int(d.argmin()), d.shape[1])
    assert torch.equal(src[:, t:t + 64, l:l + 64], x)


def test_flip_happens(photo_dir):
    ds = HRImageFolder(photo_dir, crop=512, flip=True)
    i = [p.name for p in ds.files].index("astronaut.png")
    src = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float() / 255.0
    outs = [ds[(i, s)] for s in range(12)]
    n_flipped = sum(torch.equal(o, src.flip(-1)) for o in outs)
    n_plain = sum(torch.equal(o, src) for o in outs)
    assert n_flipped + n_plain == 12 and n_flipped > 0 and n_plain > 0


def test_small_images_are_upscaled_short_side_first(photo_dir):
    ds = HRImageFolder(photo_dir, crop=384)  # chelsea is 300x451: short side 300 < 384
    i = [p.name for p in ds.files].index("chelsea.JPEG")
    x = ds[(i, 1)]
    assert x.shape == (3, 384, 384)
    arr = ds.load(i)
    assert arr.shape == (300, 451, 3)


def test_bad_files_skipped_with_one_warning_each(tmp_path, caplog):
    Image.fromarray(skd.coffee()).save(tmp_path / "good.png")
    (tmp_path / "fake.png").write_bytes(b"this is not a png")
    full = tmp_path / "full.jpg"
    Image.fromarray(skd.chelsea()).save(full, quality=90)
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:2000])
    full.unlink()
    with caplog.at_level(logging.WARNING, logger="dfosd.training.data"):
        ds = HRImageFolder(tmp_path, crop=64)
        assert [p.name for p in ds.files] == ["good.png", "truncated.jpg"]  # truncated opens, fails on decode
        t = [p.name for p in ds.files].index("truncated.jpg")
        for s in range(3):
            x = ds[(t, s)]  # served from the next good image
            assert x.shape == (3, 64, 64)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("fake.png" in m for m in msgs) == 1
    assert sum("truncated.jpg" in m for m in msgs) == 1


def test_empty_and_all_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfosdError, match="no image files") as e:
        HRImageFolder(tmp_path / "empty")
    assert "--data" in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"nope")
    (bad / "b.webp").write_bytes(b"")
    with pytest.raises(DfosdError, match="none readable") as e:
        HRImageFolder(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(DfosdError, match="does not exist"):
        HRImageFolder(tmp_path / "missing")


def test_other_formats_and_modes(tmp_path):
    gray16 = (np.linspace(0, 65535, 80 * 90).reshape(80, 90)).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgba = np.dstack([skd.astronaut()[:100, :100], np.full((100, 100), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.webp")
    Image.fromarray(skd.astronaut()[:70, :70]).save(tmp_path / "b.bmp")
    Image.fromarray(skd.astronaut()[:70, :70]).save(tmp_path / "c.tif")
    ds = HRImageFolder(tmp_path, crop=64)
    assert len(ds) == 4
    for i in range(4):
        x = ds[(i, 0)]
        assert x.shape == (3, 64, 64) and 0 <= float(x.min()) <= float(x.max()) <= 1
    g = ds.load([p.name for p in ds.files].index("g16.png"))
    assert g.dtype == np.uint8 and g.max() == 255 and g.min() == 0


def test_sampler_is_resumable_and_covers_epochs():
    full = ResumableSampler(10, 4, seed=3, num_steps=9)
    batches = list(full)
    assert len(batches) == len(full) == 9
    resumed = list(ResumableSampler(10, 4, seed=3, start_step=5, num_steps=9))
    assert resumed == batches[5:]
    assert ResumableSampler(10, 4, seed=3).batch(7) == batches[7]
    # every epoch visits every image once
    flat = [i for b in batches for i, _ in b]
    for e in range(3):
        assert sorted(flat[e * 10:(e + 1) * 10]) == list(range(10))
    # item seeds never repeat; another seed gives another order
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)
    other = [i for b in ResumableSampler(10, 4, seed=4, num_steps=9) for i, _ in b]
    assert other != flat


def test_dataloader_with_sampler_reproduces_batches(photo_dir):
    ds = HRImageFolder(photo_dir, crop=64)

    def run(start):
        dl = torch.utils.data.DataLoader(ds, batch_sampler=ResumableSampler(len(ds), 2, 9, start_step=start,
                                                                            num_steps=4))
        return [b for b in dl]

    a, b = run(0), run(2)
    assert len(a) == 4 and len(b) == 2
    assert a[0].shape == (2, 3, 64, 64)
    assert all(torch.equal(x, y) for x, y in zip(a[2:], b))


def test_dump_pairs(photo_dir, tmp_path):
    ds = HRImageFolder(photo_dir, crop=64)
    pairs = dump_pairs(ds, 3, tmp_path / "pairs", seed=1)
    assert len(pairs) == 3
    for lr_p, hr_p in pairs:
        lr, hr = Image.open(lr_p), Image.open(hr_p)
        assert lr.size == (16, 16) and hr.size == (64, 64) and lr.mode == hr.mode == "RGB"
    again = dump_pairs(ds, 1, tmp_path / "again", seed=1)
    assert again[0][0].read_bytes() == pairs[0][0].read_bytes()
