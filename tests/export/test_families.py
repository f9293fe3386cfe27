"""Upstream one-step SR checkpoints (OSEDiff, PiSA-SR, HYPIR) -> dfosd: export parity, convert, inspect.

Each checkpoint is written in its project's own container and layout (tests/upstream_way.py);
the reference runs it the upstream way with peft adapters left unmerged. Parity is measured
on the exported ONNX files through ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import upstream_way as uw
from conftest import TINY
from dfosd.core.metrics import psnr_uint8
from dfosd.core.readers import read_model

TILE = 32
FAMILIES = {"osediff": (uw.write_osediff, uw.run_osediff),
            "pisa-sr": (uw.write_pisa, uw.run_pisa),
            "hypir": (uw.write_hypir, uw.run_hypir)}
PROMPT = "a photo, sharp"
PARITY = {}  # family -> precision -> dB, printed at the end (README numbers come from here)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield
    if PARITY:
        print("\nparity vs upstream-way reference (PSNR dB):", json.dumps(PARITY))


@pytest.fixture(scope="module")
def upstream_files(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream")
    names = {"osediff": "osediff.pkl", "pisa-sr": "pisa_sr.pkl", "hypir": "HYPIR_sd2.pth"}
    return {fam: FAMILIES[fam][0](folder / names[fam], tiny_base) for fam in FAMILIES}


@pytest.fixture(scope="module")
def text_models(tiny_text_models):
    return tiny_text_models


@pytest.fixture(scope="module")
def lr(smooth_lr_tile):
    return smooth_lr_tile


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_upstream_inference(family, upstream_files, tiny_base, text_models, lr, tmp_path):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    ref = FAMILIES[family][1](upstream_files[family], tiny_base, lr, text_models, prompt=PROMPT).numpy()
    assert np.isfinite(ref).all() and ref.std() > 10  # a real image, not a constant
    said = []
    for precision, floor in (("fp32", 50.0), ("fp16", 35.0)):
        out = export_checkpoint(upstream_files[family], TINY, tmp_path / precision,
                                ExportConfig(precision=precision, tile=TILE, batches=(1,)), prompt=PROMPT,
                                progress=said.append)
        got = OneStepRunner(out.out_dir, backend="onnxruntime", batch=1)(lr).numpy()
        db = psnr_uint8(got, ref)
        PARITY.setdefault(family, {})[precision] = round(db, 2)
        assert db >= floor, f"{family} {precision}: {db:.2f} dB"
        fam = out.manifest["family"]
        assert fam["name"] == family and fam["prompt"] == PROMPT and fam["deviations"]
    assert any(f"family {family} (" in s for s in said)  # what was detected, and why
    # exporting again reuses the folder without running the text encoder (the prompt is in the key)
    said.clear()
    again = export_checkpoint(upstream_files[family], TINY, tmp_path / "fp32",
                              ExportConfig(precision="fp32", tile=TILE, batches=(1,)), prompt=PROMPT,
                              progress=said.append)
    assert again.reused and not any("encoding the prompt" in s for s in said), said
    # dfosd run applies the family's upstream colour fix by default (read from the manifest)
    from PIL import Image

    from dfosd.runtime.cli import main as run_main

    Image.fromarray(lr[0].permute(1, 2, 0).numpy()).save(tmp_path / "lr.png")
    r = CliRunner().invoke(run_main, [str(tmp_path / "lr.png"), "--engines", str(out.out_dir), "--out",
                                      str(tmp_path / "sr"), "--backend", "onnxruntime", "--no-progress"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "sr" / "dfosd-report.json").read_text())
    assert report["color_fix"] == {"osediff": "adain", "pisa-sr": "adain", "hypir": "wavelet"}[family]
    # the served model (dfosd-serve's, in-process) applies the same fix by default: the same bytes
    from dfosd.serving.upscale_service import UpscaleService

    service = UpscaleService.from_export(out.out_dir, backend="onnxruntime", tile_batch=1, max_pixels=TILE * TILE)
    assert service.color_fix == report["color_fix"]
    served = service.upscale(lr[0].permute(1, 2, 0)[None].contiguous())[0].numpy()
    np.testing.assert_array_equal(served, np.array(Image.open(tmp_path / "sr" / "lr.png")))


def test_merge_is_what_unmerged_peft_computes(upstream_files, tiny_base, text_models, lr):
    """Without the merge, the same model misses the reference by far: parity above is not vacuous."""
    from dataclasses import replace

    from dfosd.core.onestep import build_from_model

    model = read_model(upstream_files["osediff"], base_spec=TINY, prompt=PROMPT)
    ref = uw.run_osediff(upstream_files["osediff"], tiny_base, lr, text_models, prompt=PROMPT).numpy()
    merged = build_from_model(tiny_base, model)(lr).numpy()
    bare = build_from_model(tiny_base, replace(model, lora_sets=(), replacements={}))(lr).numpy()
    assert psnr_uint8(merged, ref) >= 50.0 > psnr_uint8(bare, ref) + 20


def test_encoder_graph_has_two_cubic_resize_passes(upstream_files, tiny_base, tmp_path):
    import onnx

    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.onestep import build_from_model
    from dfosd.export.onnx_export import export_part

    model = build_from_model(tiny_base, read_model(upstream_files["pisa-sr"], base_spec=TINY))
    contract = component_contracts(Geometry(tile=8, batch=1, vae_scale_factor=tiny_base.vae_scale_factor))["encoder"]
    export_part(model.encoder, contract, tmp_path / "enc.onnx")
    resizes = [n for n in onnx.load(str(tmp_path / "enc.onnx")).graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    for n in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["mode"] == b"cubic" and attrs["cubic_coeff_a"] == pytest.approx(-0.5)
        assert attrs["exclude_outside"] == 1 and attrs["coordinate_transformation_mode"] == b"half_pixel"


def test_convert_then_inspect_then_read(upstream_files, tiny_base, tmp_path):
    from dfosd.cli import main

    out = tmp_path / "osediff.safetensors"
    r = CliRunner().invoke(main, ["convert", str(upstream_files["osediff"]), "--out", str(out), "--base", TINY,
                                  "--prompt", PROMPT])
    assert r.exit_code == 0, r.output
    assert "family osediff (dict with unet_lora_encoder" in r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("family: osediff", "lora unet:", "lora vae:", "replaced whole: unet.conv_in.weight",
                 "timestep 999", "x0 rule ddpm", "pil-bicubic", "colour fix: adain", "posterior mean"):
        assert text in r.output
    # an upstream file is inspected without its base (no tokenizer or text encoder is loaded)
    r = CliRunner().invoke(main, ["inspect", str(upstream_files["hypir"])])
    assert r.exit_code == 0 and "family: hypir" in r.output and "encoded by the base's text encoder" in r.output
    assert "scale 1," in r.output and "timestep 200" in r.output
    direct = read_model(upstream_files["osediff"], base_spec=TINY, prompt=PROMPT)
    again = read_model(out)
    assert again.family.name == "osediff" and again.prompt == PROMPT and again.timestep == 999
    assert torch.equal(again.text_embedding, direct.text_embedding)
    assert [s.header() for s in again.lora_sets] == [s.header() for s in direct.lora_sets]
    for a, b in zip(again.lora_sets, direct.lora_sets):
        assert all(torch.equal(a.factors[m][i], b.factors[m][i]) for m in b.factors for i in (0, 1))
    assert all(torch.equal(again.replacements[k], v) for k, v in direct.replacements.items())
    # a file that is not ours is never overwritten
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"not dfosd")
    r = CliRunner().invoke(main, ["convert", str(upstream_files["hypir"]), "--out", str(foreign), "--base", TINY])
    assert r.exit_code != 0 and "not overwriting" in r.output and foreign.read_bytes() == b"not dfosd"
    # nor the file being converted, nor a trained (format-1) checkpoint
    trained = tmp_path / "lora.safetensors"
    from dfosd.core.checkpoint import write_random_checkpoint

    write_random_checkpoint(trained, tiny_base)
    before = trained.read_bytes()
    for src in (trained, upstream_files["hypir"]):
        r = CliRunner().invoke(main, ["convert", str(src), "--out", str(trained), "--base", TINY])
        assert r.exit_code != 0 and "not overwriting" in r.output and trained.read_bytes() == before, r.output


def test_pisa_two_pass_matches_upstream_adjustable_mode(upstream_files, tiny_base, text_models, lr, tmp_path):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    scales = (1.0, 0.4)
    ref = uw.run_pisa_adjustable(upstream_files["pisa-sr"], tiny_base, lr, text_models, scales).numpy()
    merged = uw.run_pisa(upstream_files["pisa-sr"], tiny_base, lr, text_models).numpy()
    assert psnr_uint8(ref, merged) < 40  # lambda_sem 0.4 is visibly another function than both merged
    out = export_checkpoint(upstream_files["pisa-sr"], TINY, tmp_path / "two-pass",
                            ExportConfig(precision="fp32", tile=TILE, batches=(1,)), pisa_scales=scales)
    got = OneStepRunner(out.out_dir, backend="onnxruntime", batch=1)(lr).numpy()
    db = psnr_uint8(got, ref)
    PARITY.setdefault("pisa-sr two-pass (1.0,0.4)", {})["fp32"] = round(db, 2)
    assert db >= 50.0 and out.manifest["family"]["pisa_scales"] == list(scales)
    with pytest.raises(Exception, match="pisa-scales applies to PiSA-SR"):
        export_checkpoint(upstream_files["hypir"], TINY, tmp_path / "bad", ExportConfig(precision="fp32", tile=TILE),
                          pisa_scales=scales)
