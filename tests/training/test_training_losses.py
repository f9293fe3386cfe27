"""Sobel magnitude, DISTS / EA-DISTS (tiny random backbone), weight loading and discovery, GAN losses."""

from __future__ import annotations

import pytest
import torch

from dfosd.core.errors import DfosdError
from dfosd.training import losses
from dfosd.training.losses import (
    DISTS,
    d_adv_loss,
    ea_dists,
    find_perceptual_weights,
    g_adv_loss,
    load_dists_weights,
    save_dists_weights,
    sobel_magnitude,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo():
    skd = pytest.importorskip("skimage.data")
    x = torch.from_numpy(skd.astronaut()[::4, ::4].copy()).permute(2, 0, 1)[None].float() / 255.0
    return x  # [1,3,128,128]


@pytest.fixture(scope="module")
def tiny():
    return DISTS.tiny_random(0)


def test_sobel_constant_is_zero_and_edges_are_found():
    const = torch.full((2, 3, 16, 16), 0.7)
    s = sobel_magnitude(const)
    assert s.shape == const.shape
    assert float(s.max()) < 2e-3  # sqrt(eps)
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    s = sobel_magnitude(step)
    assert float(s[..., 3:5].min()) > 3.9 and float(s[..., :2].max()) < 2e-3  # 4 = 1+2+1 across the edge
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    sobel_magnitude(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_tiny_dists_is_named_as_such(tiny):
    assert "tiny-random" in tiny.name and "NOT a perceptual metric" in tiny.name
    assert "tiny-random" in repr(tiny)
    assert not any(p.requires_grad for p in tiny.parameters())


def test_dists_zero_on_identical_and_grows_with_distortion(tiny, photo):
    assert abs(float(tiny(photo, photo))) < 1e-5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(photo.shape, generator=g)
    d = [float(tiny(photo, (photo + s * noise).clamp(0, 1))) for s in (0.02, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2]
    blur = torch.nn.functional.avg_pool2d(photo, 5, 1, 2, count_include_pad=False)
    assert float(tiny(photo, blur)) > 0


def test_dists_batch_and_gradient(tiny, photo):
    x = photo.repeat(2, 1, 1, 1)
    y = torch.stack([photo[0], photo[0].flip(-1)])
    out = tiny(x, y)
    assert out.shape == (2,) and abs(float(out[0])) < 1e-5 and float(out[1]) > 0
    z = y.clone().requires_grad_(True)
    ea_dists(x, z, tiny).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) > 0


def test_ea_dists_adds_the_edge_term(tiny, photo):
    y = (photo + 0.1 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    e = ea_dists(photo, y, tiny)
    assert torch.allclose(e, tiny(photo, y) + tiny(sobel_magnitude(photo), sobel_magnitude(y)))
    assert float(ea_dists(photo, photo, tiny)) < 1e-5


def test_vgg16_layout_matches_torchvision_indices():
    m = DISTS()
    keys = [k for k in m.state_dict() if k.startswith("features.")]
    convs = sorted({int(k.split(".")[1]) for k in keys})
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16 conv indices
    assert m.taps == [3, 8, 15, 22, 29]
    assert m.alpha.shape == (1, 3 + 64 + 128 + 256 + 512 + 512, 1, 1)
    assert sum(p.numel() for p in m.parameters()) == 14_714_688  # vgg16 features


def test_load_weights_from_parts_and_combined(tmp_path, photo):
    ref = DISTS()
    g = torch.Generator().manual_seed(0)
    for p in ref.features.parameters():
        p.data.normal_(0, 0.01, generator=g)
    ref.alpha.normal_(0.1, 0.01, generator=g)
    ref.beta.normal_(0.1, 0.01, generator=g)
    sd = ref.state_dict()
    # torchvision-style VGG file (with a classifier) + DISTS_pytorch-style alpha/beta file
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save({"alpha": sd["alpha"], "beta": sd["beta"]}, tmp_path / "weights.pt")
    m = load_dists_weights(tmp_path / "weights.pt", tmp_path / "vgg16-397923af.pth")
    small = photo[..., :48, :48]
    y = small.flip(-2)
    assert torch.allclose(m(small, y), ref(small, y))
    # one combined file, and the DISTS_pytorch module layout (stageK.N.*)
    comb = save_dists_weights(m, tmp_path / "dists.safetensors")
    assert torch.allclose(load_dists_weights(comb)(small, y), ref(small, y))
    stage = {("stage1." if int(k.split(".")[1]) < 4 else "stage5.") + k.split(".", 1)[1]: v
             for k, v in vgg.items() if k.startswith("features.")}
    stage.update(alpha=sd["alpha"], beta=sd["beta"])
    torch.save(stage, tmp_path / "module.pth")
    assert torch.allclose(load_dists_weights(tmp_path / "module.pth")(small, y), ref(small, y))
    # half the weights: a clear error saying what is missing
    with pytest.raises(DfosdError, match="alpha/beta"):
        load_dists_weights(tmp_path / "vgg16-397923af.pth")
    with pytest.raises(DfosdError, match="VGG16 features"):
        load_dists_weights(tmp_path / "weights.pt")
    with pytest.raises(DfosdError, match="does not exist"):
        load_dists_weights(tmp_path / "nope.pth")


def test_find_perceptual_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(losses, "_dists_package_file", lambda: None)
    with pytest.raises(DfosdError) as e:
        find_perceptual_weights()
    msg = str(e.value)
    assert "--perceptual-weights PATH" in msg and "--perceptual none" in msg
    assert "DISTS_pytorch" in msg and "vgg16-397923af.pth" in msg
    with pytest.raises(DfosdError, match="does not exist"):
        find_perceptual_weights(tmp_path / "missing.safetensors")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert find_perceptual_weights(f) == (f,)
    # both parts present -> both returned
    ck = tmp_path / "torch_home" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "vgg16-397923af.pth").write_bytes(b"x")
    ab = tmp_path / "DISTS_pytorch" / "weights.pt"
    ab.parent.mkdir()
    ab.write_bytes(b"x")
    monkeypatch.setattr(losses, "_dists_package_file", lambda: ab)
    assert find_perceptual_weights() == (ab, ck / "vgg16-397923af.pth")


def test_gan_losses():
    big = torch.full((4, 1, 2, 2), 20.0)
    assert float(g_adv_loss(big)) < 1e-6 and float(g_adv_loss(-big)) == pytest.approx(20.0, rel=1e-4)
    assert float(d_adv_loss(big, -big)) < 1e-6
    assert float(d_adv_loss(-big, big)) == pytest.approx(40.0, rel=1e-4)
    zero = torch.zeros(3)
    assert float(d_adv_loss(zero, zero)) == pytest.approx(2 * 0.6931471805599453)
    logits = torch.randn(5, requires_grad=True)
    g_adv_loss(logits).backward()
    assert (logits.grad < 0).all()  # the generator pushes D(fake) up
