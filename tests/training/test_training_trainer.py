"""The trainer on the tiny base and real photos: losses fall, resume is exact, the product exports and runs."""

from __future__ import annotations

import pytest
import torch

from dfosd.core.errors import DfosdError
from dfosd.training.config import TrainConfig

from conftest import TINY

skd = pytest.importorskip("skimage.data")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skd, name)()).save(d / f"{name}.png")
    return d


def _cfg(photo_dir, out_dir, **kw) -> TrainConfig:
    settings = dict(base=TINY, data=str(photo_dir), out=str(out_dir / "lora.safetensors"), steps=3, batch_size=2,
                    crop=64, rank=4, alpha=4.0, embedding_tokens=4, perceptual="none", save_every=2,
                    sample_every=2, progress=False)
    settings.update(kw)
    return TrainConfig(**settings)


def _tiny_dists():
    from dfosd.training.losses import DISTS

    return DISTS.tiny_random(0)  # random backbone: exercises EA-DISTS, is not a perceptual metric


def _eadists_cfg(photo_dir, out_dir, **kw) -> TrainConfig:
    return _cfg(photo_dir, out_dir, perceptual="dists", lambda_eadists=1.0, lambda_adv=0.1, **kw)


@pytest.fixture(scope="module")
def full_run(photo_dir, tmp_path_factory):
    """Three uninterrupted steps: MSE + EA-DISTS (tiny random DISTS) + the discriminator."""
    from dfosd.training.trainer import Trainer

    cfg = _eadists_cfg(photo_dir, tmp_path_factory.mktemp("run_a"))
    return cfg, Trainer(cfg, dists=_tiny_dists()).run()


# ---------------------------------------------------------------- the generator


def test_generator_is_the_onestep_step_and_saves_the_checkpoint_spec(tmp_path):
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import lora_target_modules, read_checkpoint
    from dfosd.core.onestep import DecoderPart, DenoiserPart, EncoderPart, build_from_model
    from dfosd.core.readers import read_model
    from dfosd.core.srmodel import validate_model
    from dfosd.training.generator import OneStepGenerator

    base = load_base(TINY)
    gen = OneStepGenerator(base, rank=4, alpha=8.0, timestep=999, embedding_tokens=5, copy_unet=False)
    assert isinstance(gen.encoder, EncoderPart) and isinstance(gen.denoiser, DenoiserPart)
    assert isinstance(gen.decoder, DecoderPart)
    assert gen.embedding.shape == (1, 5, base.cross_attention_dim) and gen.embedding.requires_grad
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable == {"embedding"} | {n for n in trainable if ".lora_" in n}
    with torch.no_grad():  # a trained state: B is no longer zero
        for p in gen.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)

    path = gen.save(tmp_path / "lora.safetensors")
    ckpt = read_checkpoint(path)
    reference_base = load_base(TINY)  # clean UNet (gen's has the LoRA injected)
    validate_model(read_model(path), reference_base)
    assert {k.rsplit(".lora_", 1)[0] for k in ckpt.lora} == set(lora_target_modules(reference_base.unet))
    m = ckpt.metadata
    assert (m.base_model, m.timestep, m.lora_rank, m.lora_alpha, m.upscale, m.vae_latent) == (TINY, 999, 4, 8.0, 4,
                                                                                            "mean")
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = gen(lr)
        merged = build_from_model(reference_base, read_model(path)).sr_float(lr)  # what dfosd-export traces
    assert ours.shape == (2, 3, 64, 64)
    assert float((ours - merged).abs().max()) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    from dfosd.core.bases import load_base
    from dfosd.training.generator import OneStepGenerator

    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        gen = OneStepGenerator(load_base(TINY), rank=4, alpha=4.0, embedding_tokens=4,
                               gradient_checkpointing=ckpt, copy_unet=False).train()
        sr, _ = gen(lr)
        sr.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------- losses move the right way


def test_generator_loss_falls_on_a_fixed_batch(photo_dir, tmp_path):
    from dfosd.training.trainer import Trainer

    tr = Trainer(_eadists_cfg(photo_dir, tmp_path, lr=2e-3), dists=_tiny_dists())
    batch = [tr.micro_batch(tr.loader(0), 0)]
    d_before = [p.detach().clone() for p in tr.d_params]
    losses = [tr.generator_phase(batch)[0]["loss_g"] for _ in range(4)]
    assert all(v == v for v in losses)  # finite
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(d_before, tr.d_params))  # D frozen in the G phase
    assert all(p.requires_grad for p in tr.d_params)  # ... and unfrozen afterwards


