"""fp16 that cannot go black: planted hazards, fp32 islands from measured ranges, fp16 storage emulation.

The hazard base is the tiny base with seeded weights scaled where SD-family models overflow
fp16 in practice (shared notes, numerics.md):

- the VAE decoder's ``conv_in`` x ``DECODER_SCALE``: its weights pass 1e4 (the fp16 converter's
  clamp) and the residual stream it starts runs at ~3e6 in fp32 up to the GroupNorm that
  reads it (``conv_norm_out``), the pattern of SDXL's VAE;
- the first self-attention's ``to_q``/``to_k`` x ``ATTENTION_SCALE``: its logits reach ~1e5 (why
  ONNX Runtime's SD guide keeps attention in fp32 for SD 2.1).

Judged by bench/fp16_storage.py (ONNX Runtime CPU without graph optimisation: every fp16
tensor stored as fp16, as on a GPU) against the eager fp32 model on held-out photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECODER_SCALE = 1e5
ATTENTION_SCALE = 300.0


@pytest.fixture(scope="session")
def hazard_base(tiny_base, tmp_path_factory) -> Path:
    """A diffusers folder: the tiny base with the two planted hazards."""
    import copy

    import torch

    unet, vae = copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(DECODER_SCALE)
        vae.decoder.conv_in.bias.mul_(DECODER_SCALE)
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        attn.to_q.weight.mul_(ATTENTION_SCALE)
        attn.to_k.weight.mul_(ATTENTION_SCALE)
    folder = tmp_path_factory.mktemp("hazard") / "base"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(tiny_base.scheduler_config)))
    return folder


def _export(ckpt, base, out, precision):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    return export_checkpoint(ckpt, str(base), out, ExportConfig(precision=precision, tile=TILE)).out_dir


@pytest.fixture(scope="session")
def hazard_fp16(tiny_ckpt, hazard_base, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, hazard_base, tmp_path_factory.mktemp("hazard_fp16"), "fp16")


def _manifest(export: Path) -> dict:
    return json.loads((export / "manifest.json").read_text())


def test_islands_only_where_measured(hazard_fp16):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    comps = _manifest(hazard_fp16)["components"]
    enc, unet, dec = (comps[f"{p}_b1"] for p in ("encoder", "unet", "decoder"))
    assert enc["fp16_islands"] == [] and enc["fp16_compute"]["fp16"] == enc["fp16_compute"]["total"]
    # the attention logits: the one MatMul that makes them and the Softmax that reads them
    scope = "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/"
    assert {(i["op"], i["reason"]) for i in unet["fp16_islands"]} == {("MatMul", "range"), ("Softmax", "range")}
    assert all(i["node"].startswith(scope) and i["peak"] > 65504 for i in unet["fp16_islands"])
    # the decoder's stream from conv_in (its weights past 1e4) to the GroupNorm that reads it
    reasons = {i["node"]: i["reason"] for i in dec["fp16_islands"]}
    assert reasons["/decoder/conv_in/Conv"] == "weight"
    assert any(n.startswith("/decoder/conv_norm_out/") for n in reasons)
    assert not any("/resnets.0/conv1/" in n or "/resnets.0/conv2/" in n for n in reasons)  # normalised branches
    for part, minimum in ((unet, 0.90), (dec, 0.75)):  # the bar for compute kept in fp16
        share = part["fp16_compute"]
        print(f"{part['contract']['component']}: {share['fp16']}/{share['total']} Conv/MatMul/Gemm in fp16, "
              f"{len(part['fp16_islands'])} island nodes, range pass {part['fp16_range']['seconds']} s")
        assert share["fp16"] / share["total"] >= minimum
    # no weight was clamped: conv_in's weights are kept in fp32, as the checkpoint has them
    graph = onnx.load(str(hazard_fp16 / "decoder_b1.onnx")).graph
    w = next(i for i in graph.initializer if i.name == "decoder.conv_in.weight")
    assert w.data_type == onnx.TensorProto.FLOAT and np.abs(numpy_helper.to_array(w)).max() > 1e4


def test_inspect_shows_the_islands(hazard_fp16):
    from dfosd.export.convert_cli import inspect_main

    r = CliRunner().invoke(inspect_main, [str(hazard_fp16)])
    assert r.exit_code == 0, r.output
    assert "decoder_b1: " in r.output and "Conv/MatMul/Gemm in fp16" in r.output
    assert "fp32: /decoder/conv_in/Conv (Conv, weight: |w| " in r.output
    assert "encoder_b1: no fp32 island needed" in r.output
    r = CliRunner().invoke(inspect_main, [str(hazard_fp16), "--json"])
    parts = json.loads(r.output)["parts"]
    assert {i["reason"] for i in parts["unet_b1"]["fp16_islands"]} == {"range"}


def test_hazard_export_under_fp16_storage_is_finite_and_close(hazard_fp16):
    from dfosd.bench.fp16_storage import storage_lines, storage_report
    from dfosd.bench.run import bench_inputs
    from dfosd.bench.verify import eager_model
    from dfosd.core.manifest import ExportDir

    export = ExportDir(hazard_fp16)
    report = storage_report(export, eager_model(export, print), bench_inputs(TILE, 1), say=lambda m: None)
    print("\n".join(storage_lines(report)))
    assert all(r["finite"] for r in report["rows"]) and report["chain_psnr_db"] >= 40
    assert report["passed"]


def test_without_islands_the_hazard_model_goes_black(hazard_fp16, tmp_path):
    """The same decoder converted as before islands existed: stored as fp16 its stream overflows,
    the image is black (every byte 0), and only the sr_nonfinite flag and the scan tell."""
    import onnx

    from dfosd.bench.fp16_storage import first_nonfinite, storage_session
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.onestep import DecoderPart
    from dfosd.export.fp16_islands import part_inputs
    from dfosd.export.onnx_export import export_part, to_fp16

    from dfosd.bench.run import bench_inputs
    from dfosd.bench.verify import eager_model
    from dfosd.core.manifest import ExportDir

    model = eager_model(ExportDir(hazard_fp16), print)
    contract = component_contracts(Geometry(tile=TILE, batch=1))["decoder"]
    export_part(model.part("decoder"), contract, tmp_path / "fp32.onnx", precision="fp32")
    plain = to_fp16(onnx.load(str(tmp_path / "fp32.onnx")), DecoderPart.NETWORK_SCOPES)
    onnx.save_model(plain, str(tmp_path / "plain.onnx"))
    feed = {"denoised_latent": part_inputs(model, bench_inputs(TILE, 1))["decoder"].numpy()}
    image, flag = storage_session(tmp_path / "plain.onnx").run(None, feed)
    assert flag.tolist() == [1] and int(image.max()) == 0  # all black, and flagged
    assert first_nonfinite(tmp_path / "plain.onnx", feed) == "/decoder/conv_in/Conv_output_0"


def test_benign_model_gets_no_island_and_the_same_graph(tiny_export_fp16, tiny_eager, tmp_path):
    from dfosd.calibration.data import range_tiles
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.export.fp16_islands import batch_feeds, part_inputs
    from dfosd.export.onnx_export import export_part

    for entry in _manifest(tiny_export_fp16)["components"].values():
        assert entry["fp16_islands"] == [], entry["onnx"]
        assert entry["fp16_compute"]["fp16"] == entry["fp16_compute"]["total"]
    # the range pass changes nothing in a benign graph: byte for byte the conversion without it
    contract = component_contracts(Geometry(tile=TILE, batch=1))["decoder"]
    feeds = batch_feeds(part_inputs(tiny_eager, range_tiles(None, TILE, 2))["decoder"], contract)
    export_part(tiny_eager.part("decoder"), contract, tmp_path / "a.onnx", precision="fp16", range_inputs=feeds)
    export_part(tiny_eager.part("decoder"), contract, tmp_path / "b.onnx", precision="fp16")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_verify_fp16_storage_cli(hazard_fp16, tmp_path):
    from dfosd.bench.verify import main

    r = CliRunner().invoke(main, [str(hazard_fp16), "--fp16-storage", "--report", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert "fp16 storage semantics" in r.output and "whole chain:" in r.output and "PASSED" in r.output
    saved = json.loads((tmp_path / "v.json").read_text())["fp16_storage"]
    assert saved["passed"] and len(saved["rows"]) == 6
    r = CliRunner().invoke(main, [str(hazard_fp16), "--fp16-storage", "--min-psnr", "200"])
    assert r.exit_code == 1 and "FAILED" in r.output
    r = CliRunner().invoke(main, [str(hazard_fp16), "--min-psnr", "40"])
    assert r.exit_code == 2 and "--min-psnr is the target of --fp16-storage" in r.output


def test_upcast_attention_keeps_softmax_and_logits_in_fp32(tiny_export_fp32):
    """A base UNet with upcast_attention (SD 2.1 at 768): every attention Softmax and the MatMul
    that makes its logits are islands, whatever the measured range."""
    import onnx

    from dfosd.export.fp16_islands import plan_islands

    model = onnx.load(str(tiny_export_fp32 / "unet_b1.onnx"))
    assert plan_islands(model, {}, ("unet",)) == []
    islands = plan_islands(model, {}, ("unet",), upcast_attention=True)
    softmax = [n.name for n in model.graph.node if n.op_type == "Softmax" and n.name.startswith("/unet/")]
    assert softmax and {i["node"] for i in islands if i["op"] == "Softmax"} == set(softmax)
    assert sum(i["op"] == "MatMul" for i in islands) == len(softmax)
    assert {i["reason"] for i in islands} == {"upcast_attention"}
