"""OMGSR-S: its release folder (two PEFT adapter folders) -> export parity with peft's own
``PeftModel.from_pretrained`` + diffusers (adapters unmerged), ``--timestep``, convert/inspect, and the
folder errors. The folder is written the upstream way (tests/upstream_way.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import upstream_way as uw
from conftest import TINY
from dfosd.core.errors import DfosdError
from dfosd.core.metrics import psnr_uint8
from dfosd.core.readers import read_model

TILE = 32
PROMPT = "a photo, sharp"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def omgsr_dir(tiny_base, tmp_path_factory):
    # VAE alpha 2x its rank (upstream: alpha = rank): the scale must come from adapter_config.json
    return uw.write_omgsr(tmp_path_factory.mktemp("omgsr") / "omgsr-s-512-adapter", tiny_base, vae_alpha=8)




def test_export_matches_peft_from_pretrained(omgsr_dir, tiny_base, tiny_text_models, smooth_lr_tile, tmp_path):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    ref = uw.run_omgsr(omgsr_dir, tiny_base, smooth_lr_tile, tiny_text_models, prompt=PROMPT).numpy()
    assert np.isfinite(ref).all() and ref.std() > 10
    said, parity = [], {}
    for precision, floor in (("fp32", 50.0), ("fp16", 35.0)):
        out = export_checkpoint(omgsr_dir, TINY, tmp_path / precision,
                                ExportConfig(precision=precision, tile=TILE, batches=(1,)), prompt=PROMPT,
                                progress=said.append)
        got = OneStepRunner(out.out_dir, backend="onnxruntime", batch=1)(smooth_lr_tile).numpy()
        parity[precision] = round(psnr_uint8(got, ref), 2)
        assert parity[precision] >= floor, parity
        fam = out.manifest["family"]
        assert fam["name"] == "omgsr-s" and fam["color_fix"] == "adain" and out.manifest["timestep"] == 273
    print("\nOMGSR-S parity vs peft PeftModel.from_pretrained + diffusers (PSNR dB):", json.dumps(parity))
    assert any("family omgsr-s (a folder with unet_lora_adapter/ and vae_encoder_lora_adapter/" in s for s in said)
    # without the VAE adapter's scale (alpha 8 / rank 4) the function is another one: the scale is read
    model = read_model(omgsr_dir, base_spec=TINY, prompt=PROMPT)
    assert [(s.part, s.rank, s.alpha) for s in model.lora_sets] == [("unet", 8, 8.0), ("vae", 4, 8.0)]
    assert all(m.startswith("encoder.") for m in model.lora_sets[1].factors)


def test_timestep_override_through_the_cli(omgsr_dir, tiny_base, tiny_text_models, smooth_lr_tile, tmp_path):
    from dfosd.export.cli import main
    from dfosd.runtime.step import OneStepRunner

    out = tmp_path / "t200"
    r = CliRunner().invoke(main, ["--ckpt", str(omgsr_dir), "--base", TINY, "--tile", str(TILE), "--timestep", "200",
                                  "--backend", "onnxruntime", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "family omgsr-s (a folder with" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timestep"] == 200 and manifest["inputs"]["timestep"] == 200
    assert "timestep 200 instead of upstream's 273" in manifest["family"]["deviations"]
    ref = uw.run_omgsr(omgsr_dir, tiny_base, smooth_lr_tile, tiny_text_models, timestep=200).numpy()
    got = OneStepRunner(out, backend="onnxruntime", batch=1)(smooth_lr_tile).numpy()
    assert psnr_uint8(got, ref) >= 50.0
    r = CliRunner().invoke(main, ["--ckpt", str(omgsr_dir), "--timestep", "1000", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "1000 is not in the range 0<=x<=999" in r.output


def test_convert_inspect_and_a_single_adapter_folder(omgsr_dir, tmp_path):
    from dfosd.cli import main

    r = CliRunner().invoke(main, ["inspect", str(omgsr_dir)])
    assert r.exit_code == 0, r.output
    for text in ("family: omgsr-s", "lora unet:", "lora vae:", "rank 4, alpha 8, scale 2", "timestep 273",
                 "x0 rule ddpm", "pil-bicubic", "colour fix: adain"):
        assert text in r.output, r.output
    out = tmp_path / "omgsr.safetensors"
    r = CliRunner().invoke(main, ["convert", str(omgsr_dir), "--out", str(out), "--base", TINY, "--timestep", "250"])
    assert r.exit_code == 0, r.output
    again, direct = read_model(out), read_model(omgsr_dir, base_spec=TINY)
    assert again.family.name == "omgsr-s" and again.timestep == 250 and direct.timestep == 273
    assert torch.equal(again.text_embedding, direct.text_embedding)
    for a, b in zip(again.lora_sets, direct.lora_sets):
        assert a.header() == b.header() and all(torch.equal(a.factors[m][0], b.factors[m][0]) for m in b.factors)
    # one PEFT adapter folder (the UNet's alone) names no family: --family says which, and only plain-LoRA ones fit
    single = tmp_path / "unet-only"
    shutil.copytree(omgsr_dir / "unet_lora_adapter", single)
    with pytest.raises(DfosdError, match="(?s)does not name a family.*--family hypir or omgsr-s"):
        read_model(single, encode=False)
    assert read_model(single, family="hypir", encode=False).lora_sets[0].rank == 8
    with pytest.raises(DfosdError, match="family osediff is not read from PEFT adapter folders"):
        read_model(single, family="osediff", encode=False)


def test_folder_errors_are_clear(omgsr_dir, tmp_path):
    from dfosd.export.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["--ckpt", str(empty), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "is a folder without PEFT adapters" in r.output and "Traceback" not in r.output
    broken = tmp_path / "broken"
    shutil.copytree(omgsr_dir, broken)
    cfg_path = broken / "unet_lora_adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_dora=True, lora_alpha=0)
    cfg_path.write_text(json.dumps(cfg))
    (broken / "vae_encoder_lora_adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(DfosdError) as err:
        read_model(broken, encode=False)
    text = err.value.message
    assert "use_dora is set" in text and "lora_alpha 0 must be a positive number" in text
    assert "no adapter weights (adapter_model.safetensors or adapter_model.bin)" in text