def test_discriminator_loss_falls_when_only_d_trains(photo_dir, tmp_path):
    from dfosd.training.trainer import Trainer

    tr = Trainer(_cfg(photo_dir, tmp_path, lr=2e-3, lambda_adv=0.1))
    _, hr, lr = tr.micro_batch(tr.loader(0), 0)
    with torch.no_grad():
        _, z_fake = tr.generator(lr)
        latents = [(0, tr.generator.encode_hr(hr), z_fake)]
    g_before = [p.detach().clone() for p in tr.g_params]
    stats = [tr.discriminator_phase(latents) for _ in range(5)]
    assert stats[-1]["loss_d"] < stats[0]["loss_d"], [s["loss_d"] for s in stats]
    assert stats[-1]["d_real"] > stats[-1]["d_fake"]  # it tells them apart
    assert all(torch.equal(a, b) for a, b in zip(g_before, tr.g_params))


# ---------------------------------------------------------------- the run, its files and resume


def test_run_writes_checkpoint_log_samples_and_states(full_run):
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.training.reporting import LOG_COLUMNS, read_log
    from dfosd.training.state import list_states

    cfg, result = full_run
    assert result.step == 3 and len(result.history) == 3
    ckpt = read_checkpoint(result.out)
    assert ckpt.metadata.extra["dfosd_train_step"] == "3"
    assert "tiny-random" in ckpt.metadata.extra["dfosd_perceptual"]  # says what EA-DISTS was
    rows = read_log(result.log_dir / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and set(rows[0]) == set(LOG_COLUMNS)
    assert all(r["ea_dists"] > 0 and r["g_adv"] > 0 and r["loss_d"] > 0 for r in rows)
    assert sorted(p.name for p in (result.log_dir / "samples").iterdir()) == ["step-0000000.png",
                                                                              "step-0000002.png"]
    assert [s for s, _ in list_states(result.log_dir)] == [2, 3]  # keep_states=2; the end is saved
    assert not list(result.out.parent.glob("*.tmp")) and not list(result.log_dir.rglob("*.tmp"))


def test_resume_reproduces_the_uninterrupted_run(full_run, photo_dir, tmp_path):
    from safetensors.torch import load_file

    from dfosd.training.state import load_state, state_path
    from dfosd.training.trainer import Trainer

    cfg, uninterrupted = full_run
    state = state_path(uninterrupted.log_dir, 2)
    saved = load_state(state)
    assert saved["step"] == 2 and saved["sampler"]["next_micro_step"] == 2
    assert {"torch", "numpy", "python", "cuda"} <= set(saved["rng"])
    resumed_cfg = cfg.replace(out=str(tmp_path / "lora.safetensors"), log_dir=str(tmp_path / "log"),
                              resume=str(state))
    resumed = Trainer(resumed_cfg, dists=_tiny_dists()).run()
    assert [r["step"] for r in resumed.history] == [3]
    a, b = uninterrupted.history[2], resumed.history[0]
    for key in ("loss_g", "mse", "ea_dists", "g_adv", "loss_d", "d_real", "d_fake"):
        assert a[key] == b[key], key  # exact, not approximately
    ta, tb = load_file(str(uninterrupted.out)), load_file(str(resumed.out))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_with_other_settings_is_refused(full_run):
    cfg, result = full_run
    from dfosd.training.trainer import Trainer

    bad = cfg.replace(resume=str(result.log_dir), rank=8, crop=128, steps=1)
    with pytest.raises(DfosdError) as e:
        Trainer(bad, dists=_tiny_dists())
    msg = str(e.value)
    assert "rank: saved run 4, now 8" in msg and "crop" in msg and "beyond --steps 1" in msg


def test_trained_checkpoint_exports_and_runs_on_onnxruntime(full_run, tmp_path):
    from dfosd.core.bases import load_base
    from dfosd.core.metrics import max_abs_diff
    from dfosd.core.onestep import build_from_model
    from dfosd.core.readers import read_model
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    _, result = full_run
    exported = export_checkpoint(result.out, TINY, tmp_path / "engines", ExportConfig(precision="fp32", tile=32))
    runner = OneStepRunner(exported.out_dir, backend="onnxruntime")
    photo = torch.from_numpy(skd.astronaut()[::16, ::16][:32, :32].copy()).permute(2, 0, 1)[None].contiguous()
    got = runner(photo)
    assert got.shape == (1, 3, 128, 128) and got.dtype == torch.uint8
    ref = build_from_model(load_base(TINY), read_model(result.out))(photo)
    assert max_abs_diff(got.numpy(), ref.numpy()) <= 2


def test_mixed_precision_is_gpu_only():
    from dfosd.training.trainer import _amp_dtype

    assert _amp_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(DfosdError, match="needs a CUDA device"):
        _amp_dtype("bf16", torch.device("cpu"))
