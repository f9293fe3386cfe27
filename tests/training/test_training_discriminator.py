"""The noise-aware discriminator on the tiny UNet config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dfosd
from dfosd.core.errors import DfosdError
from dfosd.core.onestep import alphas_cumprod
from dfosd.training.discriminator import NoiseAwareDiscriminator
from dfosd.training.losses import d_adv_loss, g_adv_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = Path(dfosd.__file__).parent / "core" / "configs" / "tiny"


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads((TINY / "unet.json").read_text()))


@pytest.fixture(scope="module")
def abar():
    return alphas_cumprod(json.loads((TINY / "scheduler.json").read_text()))


def _make(unet, abar, **kw):
    torch.manual_seed(1)
    return NoiseAwareDiscriminator(unet, unet.config.cross_attention_dim, 4, 4.0, abar, **kw)


@pytest.fixture(scope="module")
def disc(unet, abar):
    return _make(unet, abar)


def test_output_shape_and_trainable_parts(unet, abar):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    d = _make(unet, abar)
    z = torch.randn(2, 4, 16, 16)
    out = d(z, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and out.dtype == torch.float32  # one logit per mid-block position
    names = [n for n, p in d.named_parameters() if p.requires_grad]
    assert "embedding" in names and any(n.startswith("head.") for n in names)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(n.startswith("trunk.") for n in lora)
    for target in ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"):
        assert any(f".{target}.lora_A" in n for n in lora), target
    assert not any(n.startswith("trunk.") and "lora_" not in n for n in names)  # the base stays frozen
    assert not any("up_blocks" in n for n, _ in d.named_parameters())  # encoder half only
    # the generator's UNet is untouched (deep copies)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not any("lora" in n for n, _ in unet.named_parameters())


def test_forward_diffusion_and_determinism(disc, abar):
    d = disc
    z = torch.randn(3, 4, 16, 16)
    noise = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 500, 999])
    x = d.diffuse(z, t, noise)
    ab = abar.float()[t].view(-1, 1, 1, 1)
    assert torch.allclose(x, ab.sqrt() * z + (1 - ab).sqrt() * noise)
    a = d(z, generator=torch.Generator().manual_seed(5))
    b = d(z, generator=torch.Generator().manual_seed(5))
    c = d(z, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ts = d.draw_timesteps(4000, torch.Generator().manual_seed(0))
    assert int(ts.min()) == 0 and int(ts.max()) == 999


def test_gradient_reaches_the_latent(disc):
    d = disc
    z = torch.randn(2, 4, 16, 16, requires_grad=True)
    g_adv_loss(d(z, generator=torch.Generator().manual_seed(0))).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_a_few_d_steps_lower_the_d_loss(unet, abar):
    d = _make(unet, abar)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(3, 4, 8, 8, generator=g) * 0.5
    fake = torch.nn.functional.avg_pool2d(torch.randn(3, 4, 8, 8, generator=g), 3, 1, 1) * 2.0
    t = torch.tensor([0, 100, 400])  # fixed timesteps and noise: a fixed batch
    nr, nf = torch.randn(real.shape, generator=g), torch.randn(fake.shape, generator=g)
    params = d.trainable_parameters()
    base = {n: p.clone() for n, p in d.trunk.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(8):
        loss = d_adv_loss(d(real, t, nr), d(fake, t, nf))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = float(d_adv_loss(d(real, t, nr), d(fake, t, nf)))
    assert final < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses + [final]
    assert all(torch.equal(p, base[n]) for n, p in d.trunk.named_parameters() if not p.requires_grad)
    lora_b = [p for n, p in d.trunk.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # the LoRA trained, not only the head


def test_options_and_validation(unet, abar):
    d = _make(unet, abar, learn_embedding=False, embedding_tokens=3, t_max=10, head_hidden=8)
    assert "embedding" not in dict(d.named_parameters()) and d.embedding.shape == (1, 3, 32)
    assert float(d.embedding.abs().sum()) == 0
    assert int(d.draw_timesteps(100, torch.Generator().manual_seed(0)).max()) <= 10
    assert d(torch.randn(1, 4, 16, 16), generator=torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)
    with pytest.raises(DfosdError, match="cross_attention_dim"):
        NoiseAwareDiscriminator(unet, 64, 4, 4.0, abar)
    with pytest.raises(DfosdError, match="LoRA target"):
        NoiseAwareDiscriminator(unet, None, 4, 4.0, abar, lora_targets=("no_such_module",))
