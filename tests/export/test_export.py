"""Export: ONNX Runtime parity with eager PyTorch, manifest reuse and rebuild, file layout."""

import json
import math

import numpy as np
import onnx
import pytest
import torch

from dfosd.core.contracts import Geometry, component_contracts
from dfosd.core.errors import DfosdError
from dfosd.core.metrics import max_abs_diff, psnr_uint8
from dfosd.export.artifacts import ExportConfig, export_checkpoint
from dfosd.runtime.step import OneStepRunner

from conftest import TILE, TINY


def _lr_batch(n=2, seed=3):
    # smooth content (what photos look like at 32x32) rather than white noise
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(TILE, TILE), mode="bilinear")
    return (x * 255).round().to(torch.uint8)


def test_fp32_onnx_matches_eager(tiny_export_fp32, tiny_eager):
    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=2)
    x = _lr_batch(2)
    got, ref = runner(x).numpy(), tiny_eager(x).numpy()
    assert got.shape == (2, 3, TILE * 4, TILE * 4) and got.dtype == np.uint8
    assert psnr_uint8(got, ref) >= 50.0
    assert max_abs_diff(got, ref) <= 2


def test_fp16_onnx_matches_eager_fp32(tiny_export_fp16, tiny_eager):
    runner = OneStepRunner(tiny_export_fp16, backend="onnxruntime")
    x = _lr_batch(1)
    got, ref = runner(x).numpy(), tiny_eager(x).numpy()
    assert np.isfinite(got).all()
    assert psnr_uint8(got, ref) >= 40.0


