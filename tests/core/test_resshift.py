"""The ResShift backbone (SinSR, ResShift, TAD-SR) against upstream's own code at a tiny config.

tests/data/resshift/ holds what upstream SinSR's modules computed (see its README.md: the upstream
commit, the command, the configs): seeded tiny UNetModelSwin and VQModelTorch state dicts as
upstream saved them, the LR tile, the noise, and z_y, x0 and the SR image of one step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESSHIFT_GOLDEN as GOLDEN
from safetensors.torch import load_file

from dfosd.core.errors import DfosdError
from dfosd.core.metrics import psnr_uint8
from dfosd.core.resshift import (CHECKPOINTS, RELEASED_UNET, RELEASED_VQ, SINSR_SCHEDULE, load_strict,
                                 unet_config_from_state, unet_config_from_yaml, unwrap_state, vq_config_from_state,
                                 vq_config_from_yaml)
from dfosd.core.resshift_unet import SwinUNet
from dfosd.core.resshift_vq import VQAutoencoder


def test_one_step_matches_upstream(resshift_golden):
    model, io, cfg = resshift_golden
    assert max(abs(a - b) for a, b in zip(model.schedule.sqrt_etas(), cfg["sqrt_etas"])) < 1e-12
    with torch.no_grad():
        y = model.lr_to_unit(io["lr"])
        z_y = model.encode(y)
        x0 = model.denoise(io["z_y"], io["noise"], y)
        sr = model(io["lr"], io["noise"])
    assert (z_y - io["z_y"]).abs().max() < 1e-4
    assert (x0 - io["x0"]).abs().max() < 1e-4 and io["x0"].std() > 0.3  # a real signal, not zeros
    assert (sr - io["sr"]).abs().max() < 1e-4
    assert psnr_uint8((sr + 1) * 127.5, (io["sr"] + 1) * 127.5) > 80
    # the noise matters (a wrong kappa * sqrt(eta_T) would not show with zero noise)
    with torch.no_grad():
        other = model(io["lr"], torch.zeros_like(io["noise"]))
    assert (other - io["sr"]).abs().max() > 0.05


def test_configs_from_yaml_and_from_keys_agree(resshift_golden):
    _, _, cfg = resshift_golden
    assert unet_config_from_yaml(cfg["unet"]) == resshift_golden[0].unet.cfg
    assert vq_config_from_yaml(cfg["autoencoder"]) == resshift_golden[0].vq.cfg
    # the released architecture comes out exactly from its keys (built on the meta device: no memory)
    with torch.device("meta"):
        unet, vq = SwinUNet(RELEASED_UNET), VQAutoencoder(RELEASED_VQ)
    assert unet_config_from_state(unet.state_dict()) == RELEASED_UNET
    assert vq_config_from_state(vq.state_dict()) == RELEASED_VQ
    # ... and from its YAML facts, in SinSR's spelling (in_channels counts the LR) and ResShift's (lq_size)
    sinsr = dict(image_size=64, in_channels=6, model_channels=160, out_channels=3, cond_lq=True,
                 attention_resolutions=[64, 32, 16, 8], channel_mult=[1, 2, 2, 4], num_res_blocks=[2, 2, 2, 2],
                 num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, swin_depth=2,
                 swin_embed_dim=192, window_size=8, mlp_ratio=4)
    assert unet_config_from_yaml(sinsr) == RELEASED_UNET
    assert unet_config_from_yaml({**sinsr, "in_channels": 3, "lq_size": 64}) == RELEASED_UNET
    with pytest.raises(DfosdError, match="feature extractor is not supported"):
        unet_config_from_yaml({**sinsr, "in_channels": 3, "lq_size": 256})
    assert RELEASED_UNET.tile_multiple == 64 and resshift_golden[0].unet.cfg.tile_multiple == 16
    # the schedules per checkpoint (their YAMLs): SinSR/TAD-SR/ResShift v1-v2 15 steps, v3 4 steps
    assert CHECKPOINTS["sinsr"].schedule == SINSR_SCHEDULE == CHECKPOINTS["tad-sr"].schedule
    s4 = CHECKPOINTS["resshift-s4"].schedule
    assert (s4.steps, s4.min_noise_level) == (4, 0.2) and not CHECKPOINTS["resshift-s4"].one_step
    etas = SINSR_SCHEDULE.sqrt_etas()
    assert etas[0] == pytest.approx(0.02) and etas[-1] == pytest.approx(0.99)  # min(0.04 / kappa, 0.04, sqrt(0.001))


def test_upstream_wrappers_and_bad_state_dicts(resshift_golden):
    state = load_file(str(GOLDEN / "unet.safetensors"))
    wrapped = {"state_dict": {"module." + k: v for k, v in state.items()}}  # DataParallel under 'state_dict'
    assert unwrap_state(wrapped, "x").keys() == state.keys()
    unet = SwinUNet(unet_config_from_state(state))
    broken = dict(state)
    broken.pop("out.2.bias")
    broken["input_blocks.0.0.weight"] = torch.zeros(32, 7, 3, 3)
    broken["time_embed.0.bias"] = torch.full((128,), float("nan"))
    with pytest.raises(DfosdError) as err:
        load_strict(unet, broken, "SinSR_v1.pth")
    text = err.value.message
    assert "1 tensor(s) missing, e.g. out.2.bias" in text and "of another shape" in text and "NaN or Inf" in text
    with pytest.raises(DfosdError, match="do not describe ResShift's UNetModelSwin"):
        unet_config_from_state({"foo": torch.zeros(1)})
    with pytest.raises(DfosdError, match="do not describe the VQ-f4 autoencoder"):
        vq_config_from_state(state)


def test_release_files_read_the_upstream_way(resshift_golden, resshift_release, tmp_path):
    """Pickles as upstream saves them (a state_dict wrapper, DataParallel's module. prefix), read with
    weights_only; the kind from the file name; the multi-step teachers refused with the reason."""
    import shutil

    from dfosd.core.resshift_reader import read_resshift

    model, io, _ = resshift_golden
    for name in ("SinSR_v1.pth", "resshift_realsrx4_s4_v3.pth", "mine.pth"):
        shutil.copy(resshift_release["unet"], tmp_path / name)
    shutil.copy(resshift_release["vq"], tmp_path / "autoencoder_vq_f4.pth")
    unet = torch.load(resshift_release["unet"], weights_only=True)
    said = []
    # the tiny architecture comes from the keys; the schedule is SinSR's released one
    got = read_resshift(tmp_path / "SinSR_v1.pth", tmp_path / "autoencoder_vq_f4.pth", progress=said.append)
    assert got.family == "sinsr" and "file name SinSR_v1.pth is wyf0912/SinSR's release" in said[0]
    with torch.no_grad():
        assert (got.model(io["lr"], io["noise"]) - io["sr"]).abs().max() < 1e-4
    with pytest.raises(DfosdError, match="multi-step ResShift model \\(4 UNet calls"):
        read_resshift(tmp_path / "resshift_realsrx4_s4_v3.pth", tmp_path / "autoencoder_vq_f4.pth")
    with pytest.raises(DfosdError, match="(?s)the keys cannot say which.*--family sinsr"):
        read_resshift(tmp_path / "mine.pth", tmp_path / "autoencoder_vq_f4.pth")
    assert read_resshift(tmp_path / "mine.pth", tmp_path / "autoencoder_vq_f4.pth", family="tad-sr").family == "tad-sr"
    with pytest.raises(DfosdError, match="not the VQ-f4 autoencoder"):
        read_resshift(tmp_path / "SinSR_v1.pth", tmp_path / "mine.pth")
    # the SD-family commands say what the file is and where its backbone lives
    from dfosd.core.readers import read_model

    with pytest.raises(DfosdError, match="a ResShift UNetModelSwin checkpoint .*do not compile this backbone yet"):
        read_model(tmp_path / "SinSR_v1.pth", encode=False)
    from click.testing import CliRunner

    from dfosd.cli import main

    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "SinSR_v1.pth")])
    assert r.exit_code == 0, r.output
    for text in ("backbone: ResShift UNetModelSwin", "family: sinsr", "one step", "a multiple of 16",
                 "swin_embed_dim=32", "window_size=4"):
        assert text in r.output, r.output
    # a pickle that needs code to load is refused, never unpickled
    import argparse

    torch.save({"state_dict": unet["state_dict"], "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pth")
    with pytest.raises(DfosdError, match="refused and not unpickled"):
        read_resshift(tmp_path / "evil.pth", tmp_path / "autoencoder_vq_f4.pth")