def test_fp16_graph_is_strongly_typed_with_fp32_islands(tiny_export_fp16):
    m = onnx.load(str(tiny_export_fp16 / "unet_b1.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    weights = [i for i in m.graph.initializer if np.prod(i.dims) >= 64]  # skip scalars and shapes
    assert weights and all(i.data_type == f16 for i in weights), "weights are fp16"
    io = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    assert io == {"latent": onnx.TensorProto.FLOAT, "denoised_latent": onnx.TensorProto.FLOAT}
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert any(a.i == onnx.TensorProto.FLOAT for n in casts for a in n.attribute), "x0 step runs in fp32"


def test_pre_and_post_processing_live_in_the_graphs(tiny_export_fp32):
    enc = onnx.load(str(tiny_export_fp32 / "encoder_b1.onnx"))
    dec = onnx.load(str(tiny_export_fp32 / "decoder_b1.onnx"))
    assert enc.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dec.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    resize = [n for n in enc.graph.node if n.op_type == "Resize"]
    assert resize, "bicubic x4 is inside the encoder graph"
    attrs = {a.name: a for a in resize[0].attribute}
    assert attrs["mode"].s == b"cubic" and math.isclose(attrs["cubic_coeff_a"].f, -0.75)


def test_embedding_and_timestep_are_constants(tiny_export_fp32):
    unet = onnx.load(str(tiny_export_fp32 / "unet_b1.onnx"))
    assert [i.name for i in unet.graph.input] == ["latent"]


def test_manifest_records_inputs_and_contracts(tiny_export_fp32, tiny_ckpt):
    man = json.loads((tiny_export_fp32 / "manifest.json").read_text())
    assert man["precision"] == "fp32" and man["batches"] == [1, 2] and man["tile"] == TILE
    assert man["inputs"]["checkpoint_sha256"] and man["inputs"]["base_fingerprint"]
    assert man["inputs"]["software"]["torch"] and man["inputs"]["software"]["onnx"]
    assert set(man["components"]) == {f"{p}_b{b}" for p in ("encoder", "unet", "decoder") for b in (1, 2)}
    unet = man["components"]["unet_b2"]["contract"]
    assert unet["inputs"][0]["shape"] == [2, 4, 16, 16] and unet["outputs"][0]["dtype"] == "float32"
    for name, rec in man["files"].items():
        assert (tiny_export_fp32 / name).stat().st_size == rec["bytes"]


def test_reuse_and_rebuild(tiny_ckpt, tiny_export_fp32, tmp_path, tiny_base):
    """Same inputs reuse the folder; a changed file, checkpoint or option changes the verdict.
    One copy of the session export and the build key itself, instead of four real exports."""
    import shutil

    from dfosd.core.bases import base_fingerprint
    from dfosd.core.checkpoint import read_checkpoint, write_random_checkpoint
    from dfosd.core.manifest import build_key
    from dfosd.export.artifacts import export_inputs, reusable

    out = shutil.copytree(tiny_export_fp32, tmp_path / "export")
    cfg = ExportConfig(precision="fp32", tile=TILE, batches=(1, 2))  # the session export's options
    again = export_checkpoint(tiny_ckpt, TINY, out, cfg)
    key = again.manifest["build_key"]
    assert again.reused and reusable(out, key) is not None

    def key_of(ckpt, config):
        return build_key(export_inputs(TINY, base_fingerprint(TINY), read_checkpoint(ckpt), config))

    assert key_of(tiny_ckpt, cfg) == key  # the key is a pure function of what went in
    # another checkpoint or another option is another key: the folder is rebuilt
    other = write_random_checkpoint(tmp_path / "other.safetensors", tiny_base, seed=5)
    assert key_of(other, cfg) != key
    for changed in (ExportConfig(precision="fp32", tile=16, batches=(1, 2)),
                    ExportConfig(precision="fp32", tile=TILE, batches=(1,)),
                    ExportConfig(precision="fp16", tile=TILE, batches=(1, 2))):
        assert key_of(tiny_ckpt, changed) != key, changed
    # a changed file is detected: the folder is no longer reusable, and a real re-export fixes it
    (out / "decoder_b1.onnx").write_bytes(b"corrupt")
    assert reusable(out, key) is None
    fixed = export_checkpoint(tiny_ckpt, TINY, out, ExportConfig(precision="fp32", tile=TILE, batches=(1,)))
    assert not fixed.reused and sorted(fixed.manifest["batches"]) == [1]
    assert reusable(out, fixed.manifest["build_key"]) is not None
    assert not list(out.glob(".*")), "no temp files left behind"


def test_external_data_above_threshold(tiny_eager, tmp_path, monkeypatch):
    import dfosd.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 1000)
    contract = component_contracts(Geometry(tile=TILE, batch=1))["unet"]
    info = ox.export_part(tiny_eager.part("unet"), contract, tmp_path / "unet_b1.onnx")
    assert info["external_data"] == "unet_b1.onnx.data"
    assert (tmp_path / "unet_b1.onnx.data").stat().st_size > 1_000_000
    # the graph file keeps only the graph: the weights went to the data file
    assert (tmp_path / "unet_b1.onnx").stat().st_size < (tmp_path / "unet_b1.onnx.data").stat().st_size / 4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "unet_b1.onnx"), providers=["CPUExecutionProvider"])
    x = contract.sample_inputs()["latent"]
    out = sess.run(None, {"latent": x.numpy()})[0]
    ref = tiny_eager.part("unet")(x).detach().numpy()
    assert np.abs(out - ref).max() < 1e-3


def test_config_validation():
    with pytest.raises(DfosdError, match="--precision"):
        ExportConfig(precision="int4")
    with pytest.raises(DfosdError, match="--batch"):
        ExportConfig(batches=(0,))
    with pytest.raises(DfosdError, match="--tile"):
        ExportConfig(tile=7)


def test_runner_rejects_tampered_export(tiny_export_fp32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_fp32, copy)
    (copy / "encoder_b1.onnx").write_bytes(b"x")
    with pytest.raises(DfosdError, match="missing or changed"):
        OneStepRunner(copy, backend="onnxruntime", batch=1)
    with pytest.raises(DfosdError, match="no tile batch 3"):
        OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=3)
    with pytest.raises(DfosdError, match="not a dfosd export directory"):
        OneStepRunner(tmp_path, backend="onnxruntime")


def test_partial_batch_equals_full(tiny_export_fp32):
    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=2)
    x = _lr_batch(2, seed=9)
    both = runner(x)
    one = runner(x[:1])
    assert torch.equal(both[:1], one)
